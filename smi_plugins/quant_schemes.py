"""The built-in quantisation schemes, registered through ``register_quant_schemes`` like any plugin's."""

from __future__ import annotations

from smi_engine import hookimpl
from smi_engine.quantization.matmul import MatmulScheme
from smi_engine.quantization.repq import RepQScheme
from smi_engine.quantization.seed import SeedScheme


@hookimpl
def register_quant_schemes(register):
    register("matmul", MatmulScheme)
    register("seed", SeedScheme)
    register("repq", RepQScheme)

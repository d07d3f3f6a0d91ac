"""Post-training quantisation of timm ViTs: quantisers, schemes (``matmul``, ``seed``, ``repq``
and any a plugin registers), and the calibrate-then-evaluate job."""

from smi_engine.quantization.quantizers import CALIBRATORS, ActivationQuantizer, LogQuantizer
from smi_engine.quantization.scheme import (
    DEFAULT_SCHEME, QuantConfig, finish_calibration, freeze_quantizers, get_scheme, quantize_model, quantizers,
)

__all__ = [
    "CALIBRATORS", "DEFAULT_SCHEME", "ActivationQuantizer", "LogQuantizer", "QuantConfig", "finish_calibration",
    "freeze_quantizers", "get_scheme", "quantize_model", "quantizers",
]

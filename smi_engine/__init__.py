"""smi_engine: Sparse Model Inversion of Vision Transformers, as a library (no CLI, no UI).

Plugins import ``hookimpl`` from here; see ``smi_engine.hookspecs`` for the hooks and
``smi_engine.losses`` / ``smi_engine.tasks`` for what losses and tasks receive.
"""

from smi_engine.errors import SmiError
from smi_engine.hookspecs import hookimpl
from smi_engine.invert import InversionConfig, Inverter
from smi_engine.inversion_run import run_inversion
from smi_engine.losses import LossSpec, LossState
from smi_engine.models import ModelSpec, load_model
from smi_engine.pool import load_pool
from smi_engine.schedule import Schedule

__all__ = [
    "hookimpl", "SmiError", "InversionConfig", "Inverter", "run_inversion", "LossSpec", "LossState",
    "ModelSpec", "load_model", "load_pool", "Schedule",
]

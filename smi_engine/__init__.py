"""smi_engine: Sparse Model Inversion of Vision Transformers, as a library (no CLI, no UI).

Plugins import ``hookimpl`` from here; see ``smi_engine.hookspecs`` for the hooks and
``smi_engine.losses`` / ``smi_engine.tasks`` for what losses and tasks receive. Everything but
``SmiError`` and ``hookimpl`` is imported on first use (torch and timm are slow to import).
"""

from smi_engine.errors import SmiError
from smi_engine.hookspecs import hookimpl
from smi_engine.lazy import lazy_exports

_EXPORTS = {
    "InversionConfig": "smi_engine.invert", "Inverter": "smi_engine.invert", "run_inversion": "smi_engine.inversion_run",
    "LossSpec": "smi_engine.losses", "LossState": "smi_engine.losses", "ModelSpec": "smi_engine.models",
    "load_model": "smi_engine.models", "load_pool": "smi_engine.pool", "Schedule": "smi_engine.schedule",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["hookimpl", "SmiError", *_EXPORTS]

"""smi_engine: Sparse Model Inversion of Vision Transformers, as a library (no CLI, no UI).

The one import surface for plugins (and for code that drives the engine): everything a loss, a
selection, a task, a sink or a quantisation scheme needs is importable from here, e.g.
``from smi_engine import hookimpl, LossState``. The hooks are in ``smi_engine.hookspecs``.
Everything but ``SmiError`` and ``hookimpl`` is imported on first use (torch and timm are slow
to import), so ``import smi_engine`` stays cheap.

    vit/           the sparse ViT core: patches, sparse_vit, sparse_image, augment
    inversion/     config (InversionConfig), loop (Inverter), batch, losses, selection, schedule, run,
                   preview, bench
    runs/          rundir, runlock, events, session (the one run lifecycle), control, liveness
    downstream/    teacher, distill, quantize (the job), reconstruct, evaluate, export, tasks, demo
    quantization/  fake quantisation as a model transformation: quantizers, layers, schemes
    runtime/       device, distributed (torchrun), gpu (NVML), resources
    models, data, pool, calibration   models and data: specs and loading, datasets, pools, feeding
    errors, checks, files, plugins, hookspecs, lazy   foundations
"""

from smi_engine.errors import SmiError
from smi_engine.hookspecs import hookimpl
from smi_engine.lazy import lazy_exports

_EXPORTS = {
    # inversion, and what losses and selections receive
    "InversionConfig": "smi_engine.inversion.config", "Inverter": "smi_engine.inversion.loop",
    "run_inversion": "smi_engine.inversion.run", "Schedule": "smi_engine.inversion.schedule",
    "LossSpec": "smi_engine.inversion.losses", "LossState": "smi_engine.inversion.losses",
    "InversionContext": "smi_engine.inversion.losses", "SelectionSpec": "smi_engine.inversion.selection",
    "StopContext": "smi_engine.inversion.selection", "LEAVING": "smi_engine.inversion.selection",
    "Jitter": "smi_engine.vit.augment", "SparseViT": "smi_engine.vit.sparse_vit", "PatchGrid": "smi_engine.vit.patches",
    # models and data
    "ModelSpec": "smi_engine.models", "Normalizer": "smi_engine.models", "LoadedModel": "smi_engine.models",
    "load_model": "smi_engine.models", "Pool": "smi_engine.pool", "load_pool": "smi_engine.pool",
    "Batch": "smi_engine.calibration", "ModelFeeder": "smi_engine.calibration",
    # tasks
    "TaskContext": "smi_engine.downstream.tasks",
    "DistillConfig": "smi_engine.downstream.distill", "run_distillation": "smi_engine.downstream.distill",
    "QuantizeJob": "smi_engine.downstream.quantize", "run_quantization": "smi_engine.downstream.quantize",
    "ReconstructConfig": "smi_engine.quantization.names",
    # quantisation schemes
    "QuantConfig": "smi_engine.quantization.scheme", "QuantLinear": "smi_engine.quantization.layers",
    "QuantAttention": "smi_engine.quantization.layers", "ActivationQuantizer": "smi_engine.quantization.quantizers",
    # option checks plugins share
    "choice": "smi_engine.checks", "flag_value": "smi_engine.checks", "at_least": "smi_engine.checks",
    "number": "smi_engine.checks",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["hookimpl", "SmiError", *_EXPORTS]

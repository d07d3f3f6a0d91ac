"""The built-in downstream tasks, registered through ``register_tasks`` like any plugin's.

Each is a dataclass of its options: ``smi task NAME -o key=value`` builds it through
``call_factory``, so every option arrives as the type annotated here, and an unknown or missing
one is a one-line error before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from smi_engine import (
    DistillConfig, InversionConfig, ModelSpec, QuantConfig, QuantizeJob, ReconstructConfig, SmiError,
    TaskContext, flag_value, hookimpl, run_distillation, run_quantization,
)
from smi_engine.downstream.distill import resolve_grow, resolve_recipe


def task_model(task: str, key: str, spec: dict[str, Any] | None, folder: str | None) -> ModelSpec:
    """A model given as a spec dict (``-o KEY={...}``) or as a model folder (``-o KEY_dir=DIR``)."""
    if spec is not None:
        if not isinstance(spec, dict):
            raise SmiError(f"task {task!r} option {key}={spec!r} is not a model spec: give -o {key}_dir=FOLDER instead")
        return ModelSpec.from_dict(spec)
    if folder:
        return ModelSpec.from_dir(folder)
    raise SmiError(f"task {task!r} needs a {key}: give -o {key}_dir=FOLDER (a model folder from `smi teacher train`)")


def _out(context: TaskContext, out: str | None) -> Path | None:
    return context.out or (Path(out) if out else None)


@dataclass
class QuantizeTask:
    """``smi quantize`` as a task: the same job, its options by the flags' names."""

    description: ClassVar[str] = "post-training quantisation of a ViT, calibrated on synthetic images (or noise, or real ones)"

    calib: str
    data: str
    teacher_dir: str | None = None
    teacher: dict[str, Any] | None = None
    w_bit: int = 8
    a_bit: int = 8
    calibrator: str | None = None
    percentile: float = 99.99
    scheme: str = QuantConfig.scheme
    scheme_options: dict[str, Any] | None = None
    calib_size: int = 32
    batch_size: int = 64
    limit: int | None = None
    seed: int = 0
    reconstruct: str = "none"
    recon_iters: int = ReconstructConfig.iterations
    recon_lr: float = ReconstructConfig.rounding_lr
    recon_step_lr: float = ReconstructConfig.step_lr
    recon_drop: float = ReconstructConfig.drop
    recon_p: float = ReconstructConfig.p
    sparse_calib: str = QuantizeJob.sparse_calib
    out: str | None = None

    def run(self, context: TaskContext) -> dict[str, Any]:
        if self.scheme_options is not None and not isinstance(self.scheme_options, dict):
            raise SmiError(f"task 'quantize' option scheme_options={self.scheme_options!r} is not a dict: "
                           "pass e.g. -o \"scheme_options={'reparameterize': False}\"")
        job = QuantizeJob(
            model=task_model("quantize", "teacher", self.teacher, self.teacher_dir), calib=self.calib, data=self.data,
            quant=QuantConfig(self.w_bit, self.a_bit, self.calibrator, self.percentile, self.scheme,
                              dict(self.scheme_options or {})),
            calib_size=self.calib_size, batch_size=self.batch_size, limit=self.limit or None, seed=self.seed,
            reconstruct=ReconstructConfig(self.reconstruct, self.recon_iters, self.recon_lr, self.recon_step_lr,
                                          self.recon_drop, self.recon_p),
            sparse_calib=self.sparse_calib,
        )
        return run_quantization(job, context.device, context.bus(), _out(context, self.out))


@dataclass
class KnowledgeTransferTask:
    """``smi distill`` as a task. Settings left out (None) come from ``recipe``, then from
    ``DistillConfig``'s defaults, as on the command line."""

    description: ClassVar[str] = "data-free knowledge transfer: train a student on the teacher's outputs for synthetic images"

    data: str
    teacher_dir: str | None = None
    teacher: dict[str, Any] | None = None
    student_dir: str | None = None
    student: dict[str, Any] | None = None
    recipe: str = "default"
    pools: list[str] | None = None
    synthesize: Any = None  # true (the inversion defaults) or an inversion config dict
    synth_batches: int | None = None
    synth_batch_size: int | None = None
    epochs: int | None = None
    steps_per_round: int | None = None
    grow: int | str | None = None  # N images per round, or "batch"
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    weight_decay: float | None = None
    temperature: float | None = None
    linear_probe: bool | None = None
    flip: bool | None = None
    val_every: int | None = None
    seed: int | None = None
    limit: int | None = None
    sinks: list[str] | None = None
    out: str | None = None

    def run(self, context: TaskContext) -> dict[str, Any]:
        teacher = task_model("kt", "teacher", self.teacher, self.teacher_dir)
        settings = resolve_recipe(self.recipe, {f.name: getattr(self, f.name) for f in fields(self)})
        settings["limit"] = self.limit or None  # 0: every validation image, as on the command line
        synthesize = self._synthesis(teacher, settings.get("synth_batch_size"))
        pools = list(self.pools or [])
        grow = settings.get("grow")
        if grow is not None and grow != "batch" and (isinstance(grow, bool) or not isinstance(grow, int)):
            raise SmiError(f"task 'kt' option grow={grow!r} is neither a whole number nor 'batch': pass e.g. -o grow=64")
        distill_fields = {f.name for f in fields(DistillConfig)}
        config = DistillConfig(
            teacher=teacher, student=task_model("kt", "student", self.student, self.student_dir), data=self.data,
            pools=pools, synthesize=synthesize, grow=resolve_grow(grow, pools, synthesize),
            **{k: v for k, v in settings.items() if k in distill_fields and v is not None
               and k not in ("teacher", "student", "data", "pools", "synthesize", "grow")},
        )
        out = _out(context, self.out)
        if out is None:
            raise SmiError("task 'kt' needs option 'out': pass -o out=RUN_DIR")
        return run_distillation(config, out, context.device, context.sinks or [], context.control, context.placement)

    def _synthesis(self, teacher: ModelSpec, batch_size: int | None) -> InversionConfig | None:
        if isinstance(self.synthesize, dict):
            synthesize = InversionConfig.from_dict({**self.synthesize, "model": teacher.to_dict()})
        elif self.synthesize is not None and flag_value("task 'kt' option synthesize", self.synthesize):
            synthesize = InversionConfig(model=teacher)  # the inversion defaults
        else:
            return None
        return replace(synthesize, batch_size=batch_size) if batch_size else synthesize


@hookimpl
def register_tasks(register):
    register("quantize", QuantizeTask)
    register("kt", KnowledgeTransferTask)

"""The functions of ``smi``: each builds the engine's typed configuration and runs it, on a
model in memory or in a folder, with a progress display that suits where it runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from rich.console import Console
from torch import nn

from smi_cli.progress import Display, InversionProgress, PhaseProgress, TerminalDisplay, TrainingProgress, open_display
from smi_cli.runs import row
from smi_engine.data import ModelInput, check_fits, load_data, loader
from smi_engine.runtime.device import resolve_device
from smi_engine.downstream.distill import DistillConfig, run_distillation
from smi_engine.errors import SmiError
from smi_engine.downstream.evaluate import evaluate as accuracy_of
from smi_engine.runs.events import EventBus, read_events
from smi_engine.files import read_json
from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.loop import Inverter
from smi_engine.inversion.run import build_losses, inversion_plan, run_inversion
from smi_engine.inversion.schedule import Schedule
from smi_engine.inversion.losses import LossSpec
from smi_engine.models import LoadedModel, ModelSpec, create_model, load_model as load_loaded, resolve_normalizer
from smi_engine.models import save_model as save_loaded
from smi_engine.pool import Pool, load_pool
from smi_engine.downstream.quantize import QuantizeJob, calibrate
from smi_engine.quantization.names import DEFAULT_SPARSE_CALIB, ReconstructConfig
from smi_engine.quantization.scheme import QuantConfig
from smi_engine.runs.rundir import RunDir
from smi_engine.inversion.selection import SelectionSpec

Model = nn.Module | str | Path  # a module in memory, or a model folder (``smi teacher train``, ``save_model``)
#: What a module made or loaded by smi carries: how to rebuild and feed it (name, normalisation,
#: quantisation), so that ``save_model`` and ``evaluate`` need no mean and std.
SPEC_ATTRIBUTE = "smi_spec"
#: Inversion settings that ``invert`` takes by keyword beyond its named parameters.
INVERSION_SETTINGS = ("lr", "betas", "targets", "jitter", "flip", "attention", "jitter_at_stops", "final_mask",
                      "precision", "compile")


@dataclass(frozen=True)
class Accuracy:
    top1: float  # in %
    top5: float
    images: int


@dataclass
class Distilled:
    model: nn.Module  # the best student (by validation top-1), on the CPU
    best_top1: float
    run: "Run"


@dataclass(frozen=True)
class Run:
    """A run directory, read: what it was asked (``config``), how it stands (``status``: running,
    finished, failed, interrupted, paused, stalled, dead or damaged), what it made."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is fine too

    @property
    def kind(self) -> str:
        return RunDir(self.path).read_config().get("kind", "?")

    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved configuration (``config.json``)."""
        return RunDir(self.path).read_config().get("config", {})

    @property
    def summary(self) -> dict[str, Any] | None:
        """The results, once the run finished (``summary.json``)."""
        return read_json(RunDir(self.path).summary) if RunDir(self.path).is_finished else None

    @property
    def status(self) -> str:
        return row(self.path)["status"]

    def events(self) -> list[dict[str, Any]]:
        return read_events(RunDir(self.path).events)

    def pool(self) -> Pool:
        return load_pool(self.path)


def invert(
    teacher: Model, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    schedule: str | Schedule = "dense", iterations: int = 4000, batch_size: int = 32, batches: int = 1,
    selection: str | SelectionSpec = "smi", losses: Sequence[str | LossSpec] = ("deepinversion",), seed: int = 0,
    device: str | None = None, out: str | Path | None = None, progress: bool = True, **settings: Any,
) -> Pool:
    """Synthetic images of ``teacher`` (a timm ViT/DeiT), as a pool in its normalisation.

    ``schedule`` as ``smi invert --schedule`` (``dense``, ``50:0.3,100:0.3``, ``every:50:0.3``),
    ``selection`` ``smi``, ``pri``, ``random`` or a plugin's, ``losses`` ``name[:weight]``;
    ``settings``: any of ``INVERSION_SETTINGS``. With ``out`` (a model folder as teacher), the
    run is a run directory like ``smi invert --out`` writes, resumable from the command line.
    """
    unknown = sorted(set(settings) - set(INVERSION_SETTINGS))
    if unknown:
        raise SmiError(f"invert() has no setting {unknown[0]!r}: use {', '.join(INVERSION_SETTINGS)}")
    torch_device = _device(teacher, device)
    loaded = _loaded(teacher, mean, std, torch_device)
    config = InversionConfig(
        model=loaded.spec, schedule=schedule, iterations=iterations, batch_size=batch_size, batches=batches,
        selection=selection if isinstance(selection, SelectionSpec) else SelectionSpec(selection),
        losses=[spec if isinstance(spec, LossSpec) else LossSpec.parse(spec) for spec in losses], seed=seed,
        **settings)
    config.validate()
    if out is not None:
        if isinstance(teacher, nn.Module):
            raise SmiError("out= records the teacher by its folder, so that the run can be resumed: save it first "
                           "with smi.save_model(teacher, FOLDER, mean=..., std=...) and pass FOLDER")
        with _display(progress) as display:
            run_inversion(config, out, device=torch_device, sinks=[InversionProgress(display)])
        return load_pool(out)
    with _display(progress) as display, _frozen(loaded.model):
        bus = EventBus([InversionProgress(display)])
        inverter = Inverter(config, loaded, build_losses(config.losses), torch_device, bus)
        bus.emit("run_start", kind="invert", **inversion_plan(config, inverter, torch_device),
                 pending_batches=list(range(config.batches)))
        pools = []
        for batch in range(config.batches):
            result = inverter.invert_batch(batch)
            bus.emit("batch_end", batch=batch, images=len(result.images))
            pools.append(result.pool(loaded.normalizer))
    return Pool.concat(pools)


def quantize(
    model: Model, calib: Pool | str, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    scheme: str = QuantConfig.scheme, scheme_options: dict[str, Any] | None = None, w_bit: int = QuantConfig.w_bit,
    a_bit: int = QuantConfig.a_bit, reconstruct: bool | ReconstructConfig = False,
    calib_size: int = 32, batch_size: int = 64, sparse_calib: str = DEFAULT_SPARSE_CALIB, seed: int = 0,
    device: str | None = None, progress: bool = True,
) -> nn.Module:
    """A fake-quantised copy of ``model`` calibrated on ``calib`` (a pool, a run directory,
    ``noise`` or ``real:SPEC``), with the defaults of ``smi quantize``; ``scheme_options``: the
    scheme factory's keyword arguments (``--scheme-option``); ``reconstruct=True`` learns each
    block's rounding and step sizes (``ReconstructConfig`` for its settings).
    ``model`` is left as it was."""
    torch_device = _device(model, device)
    loaded = _loaded(model, mean, std, torch_device)
    recon = reconstruct if isinstance(reconstruct, ReconstructConfig) else ReconstructConfig("block" if reconstruct else "none")
    job = QuantizeJob(model=loaded.spec, calib=calib, data="", quant=QuantConfig(w_bit, a_bit, scheme=scheme, scheme_options=dict(scheme_options or {})),
                      calib_size=calib_size, batch_size=batch_size, seed=seed, reconstruct=recon, sparse_calib=sparse_calib)
    job.validate()
    job = replace(job, quant=job.quant.resolved())
    with _display(progress) as display, _frozen(loaded.model):
        qmodel, _ = calibrate(loaded, job, torch_device, EventBus([PhaseProgress(display)]))
    setattr(qmodel, SPEC_ATTRIBUTE, replace(loaded.spec, quantization=job.quant.to_dict()))
    return qmodel


def evaluate(
    model: Model, data: str, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    limit: int | None = None, batch_size: int = 64, device: str | None = None, progress: bool = True,
) -> Accuracy:
    """Top-1 and top-5 accuracy on the validation split of ``data`` (as ``--data``:
    ``fashion-mnist``, ``digits``, ``cifar10:DIR``, ``imagenet:DIR``, ``folder:DIR``)."""
    torch_device = _device(model, device)
    loaded = _loaded(model, mean, std, torch_device)
    splits = load_data(data)
    check_fits(loaded.spec.name, loaded.num_classes, loaded.spec.classes, splits, data)
    val = loader(splits.val, ModelInput.for_model(loaded.model, loaded.normalizer), batch_size)
    with _display(progress) as display, _frozen(loaded.model):
        phases = PhaseProgress(display)
        result = accuracy_of(loaded.model, val, torch_device, limit, lambda done, total: phases.advance("evaluate", done, total))
    return Accuracy(result["top1"], result["top5"], result["images"])


def distill(
    teacher: str | Path, student: str | Path, pools: Sequence[str | Path | Run], *, data: str, out: str | Path,
    student_args: dict[str, Any] | None = None, device: str | None = None, progress: bool = True, **settings: Any,
) -> Distilled:
    """Train ``student`` (a timm name, or a model folder) from the teacher folder on the pools
    of inverted runs, validating on ``data``; the run directory ``out`` keeps the best student.
    ``settings``: the fields of ``DistillConfig`` (``epochs``, ``batch_size``, ``lr``,
    ``temperature``, ``grow``, ...)."""
    student_spec = ModelSpec.from_dir(student) if Path(student).is_dir() else ModelSpec(str(student), dict(student_args or {}))
    allowed = sorted(set(DistillConfig.__dataclass_fields__) - {"teacher", "student", "data", "pools", "synthesize"})
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise SmiError(f"distill() has no setting {unknown[0]!r}: use {', '.join(allowed)}")
    config = DistillConfig(teacher=ModelSpec.from_dir(teacher), student=student_spec, data=data,
                           pools=[str(p.path if isinstance(p, Run) else p) for p in pools], **settings)
    config.validate()
    with _display(progress) as display:
        summary = run_distillation(config, Path(out), resolve_device(device or "auto"),
                                   [TrainingProgress(display, "distill", "round")])
    return Distilled(load_model(summary["student_dir"]), summary["best_top1"], Run(Path(out)))


def load_model(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The model a folder holds (``smi teacher train``, ``smi quantize --out``, ``save_model``),
    rebuilt as it was saved (quantised ones quantised), frozen, in eval mode."""
    loaded = load_loaded(ModelSpec.from_dir(folder), resolve_device(device))
    setattr(loaded.model, SPEC_ATTRIBUTE, loaded.spec)
    return loaded.model


def save_model(model: nn.Module, folder: str | Path, *, args: dict[str, Any] | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               classes: Sequence[str] | None = None) -> Path:
    """Write ``model`` as a model folder (``model.safetensors`` and ``smi-model.json``) that
    every command takes as ``--teacher FOLDER``; a model ``quantize`` made stays quantised.
    ``args``: the keyword arguments ``timm.create_model`` made it with (checked: the folder
    must rebuild this very model)."""
    loaded = _loaded(model, mean, std, None)
    spec = replace(loaded.spec, args=dict(args) if args is not None else loaded.spec.args, pretrained=False,
                   classes=tuple(classes) if classes is not None else loaded.spec.classes)
    rebuilt = {k: tuple(v.shape) for k, v in create_model(replace(spec, checkpoint=None)).state_dict().items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if rebuilt != own:
        key = next(k for k in sorted(set(rebuilt) | set(own)) if rebuilt.get(k) != own.get(k))
        raise SmiError(f"timm.create_model({spec.name!r}, **{spec.args}) does not rebuild this model ({key}: "
                       f"{rebuilt.get(key)} there, {own.get(key)} here): pass args= with the arguments it was made with")
    save_loaded(folder, replace(loaded, spec=spec))
    return Path(folder)


# -- helpers ----------------------------------------------------------------------------------
def _loaded(model: Model, mean: Sequence[float] | None, std: Sequence[float] | None,
            device: torch.device | None) -> LoadedModel:
    """``model`` with its spec and normalisation: given ``mean``/``std``, else what it records."""
    given = {k: tuple(float(v) for v in values) for k, values in (("mean", mean), ("std", std)) if values is not None}
    if isinstance(model, (str, Path)):
        return load_loaded(replace(ModelSpec.from_dir(model), **given), device or "cpu")
    if not isinstance(model, nn.Module):
        raise SmiError(f"a model is an nn.Module or a model folder, not {type(model).__name__}")
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if not isinstance(spec, ModelSpec):
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        spec = ModelSpec(name, pretrained=True)  # its weights are the module's own
    spec = replace(spec, **given)
    normalizer = resolve_normalizer(model, spec)
    return LoadedModel(model, replace(spec, mean=normalizer.mean, std=normalizer.std), normalizer)


def _device(model: Model, device: str | None) -> torch.device:
    """Where to run: a module in memory runs where its weights are (smi never moves it)."""
    if not isinstance(model, nn.Module):
        return resolve_device(device or "auto")
    here = next(model.parameters()).device
    if device not in (None, "auto") and _named_device(device) != here:
        raise SmiError(f"the model is on {here}, not {device}: move it first with model.to({device!r})")
    return here


def _named_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SmiError(f"device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    return torch.device(device.type, 0) if device.type == "cuda" and device.index is None else device


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with no weight gradients while smi uses it, as it was afterwards."""
    flags, training = [p.requires_grad for p in model.parameters()], model.training
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(training)


@contextlib.contextmanager
def _display(progress: bool) -> Iterator[Display]:
    """A bar in a terminal or a notebook (Rich draws it in Jupyter), plain lines on a pipe."""
    console = Console(stderr=True)
    display = TerminalDisplay(Console()) if progress and console.is_jupyter else open_display(console, not progress)
    with display:
        yield display

"""An inversion run in a run directory: validate, create or resume, invert, write, summarise.

Everything that can be wrong with the request (model, checkpoint, schedule, losses, device)
is checked before anything is written, so a bad request leaves the disk untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from smi_engine.runs.control import RunControl
from smi_engine.runtime.device import resolve_device
from smi_engine.runtime.distributed import Placement
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus, EventSink
from smi_engine.files import file_digest
from smi_engine.inversion.batch import BatchResult
from smi_engine.inversion.config import InversionConfig, config_digest
from smi_engine.inversion.loop import Inverter
from smi_engine.inversion.losses import build_losses
from smi_engine.models import load_model
from smi_engine.pool import shard_batches, write_shard
from smi_engine.runs.rundir import RunDir
from smi_engine.inversion.schedule import speedup_bound
from smi_engine.runs.session import RunSession, build_sinks

RUN_KIND = "invert"


def default_out_dir(config: InversionConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "dense" if config.schedule.is_dense else ("sparse" if config.selection.name == "smi" else config.selection.name)
    return Path("runs") / f"{stamp}-{config.model.name}-{mode}"


class InversionRun:
    """A validated inversion run whose directory exists: ``prepare`` checks everything and
    claims the directory, ``run`` inverts (so a UI can start in between)."""

    def __init__(self, config: InversionConfig, session: RunSession, inverter: Inverter, device: torch.device,
                 resume: bool, checkpoint: dict[str, Any] | None):
        self.config, self.session, self.inverter, self.device = config, session, inverter, device
        self.resume, self.checkpoint = resume, checkpoint

    @classmethod
    def prepare(
        cls, config: InversionConfig | None, out: str | Path, *, resume: bool = False, device: str | torch.device = "auto",
        sinks: Iterable[EventSink] = (), control: RunControl | None = None, placement: Placement = Placement(),
    ) -> "InversionRun":
        run_dir = RunDir(Path(out))
        if resume:
            config = InversionConfig.from_dict(run_dir.open_existing(RUN_KIND)["config"])
            check_teacher_unchanged(config, run_dir)
        elif config is None:
            raise SmiError("nothing to run: give a configuration or --resume")
        else:
            config = pin_teacher(config)
        torch_device = device if isinstance(device, torch.device) else resolve_device(device)
        loaded = load_model(config.model, torch_device)
        config = replace(config, model=loaded.spec)  # config.json records the normalisation the pool is stored in
        bus = EventBus(sinks, rank=placement.rank)
        control = control or RunControl(run_dir)
        control.listeners.append(lambda change: bus.emit(change))
        inverter = Inverter(config, loaded, build_losses(config.losses), torch_device, bus, run_dir, control)
        plugin_sinks = build_sinks(config.sinks, run_dir, config.to_dict(), config.sink_options)  # before creating: a broken sink writes nothing
        session = RunSession(run_dir, RUN_KIND, bus, placement, resumable=True)
        # Refusals come before the lock file is touched, so a refused start or resume writes nothing.
        if not resume:
            session.check_claimable()
        checkpoint = run_dir.load_checkpoint(placement.rank) if resume else None
        if checkpoint is not None:
            check_checkpoint(checkpoint, config, inverter, run_dir.checkpoint(placement.rank))
        # Rank 0 holds the run's lock; a second process (or job) on the same folder is refused here.
        session.claim(None if resume else config.to_dict(), plugin_sinks, folders=(run_dir.pool, run_dir.previews))
        return cls(config, session, inverter, torch_device, resume, checkpoint)

    def run(self) -> dict[str, Any]:
        """Invert every pending batch; returns the summary (written to summary.json by rank 0)."""
        with self.session:
            return _run(self.config, self.session, self.inverter, self.device, self.resume, self.checkpoint)


def pin_teacher(config: InversionConfig) -> InversionConfig:
    """The run's teacher as it is now: its weights file by absolute path (a resume from another
    folder finds the same file) and that file's digest (a resume refuses other weights)."""
    spec = config.model
    if not spec.checkpoint:
        return config
    path = Path(spec.checkpoint).resolve()
    if not path.is_file():
        return config  # load_model names the missing file
    return replace(config, model=replace(spec, checkpoint=str(path)), teacher_sha256=file_digest(path))


def check_teacher_unchanged(config: InversionConfig, run_dir: RunDir) -> None:
    path = config.model.checkpoint
    if config.teacher_sha256 and path and Path(path).is_file() and file_digest(path) != config.teacher_sha256:
        raise SmiError(f"the teacher's weights {path} changed since {run_dir.path} started: resuming would mix two "
                       "teachers in one pool; start a new run")


def check_checkpoint(data: dict[str, Any], config: InversionConfig, inverter: Inverter, path: Path) -> None:
    """A resume checkpoint belongs to this run, as it is configured now, or a one-line error."""
    fix = "delete it to restart its batch, then --resume"
    for key, kind in (("batch", int), ("iteration", int), ("store", torch.Tensor), ("kept", torch.Tensor),
                      ("param", torch.Tensor)):
        if not isinstance(data.get(key), kind):
            raise SmiError(f"resume checkpoint {path} has no valid {key!r}: it is not a checkpoint of this run; {fix}")
    grid = inverter.grid
    if not 0 <= data["batch"] < config.batches or not 0 <= data["iteration"] <= config.iterations:
        raise SmiError(f"resume checkpoint {path} is at batch {data['batch']}, iteration {data['iteration']}, outside "
                       f"this run's {config.batches} x {config.iterations}; {fix}")
    if tuple(data["store"].shape) != (config.batch_size, grid.num_patches, grid.patch_dim):
        raise SmiError(f"resume checkpoint {path} holds images of shape {tuple(data['store'].shape)}, not this run's "
                       f"{(config.batch_size, grid.num_patches, grid.patch_dim)}; {fix}")
    if data.get("config_digest") not in (None, config_digest(config)):
        raise SmiError(f"config.json of {path.parent} changed since its checkpoint was saved (schedule, iterations or "
                       "another setting): the pool would disagree with its own summary; restore it or start a new run")


def run_inversion(config: InversionConfig | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """Invert ``config`` into the run directory ``out`` (or continue it with ``resume=True``);
    options as ``InversionRun.prepare``. Returns the summary."""
    return InversionRun.prepare(config, out, **options).run()


def _run(config, session: RunSession, inverter: Inverter, device, resume: bool, checkpoint: dict[str, Any] | None):
    run_dir, bus, placement = session.run_dir, session.bus, session.placement
    done = shard_batches(run_dir.pool)
    pending = [b for b in range(config.batches) if b not in done and placement.owns(b)]
    session.start(resumed=resume, **inversion_plan(config, inverter, device), pending_batches=pending)
    if checkpoint is not None and checkpoint.get("batch") in done:  # saved just before its shard landed
        run_dir.clear_checkpoint(placement.rank)
        checkpoint = None
    for batch in pending:
        resume_from = checkpoint if checkpoint is not None and checkpoint.get("batch") == batch else None
        result = inverter.invert_batch(batch, resume_from)
        shard = write_shard(run_dir.pool, batch, placement.rank, result.pool(), _shard_metadata(config, result, placement.rank))
        run_dir.clear_checkpoint(placement.rank)
        bus.emit("batch_end", batch=batch, seconds=result.seconds, shard=str(shard.relative_to(run_dir.path)),
                 kept=int(result.keep[-1].sum()), images=len(result.images), best_loss=result.best_loss,
                 teacher_accuracy=result.teacher_accuracy, losses=result.losses)
    if not placement.is_main:
        return {}
    _wait_for_shards(run_dir, config.batches)
    summary = {**summarise(config, run_dir, inverter), "world_size": placement.world_size}
    summary = session.end(summary)
    return summary


def inversion_plan(config: InversionConfig, inverter: Inverter, device: torch.device) -> dict[str, Any]:
    """What an inversion's ``run_start`` announces: the model, the schedule and the shape of
    the work (what progress displays and the dashboard plan from)."""
    grid, vit, schedule = inverter.grid, inverter.vit, inverter.schedule
    return dict(
        model=config.model.name, model_has_weights=config.model.has_weights,
        device=str(device), schedule=str(schedule), selection=str(config.selection),
        stops=[[s.iteration, s.ratio] for s in schedule.stops], iterations=config.iterations,
        batches=config.batches, batch_size=config.batch_size, grid=[grid.rows, grid.cols],
        num_patches=grid.num_patches, prefix_tokens=vit.num_prefix_tokens, width=vit.width,
        kept_per_stage=inverter.kept_per_stage, images_per_trajectory=inverter.images_per_trajectory,
        patches_per_image=inverter.patches_per_image, losses=[s.name for s in config.losses],
        speedup_bound=speedup_bound(schedule, config.iterations, grid.num_patches, vit.num_prefix_tokens, vit.width),
    )


def _wait_for_shards(run_dir: RunDir, batches: int, poll: float = 1.0) -> None:
    """Rank 0 waits for the other ranks' shards (torchrun ends the job if a rank dies). Not a
    barrier: ranks with more or slower batches may finish long after the process group's timeout."""
    while len(shard_batches(run_dir.pool)) < batches:
        time.sleep(poll)


def _shard_metadata(config: InversionConfig, result: BatchResult, rank: int) -> dict[str, str]:
    stats = {
        "seconds": result.seconds, "best_loss": result.best_loss, "losses": result.losses,
        "teacher_accuracy": result.teacher_accuracy, "stage_seconds": result.stage_seconds,
        "stage_iterations": result.stage_iterations,
    }
    return {
        "batch": str(result.batch), "rank": str(rank), "model": config.model.name, "schedule": str(config.schedule),
        "seed": str(config.seed), "iterations": str(config.iterations), "stats": json.dumps(stats),
    }


def read_shard_stats(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["stats"])


def summarise(config: InversionConfig, run_dir: RunDir, inverter: Inverter) -> dict[str, Any]:
    shards = shard_batches(run_dir.pool)
    missing = [b for b in range(config.batches) if b not in shards]
    if missing:
        raise SmiError(f"batches {missing} have no pool shard: resume the run to finish them")
    stats = [read_shard_stats(p) for p in shards.values()]
    grid, vit, schedule = inverter.grid, inverter.vit, inverter.schedule
    kept, per_image = inverter.kept_per_stage, inverter.patches_per_image
    trajectories = config.batches * config.batch_size
    bound = speedup_bound(schedule, config.iterations, grid.num_patches, vit.num_prefix_tokens, vit.width)
    stage_totals = [0.0] * len(kept)
    stage_counts = [0] * len(kept)
    for s in stats:
        for i, (secs, n) in enumerate(zip(s["stage_seconds"], s["stage_iterations"])):
            stage_totals[i] += secs
            stage_counts[i] += n
    seconds = sum(s["seconds"] for s in stats)
    terms = sorted({k for s in stats for k in s["losses"]})
    return {
        "model": config.model.name,
        "schedule": str(schedule),
        "selection": str(config.selection),
        "images": trajectories * len(per_image),
        "trajectories": trajectories,
        "images_per_trajectory": len(per_image),
        "batches": config.batches,
        "batch_size": config.batch_size,
        "iterations": config.iterations,
        "seconds": seconds,
        "seconds_per_batch": seconds / len(stats),
        "iterations_per_second": config.iterations * len(stats) / seconds if seconds else 0.0,
        "images_per_second": trajectories * len(per_image) / seconds if seconds else 0.0,
        "num_patches": grid.num_patches,
        "patches_per_image": per_image,
        "kept_patches": per_image[-1],  # the final image's (every image's, but under an emitting selection)
        "kept_fraction": sum(per_image) / len(per_image) / grid.num_patches,
        "stages": [
            {"kept": k, "tokens": k + vit.num_prefix_tokens, "iterations": n,
             "seconds_per_iteration": (t / n if n else None)}
            for k, t, n in zip(kept, stage_totals, stage_counts)
        ],
        "speedup_bound": bound,
        "speedup_bound_per_image": bound * len(per_image),  # a dense trajectory makes one image
        "final_losses": {k: sum(s["losses"].get(k, 0.0) for s in stats) / len(stats) for k in terms},
        "best_loss": sum(s["best_loss"] for s in stats) / len(stats),
        "teacher_accuracy": sum(s["teacher_accuracy"] for s in stats) / len(stats),  # every batch makes as many images
        "run_dir": str(run_dir.path),
        "pool": str(run_dir.pool),
        "preview": str(run_dir.previews / f"batch-{config.batches - 1:05d}-it{config.iterations:05d}.png"),
    }

"""Data-free knowledge transfer: a student learns the teacher's softened outputs on synthetic
images only (KL divergence at temperature T, scaled by T^2, as the seed).

Training runs in rounds (``epochs``). A round first adds synthetic data (``synth_batches``
fresh inverted batches with ``synthesize``; with ``grow``, the next ``grow`` images of the
fixed pools, replaying a pool as if it were synthesised round by round), then trains: one
pass over everything synthesised so far, or ``steps_per_round`` steps on batches drawn at
random from it (the seed's protocol: 1 step on 32 images per round). Validation on real data
every ``val_every`` rounds and after the last; the best student is kept. Events:
``run_start``, ``train_step``, ``epoch_end``, ``run_end`` (plus inversion's own while
synthesising).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from smi_engine.calibration import Batch, ModelFeeder
from smi_engine.checks import at_least, number, positive
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.data import DataSplits, ModelInput, check_fits, load_data, loader
from smi_engine.runtime.distributed import Placement
from smi_engine.errors import SmiError
from smi_engine.downstream.evaluate import evaluate, validation_progress
from smi_engine.runs.events import EventBus, EventSink
from smi_engine.files import read_json
from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.loop import Inverter
from smi_engine.inversion.losses import build_losses
from smi_engine.models import LoadedModel, ModelSpec, Normalizer, load_model, save_model
from smi_engine.pool import Pool, load_pool, write_shard
from smi_engine.runtime.resources import MemoryProbe
from smi_engine.runs.rundir import RunDir
from smi_engine.runs.session import RunSession, build_sinks

RUN_KIND = "distill"
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")

#: Named settings for ``smi distill --recipe``; options given explicitly win. ``seed`` is the
#: seed's test_kt.py: a linear probe (frozen backbone, new head) trained by SGD (lr 0.1,
#: momentum 0.9, weight decay 1e-4, constant) at T = 20 for 1,000 rounds, each adding one
#: synthesised batch of 100 images to a growing pool (or revealing the next batch of a fixed
#: pool) and taking one step on 32 images drawn from it, with flips; best validation top-1.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "seed": {"linear_probe": True, "optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4, "lr_schedule": "constant",
             "temperature": 20.0, "epochs": 1000, "steps_per_round": 1, "batch_size": 32, "synth_batches": 1,
             "synth_batch_size": 100, "grow": "batch", "flip": True},
}


def resolve_recipe(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """A recipe's settings under the explicitly given ones (``None`` counts as not given)."""
    if name not in RECIPES:
        raise SmiError(f"unknown --recipe {name!r}: use {', '.join(RECIPES)}")
    return {**RECIPES[name], **{k: v for k, v in explicit.items() if v is not None}}


def pool_batch_size(run_dir: str | Path) -> int:
    """Images per inverted batch of a pool (its trajectories times the images each makes): what
    ``grow: batch`` reveals per round."""
    run = RunDir(Path(run_dir))
    try:
        if run.is_finished:
            summary = read_json(run.summary)
            return int(summary["images"]) // int(summary["batches"])
        return int(run.read_config()["config"]["batch_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OSError, SmiError):
        raise SmiError(f"{run_dir} does not record its batch size: pass --grow N") from None


def resolve_grow(grow: int | str | None, pools: list[str], synthesize: "InversionConfig | None") -> int | None:
    """``--grow N``, or a recipe's ``"batch"``: one inverted batch of the first fixed pool per round
    (nothing to reveal when the batches are synthesised during training)."""
    if grow == "batch":
        return pool_batch_size(pools[0]) if pools and synthesize is None else None
    return grow


@dataclass
class DistillConfig:
    teacher: ModelSpec
    student: ModelSpec
    data: str  # real data for validation
    pools: list[str] = field(default_factory=list)
    synthesize: InversionConfig | None = None  # invert this many batches each epoch, with these settings
    synth_batches: int = 1
    epochs: int = 10  # rounds
    steps_per_round: int | None = None  # None: one pass over all synthetic data per round
    grow: int | None = None  # reveal this many fixed-pool images per round (None: all at once)
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    temperature: float = 20.0
    linear_probe: bool = False
    flip: bool = True
    val_every: int = 1
    seed: int = 0
    limit: int | None = None
    sinks: list[str] = field(default_factory=list)  # extra event sinks by name (--sink tensorboard)
    sink_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --sink-option, by sink name

    def validate(self) -> None:
        if not self.pools and self.synthesize is None:
            raise SmiError("no synthetic data: pass --pool RUN_DIR (repeatable) or --synthesize")
        if self.optimizer not in OPTIMIZERS:
            raise SmiError(f"unknown --optimizer {self.optimizer!r}: use {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SmiError(f"unknown --lr-schedule {self.lr_schedule!r}: use {', '.join(LR_SCHEDULES)}")
        for name, example in (("epochs", 10), ("batch_size", 64), ("synth_batches", 1), ("val_every", 1),
                              ("steps_per_round", 1), ("grow", 64)):
            if getattr(self, name) is not None:
                at_least(f"--{name.replace('_', '-')}", getattr(self, name), 1, example)
        if self.limit is not None:
            at_least("--limit", self.limit, 0, 1000)
        if self.grow is not None and (not self.pools or self.synthesize is not None):
            raise SmiError("--grow reveals a fixed pool round by round: pass --pool RUN_DIR, without --synthesize")
        positive("--temperature", self.temperature, 20)
        positive("--lr", self.lr, 0.1)
        number("--weight-decay", self.weight_decay, 1e-4, low=0)
        if self.synthesize is not None:
            self.synthesize.validate()

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["teacher"], data["student"] = self.teacher.to_dict(), self.student.to_dict()
        data["synthesize"] = None if self.synthesize is None else self.synthesize.to_dict()
        return data


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened outputs, times T^2 (batch mean)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def prepare_student(spec: ModelSpec, num_classes: int, linear_probe: bool, device: torch.device) -> LoadedModel:
    if spec.checkpoint is None and "num_classes" not in spec.args:
        spec = replace(spec, args={**spec.args, "num_classes": num_classes})
    student = load_model(spec, device, frozen=linear_probe)
    if linear_probe:  # a frozen backbone under a new classifier head (the seed's linear probe)
        student.model.reset_classifier(num_classes)
        student.model.to(device)
        student.model.get_classifier().requires_grad_(True)
    elif student.num_classes != num_classes:
        raise SmiError(f"the student has {student.num_classes} classes but the teacher {num_classes}: pass --student-args num_classes={num_classes}")
    return student


class _Fed(nn.Module):
    """The student behind its feeder, as one module, so DistributedDataParallel sees every
    forward (sparse-token ones included)."""

    def __init__(self, feeder: ModelFeeder):
        super().__init__()
        self.model, self.feeder = feeder.model, feeder

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None, source: Normalizer) -> torch.Tensor:
        return self.feeder(Batch(images, keep), source)


class _Synthesis:
    """Fresh synthetic batches from the teacher, written to the run's pool as they are made.
    Losses that compete with a student (DeepInversion's ``adv``) get the one being trained."""

    def __init__(self, config: InversionConfig, teacher: LoadedModel, student: LoadedModel, device, bus: EventBus,
                 run_dir: RunDir, control, placement: Placement):
        self.inverter = Inverter(config, teacher, build_losses(config.losses), device, bus, run_dir, control)
        for _, loss in self.inverter.losses:
            if hasattr(loss, "use_student"):
                loss.use_student(student.model, student.normalizer)
        self.student, self.run_dir, self.placement, self.made = student.model, run_dir, placement, 0

    def batch(self) -> Pool:
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        mode = self.student.training
        self.student.eval().requires_grad_(False)  # inversion needs no gradients of the student's weights
        batch = self.made * self.placement.world_size + self.placement.rank  # every rank its own batches
        try:
            result = self.inverter.invert_batch(batch)
        finally:
            for p in trainable:
                p.requires_grad_(True)
            self.student.train(mode)
        made = result.pool(self.inverter.loaded.normalizer)
        write_shard(self.run_dir.pool, batch, self.placement.rank, made, {"batch": str(batch)})
        self.made += 1
        return made


def run_distillation(config: DistillConfig, out: Path, device: torch.device, sinks: list[EventSink] = (),
                     control: RunControl | None = None, placement: Placement = Placement()) -> dict[str, Any]:
    """Train the student; under torchrun, DistributedDataParallel over the synthetic data (each
    rank its own minibatches and its own fresh batches), validated and saved by rank 0."""
    config.validate()
    teacher = load_model(config.teacher, device)
    splits = load_data(config.data)
    check_fits(teacher.spec.name, teacher.num_classes, teacher.spec.classes, splits, config.data, "the teacher")
    torch.manual_seed(config.seed)
    student = prepare_student(config.student, teacher.num_classes, config.linear_probe, device)
    fixed = [_recorded_pool(p) for p in config.pools]
    run_dir = RunDir(Path(out))
    control = control or RunControl(run_dir)
    synthesis_config = None
    if config.synthesize is not None:
        synthesis_config = replace(config.synthesize, model=teacher.spec, checkpoint_every=0)
        synthesis_config.validate()
    bus = EventBus(list(sinks), rank=placement.rank)
    # Built (losses, schedule against the teacher) before anything is written.
    synthesis = None if synthesis_config is None else _Synthesis(synthesis_config, teacher, student, device, bus, run_dir, control, placement)
    plugin_sinks = build_sinks(config.sinks, run_dir, config.to_dict(), config.sink_options) if placement.is_main else []
    session = RunSession(run_dir, RUN_KIND, bus, placement)
    session.check_claimable()
    with session.claim(config.to_dict(), plugin_sinks, folders=[run_dir.pool] if synthesis is not None else []):
        return Transfer(config, session, teacher, student, splits, fixed, synthesis, device, control).run()


class SyntheticData:
    """What the student may learn from so far, all in the teacher's normalisation: the fixed
    pools (revealed ``grow`` images per round, or at once) followed by the batches made while
    training."""

    def __init__(self, fixed: list[Pool], target: Normalizer, grow: int | None):
        converted = [pool.renormalized(target) for pool in fixed]
        self.pool = Pool.concat(converted) if converted else None
        self.grow, self.fixed_images = grow, sum(len(p) for p in converted)

    def add(self, pool: Pool) -> None:
        self.pool = pool if self.pool is None else Pool.concat([self.pool, pool])

    def available(self, round_index: int) -> Pool:
        if self.grow is None:
            return self.pool
        n = self.revealed(round_index)
        return self.pool.select(slice(0, n))

    def revealed(self, round_index: int) -> int:
        """Images of the fixed pools the student may see in this round."""
        return self.fixed_images if self.grow is None else min(self.fixed_images, (round_index + 1) * self.grow)

    def planned_steps(self, config: "DistillConfig", world_size: int, images_per_trajectory: int) -> int:
        """Training steps this rank takes over all rounds (the true total for progress displays):
        one pass over what is available each round, as ``_epoch_batches`` shares it, or the fixed
        ``steps_per_round``; each synthesised trajectory adds ``images_per_trajectory`` images
        (0 without synthesis)."""
        if config.steps_per_round is not None:
            return config.epochs * config.steps_per_round
        made = config.synth_batches * config.synthesize.batch_size * images_per_trajectory if config.synthesize else 0
        total = 0
        for round_index in range(config.epochs):
            size = self.revealed(round_index) + (round_index + 1) * made
            total += max(-(-size // config.batch_size) // world_size, 1)
        return total


def _recorded_pool(run_dir: str | Path) -> Pool:
    pool = load_pool(run_dir)
    if pool.normalizer is None:
        raise SmiError(f"{run_dir} does not record the normalisation its images are stored in: pass a run directory "
                       "made by smi invert")
    return pool


def _optimizer_and_schedule(config: DistillConfig, student: LoadedModel):
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(trainable, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
                 if config.optimizer == "sgd" else torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay))
    if config.lr_schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _round: 1.0)


class Transfer:
    """One knowledge transfer under way: what the student learns from, how it learns, and the
    running tallies (steps taken, loss of the round, best validation so far)."""

    def __init__(self, config: DistillConfig, session: RunSession, teacher: LoadedModel, student: LoadedModel,
                 splits: DataSplits, fixed: list[Pool], synthesis: "_Synthesis | None", device: torch.device,
                 control: RunControl):
        self.config, self.session, self.teacher, self.student = config, session, teacher, student
        self.synthesis, self.device, self.control = synthesis, device, control
        self.placement, self.bus = session.placement, session.bus
        self.data = SyntheticData(fixed, teacher.normalizer, config.grow)
        per_trajectory = 0 if synthesis is None else synthesis.inverter.images_per_trajectory
        self.total_steps = self.data.planned_steps(config, self.placement.world_size, per_trajectory)
        self.teacher_feed = ModelFeeder(teacher.model, teacher.normalizer)
        self.student_forward = _Fed(ModelFeeder(student.model, student.normalizer))
        if self.placement.distributed:
            # The class token's gradient arrives as a strided view; DDP warns, harmlessly, on every step.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.student_forward = DistributedDataParallel(
                self.student_forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer, self.scheduler = _optimizer_and_schedule(config, student)
        self.val = loader(splits.val, ModelInput.for_model(student.model, student.normalizer), 256)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.probe = MemoryProbe(device)
        self.synthesized, self.done_steps, self.best, self.history = 0, 0, -1.0, []
        # Since the last validation: the summed loss (per image), the images seen, when it began.
        self.loss_sum, self.seen, self.since = 0.0, 0, time.perf_counter()

    def run(self) -> dict[str, Any]:
        config, synthesis = self.config, self.synthesis
        plan = None if synthesis is None else {"batches": config.epochs * config.synth_batches,
                                               "iterations": config.synthesize.iterations,
                                               "images_per_trajectory": synthesis.inverter.images_per_trajectory}
        self.session.start(teacher=config.teacher.name, student=config.student.name, epochs=config.epochs,
                           device=str(self.device), data=config.data, synthesize=synthesis is not None,
                           synthesis=plan, pool_images=self.data.fixed_images, steps_per_round=config.steps_per_round,
                           grow=config.grow, total_steps=self.total_steps)
        started = time.perf_counter()
        for epoch in range(config.epochs):
            pool = self._grow(epoch)
            self._train_round(pool, epoch)
            self.scheduler.step()
            if (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs:
                self._validate(epoch, pool)
        synthesized = int(self.placement.sum([self.synthesized])[0])  # every rank takes part
        if not self.placement.is_main:
            return {}
        run_dir, history = self.session.run_dir, self.history
        summary = {
            "teacher": config.teacher.name, "student": config.student.name, "data": config.data,
            "best_top1": self.best, "final_top1": history[-1]["val_top1"], "final_top5": history[-1]["val_top5"],
            "epochs": config.epochs, "world_size": self.placement.world_size,
            "synthetic_images": self.data.fixed_images + synthesized,
            "seconds": time.perf_counter() - started, "student_dir": str(run_dir.path / "student"), "history": history,
            "run_dir": str(run_dir.path),
        }
        return self.session.end(summary)

    def _grow(self, epoch: int) -> Pool:
        """What the student may learn from in this round, fresh batches synthesised first."""
        if self.synthesis is not None:
            for _ in range(self.config.synth_batches):
                made = self.synthesis.batch()
                self.data.add(made)
                self.synthesized += len(made)
        return self.data.available(epoch)

    def _train_round(self, pool: Pool, epoch: int) -> None:
        """One round of steps."""
        config, generator = self.config, self.generator
        self.student.model.train(not config.linear_probe)
        batches = (_epoch_batches(pool, config.batch_size, generator, self.placement) if config.steps_per_round is None
                   else _drawn_batches(pool, config.batch_size, config.steps_per_round, generator, self.placement))
        for step, rows in enumerate(batches):
            if self.control.should_stop():
                raise RunInterrupted(f"stopped in round {epoch + 1}", epoch, step)
            batch = _batch(pool, rows, config.flip, generator)
            batch.images = batch.images.to(self.device)
            with torch.no_grad():
                target = self.teacher_feed(batch, self.teacher.normalizer)
            loss = kd_loss(self.student_forward(batch.images, batch.keep, self.teacher.normalizer), target,
                           config.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.loss_sum += float(loss.detach()) * len(batch.images)
            self.seen += len(batch.images)
            self.done_steps += 1
            self.bus.emit("train_step", epoch=epoch, epochs=config.epochs, step=step, done_steps=self.done_steps,
                          total_steps=self.total_steps, loss=float(loss.detach()), **self.probe.read())

    def _validate(self, epoch: int, pool: Pool) -> None:
        """Rank 0 validates, keeps the best student and reports the rounds since the last time."""
        loss_sum, seen = self.placement.sum([self.loss_sum, self.seen])  # every rank takes part
        since = self.since
        self.loss_sum, self.seen, self.since = 0.0, 0, time.perf_counter()
        if not self.placement.is_main:
            return
        config, student = self.config, self.student
        student.model.eval()
        metrics = evaluate(student.model, self.val, self.device, config.limit, validation_progress(self.bus))
        if metrics["top1"] > self.best:
            self.best = metrics["top1"]
            save_model(self.session.run_dir.path / "student", student,
                       {"distilled_from": config.teacher.name, "data": config.data,
                        "accuracy": {"top1": metrics["top1"], "top5": metrics["top5"]}})
        record = {"epoch": epoch, "epochs": config.epochs, "kt_loss": loss_sum / max(seen, 1), "val_top1": metrics["top1"],
                  "val_top5": metrics["top5"], "best_top1": self.best, "images": int(seen), "pool_images": len(pool),
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - since}
        self.history.append(record)
        self.bus.emit("epoch_end", **record)


def _epoch_batches(pool: Pool, batch_size: int, generator: torch.Generator, placement: Placement):
    """Row indices of shuffled minibatches covering the pool once. Under torchrun each rank
    takes an equal share (DistributedDataParallel needs the same number of steps)."""
    order = torch.randperm(len(pool), generator=generator)
    chunks = [order[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    picks = (list(range(len(chunks))) * placement.world_size)[: max(len(chunks) // placement.world_size, 1) * placement.world_size]
    for position in picks[placement.rank :: placement.world_size]:
        yield chunks[position]


def _drawn_batches(pool: Pool, batch_size: int, steps: int, generator: torch.Generator, placement: Placement):
    """``steps`` batches, each drawn at random (without replacement) from the whole pool; every
    rank draws its own."""
    for _ in range(steps):
        for rank in range(placement.world_size):
            rows = torch.randperm(len(pool), generator=generator)[:batch_size]
            if rank == placement.rank:
                yield rows


def _batch(pool: Pool, rows: torch.Tensor, flip: bool, generator: torch.Generator) -> Batch:
    """The rows of a pool, randomly flipped (image and keep mask alike, so teacher and student
    see the same input)."""
    images, keep = pool.images[rows], pool.keep[rows]
    if flip:
        flipped = (torch.rand(len(rows), generator=generator) < 0.5).view(-1, 1, 1, 1)
        images = torch.where(flipped, images.flip(3), images)
        keep = torch.where(flipped[:, 0], keep.flip(2), keep)
    return Batch(images, None if bool(keep.all()) else keep, pool.labels[rows])

"""Training (or fine-tuning) a classifier on real data: the teachers that inversion starts from.

AdamW, linear warm-up then cosine decay, label smoothing, random flips and shifts, validation
after every epoch. Emits ``epoch_end`` events so the dashboard can follow.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from smi_engine.checks import at_least, number, positive
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.data import DataSplits, ModelInput, loader
from smi_engine.downstream.evaluate import evaluate, validation_progress
from smi_engine.runs.events import EventBus, EventSink
from smi_engine.models import LoadedModel, save_model
from smi_engine.runtime.resources import MemoryProbe
from smi_engine.runs.rundir import RunDir
from smi_engine.runs.session import RunSession, build_sinks


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    flip: bool = True
    shift: float = 0.125  # random translation, as a fraction of the image size
    seed: int = 0
    limit: int | None = None  # use only the first N training images (quick runs)
    sinks: list[str] = field(default_factory=list)  # extra event sinks by name (--sink tensorboard)
    sink_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --sink-option, by sink name

    def validate(self) -> None:
        at_least("--epochs", self.epochs, 1, 10)
        at_least("--batch-size", self.batch_size, 1, 128)
        positive("--lr", self.lr, 1e-3)
        number("--weight-decay", self.weight_decay, 0.05, low=0)
        number("--label-smoothing", self.label_smoothing, 0.1, low=0, high=1, exclusive="high")
        number("warm-up epochs", self.warmup_epochs, 1, low=0)
        number("--shift", self.shift, 0.125, low=0, high=0.5)
        if self.limit is not None:
            at_least("--limit", self.limit, 0, 1000)

    def to_dict(self) -> dict:
        return asdict(self)


def augment(images: torch.Tensor, flip: bool, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip and translation (with zero fill)."""
    b, _, h, w = images.shape
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        images = torch.where(flipped.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    pad_y, pad_x = int(h * shift), int(w * shift)
    if pad_y or pad_x:
        padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))
        dy = torch.randint(0, 2 * pad_y + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad_x + 1, (b,), generator=generator).tolist()
        images = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return images


def train_classifier(
    loaded: LoadedModel,
    data: DataSplits,
    config: TrainConfig,
    device: torch.device,
    bus: EventBus | None = None,
    control: RunControl | None = None,
) -> dict:
    bus = bus or EventBus()
    control = control or RunControl()
    model = loaded.model.to(device).requires_grad_(True)
    model_input = ModelInput.for_model(model, loaded.normalizer)
    train_set = data.train
    if config.limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(config.limit, len(train_set))))
    train_batches = loader(train_set, model_input, config.batch_size, shuffle=True, seed=config.seed)
    val_batches = loader(data.val, model_input, 256)
    steps_per_epoch = len(train_batches)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    probe = MemoryProbe(device)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        epoch_loss, seen, epoch_started = 0.0, 0, time.perf_counter()
        for step, (images, labels) in enumerate(train_batches):
            if control.should_stop():
                raise RunInterrupted(f"stopped in epoch {epoch + 1}", epoch, step)
            images = augment(images, config.flip, config.shift, generator).to(device)
            labels = labels.to(device)
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
            bus.emit("train_step", epoch=epoch, epochs=config.epochs, step=step, steps=steps_per_epoch,
                     done_steps=epoch * steps_per_epoch + step + 1, loss=float(loss.detach()), **probe.read())
        model.eval()
        metrics = evaluate(model, val_batches, device, on_batch=validation_progress(bus))
        record = {
            "epoch": epoch, "epochs": config.epochs, "train_loss": epoch_loss / max(1, seen),
            "val_top1": metrics["top1"], "val_top5": metrics["top5"],
            "seconds": time.perf_counter() - epoch_started, "images_per_s": seen / (time.perf_counter() - epoch_started),
        }
        history.append(record)
        bus.emit("epoch_end", **record)
    model.requires_grad_(False).eval()
    final = history[-1]
    return {
        "top1": final["val_top1"], "top5": final["val_top5"], "epochs": config.epochs,
        "seconds": time.perf_counter() - started, "history": history,
    }


def run_teacher_training(loaded: LoadedModel, splits: DataSplits, config: TrainConfig, out: Path,
                         device: torch.device, sinks: list[EventSink] = (), control: RunControl | None = None) -> dict[str, Any]:
    """Train ``loaded`` on ``splits`` in the run directory ``out``, which then is a model folder
    (``--teacher DIR`` loads it). ``sinks`` see every event; the plugin sinks ``config.sinks``
    start before anything is written. Returns the summary; a stop request ends it with
    RunInterrupted, nothing saved."""
    run_dir, data = RunDir(out), splits.name
    run_config = {"model": loaded.spec.to_dict(), "data": data, "train": config.to_dict()}
    plugin_sinks = build_sinks(config.sinks, run_dir, run_config, config.sink_options)
    session = RunSession(run_dir, "teacher", EventBus(list(sinks)))
    session.check_claimable()
    with session.claim(run_config, plugin_sinks):
        session.start(model=loaded.spec.name, data=data, epochs=config.epochs, device=str(device))
        metrics = train_classifier(loaded, splits, config, device, session.bus, control or RunControl(run_dir))
        save_model(out, loaded, {"data": data, "accuracy": {"top1": metrics["top1"], "top5": metrics["top5"]}})
        summary = {"model_dir": str(out), "model": loaded.spec.name, "data": data, **metrics}
        summary = session.end(summary)
    return summary

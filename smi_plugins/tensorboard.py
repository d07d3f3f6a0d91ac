"""The built-in ``tensorboard`` event sink (``--sink tensorboard``): every loss term, kept
patches, throughput, GPU readings and the preview images of a run, written with torch's
``SummaryWriter`` into ``RUN_DIR/tensorboard``. Needs the ``tensorboard`` package
(``pip install 'smi-toolkit[tensorboard]'``); then ``tensorboard --logdir RUN_DIR``.

Options (``--sink-option tensorboard.KEY=VALUE``): ``every=N`` writes the scalars of every Nth
iteration or training step only (a long run's log stays small; batch and epoch results are
always written), ``images=false`` leaves the previews out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smi_engine import SmiError, hookimpl

LOG_FOLDER = "tensorboard"


class TensorBoardSink:
    def __init__(self, run_dir: str | Path, config: dict[str, Any], every: int = 1, images: bool = True):
        if every < 1:
            raise SmiError(f"--sink-option tensorboard.every={every} is below 1: pass e.g. tensorboard.every=10")
        self.every, self.images = every, images
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SmiError("--sink tensorboard needs the tensorboard package: pip install 'smi-toolkit[tensorboard]'") from None
        self.run_dir = Path(run_dir)
        # global step of an inversion = batch * iterations + iteration (distill --synthesize: its batches)
        self.iterations = int(config.get("iterations") or (config.get("synthesize") or {}).get("iterations") or 0)
        self.open_writer, self._writer = SummaryWriter, None

    @property
    def writer(self):
        """Opened with the first event: the sink is built before the run claims its directory."""
        if self._writer is None:
            self._writer = self.open_writer(log_dir=str(self.run_dir / LOG_FOLDER))
        return self._writer

    def _step(self, event: dict[str, Any]) -> int:
        return event.get("batch", 0) * self.iterations + event.get("iteration", 0)

    def __call__(self, event: dict[str, Any]) -> None:
        kind, add = event["event"], self.writer.add_scalar
        if kind == "iteration":
            step = self._step(event)
            if step % self.every:
                return
            for name, value in event["losses"].items():
                add(f"loss/{name}", value, step)
            add("patches/kept", event["kept"], step)
            add("throughput/iterations_per_s", 1.0 / max(event["seconds"], 1e-9), step)
            add("throughput/images_per_s", event["images_per_s"], step)
            add("throughput/tokens_per_s", event["tokens_per_s"], step)
            for name, value in (event.get("gpu") or {}).items():
                add(f"gpu/{name}", value, step)
        elif kind == "preview" and self.images:
            with Image.open(self.run_dir / event["path"]) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"preview/batch-{event['batch']:05d}", pixels, self._step(event), dataformats="HWC")
        elif kind == "batch_end":
            add("batch/teacher_accuracy", event["teacher_accuracy"], event["batch"])
        elif kind == "train_step" and event["done_steps"] % self.every == 0:
            add("train/loss", event["loss"], event["done_steps"])
        elif kind == "epoch_end":
            add("val/top1", event["val_top1"], event["epoch"])
            add("val/top5", event["val_top5"], event["epoch"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@hookimpl
def register_event_sinks(register):
    register("tensorboard", TensorBoardSink)

"""The inversion loop: DeepInversion-style optimisation of pixels, with sparse stopping (SMI).

The optimised variable is the set of patches still being inverted, ``(B, K, C*ph*pw)``; the
patches already stopped sit frozen in a full ``store``. Each iteration materialises the image,
jitters/flips it, feeds the teacher only the kept patches (embedded one by one, position
embeddings remapped through the jitter) and steps Adam on the kept patches alone. At a stop,
the selection policy (``smi_engine.inversion.selection``) picks ``ratio`` of the kept patches to leave the
optimised set for good, optimiser state included: SMI's rule drops the least attended by the last
block's CLS attention; Patch Rebirth emits the most attended as an image of their own, so one
trajectory of B images yields B images per stop plus its B final ones. Dense inversion is the same
loop with an empty schedule. Loss values reach the host once per reporting window.

``Inverter`` holds what a run shares across its batches (teacher, losses, selection, schedule,
previews, checkpoint writing); ``BatchRun`` (``batch``) owns one batch's state and advances it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from smi_engine.errors import SmiError
from smi_engine.inversion.batch import BatchResult, BatchRun
from smi_engine.inversion.config import PRECISIONS, InversionConfig, config_digest, parse_targets
from smi_engine.inversion.losses import InversionContext, LossSpec, LossState, as_terms, loss_origin
from smi_engine.inversion.preview import save_preview
from smi_engine.inversion.selection import build_selection
from smi_engine.models import LoadedModel
from smi_engine.runs.control import RunControl
from smi_engine.runs.events import EventBus
from smi_engine.runs.rundir import RunDir
from smi_engine.vit.augment import Jitter
from smi_engine.vit.sparse_image import SparseImage
from smi_engine.vit.sparse_vit import SparseViT


class Inverter:
    """Inverts batches of a frozen teacher; one instance per run."""

    def __init__(
        self,
        config: InversionConfig,
        loaded: LoadedModel,
        losses: list[tuple[LossSpec, Any]],
        device: torch.device,
        bus: EventBus | None = None,
        run_dir: RunDir | None = None,
        control: RunControl | None = None,
    ):
        config.validate()
        self.config, self.loaded, self.device = config, loaded, device
        self.vit = SparseViT(loaded.model, config.attention)
        self.grid = self.vit.grid
        config.schedule.validate(config.iterations, self.grid.num_patches)
        self.schedule = config.schedule.resolved(config.iterations)
        self.kept_per_stage = self.schedule.kept_patches(self.grid.num_patches)
        if config.compile:  # per stage a training graph, and the no-grad final pass
            self.vit.compile(graphs=2 * (len(self.schedule.stops) + 1))
        if not self.schedule.is_dense:
            self.vit.check_scorable()
        self.stops = {s.iteration: s.ratio for s in self.schedule.stops}
        self.selection = build_selection(config.selection)
        if config.final_mask == "rescored" and (self.selection.leaving != "drop" or not self.selection.keeps_remaining):
            raise SmiError(f"--final-mask rescored re-scores the patches inverted to the end; selection "
                           f"{config.selection.name!r} keeps other patches in images: use --final-mask inverted")
        if not self.patches_per_image:
            raise SmiError(f"selection {config.selection.name!r} emits at stops and keeps no final image, and "
                           f"schedule {self.schedule} has no stops: no image would be made; give a schedule with stops")
        parse_targets(config.targets, loaded.num_classes)
        self.losses = losses
        trainers = [spec.name for spec, loss in losses if hasattr(loss, "after_backward")]
        if config.precision == "fp16" and trainers:
            raise SmiError(f"--precision fp16 scales the loss, and loss {trainers[0]!r} trains on its gradients after "
                           "each backward: use --precision bf16")
        self.needs_attention_outputs = any("attention_outputs" in getattr(l, "requires", ()) for _, l in losses)
        self.bus = bus or EventBus()
        self.run_dir = run_dir
        self.control = control or RunControl(run_dir)
        low, high = loaded.normalizer.bounds()
        # Per-element clamp bounds of a patch vector (C, ph, pw) flattened.
        per_pixel = self.grid.patch_h * self.grid.patch_w
        self.low = low.repeat_interleave(per_pixel).to(device)
        self.high = high.repeat_interleave(per_pixel).to(device)
        context = InversionContext(self.vit, loaded, device, config.batch_size, config.iterations)
        for _, loss in losses:
            setup = getattr(loss, "setup", None)
            if setup is not None:
                setup(context)

    # -- one batch ----------------------------------------------------------------------------
    def invert_batch(self, batch: int, checkpoint: dict[str, Any] | None = None) -> BatchResult:
        run = self.start_batch(batch, checkpoint)
        while run.step():
            pass
        return run.finish()

    def start_batch(self, batch: int, checkpoint: dict[str, Any] | None = None) -> BatchRun:
        """A batch that advances one iteration per ``step()`` (``invert_batch`` runs it through)."""
        return BatchRun(self, batch, checkpoint)

    def autocast(self):
        """The teacher's forward at the run's precision (a no-op at fp32)."""
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def stage(self, iteration: int) -> int:
        return sum(1 for s in self.schedule.stops if s.iteration <= iteration)

    def forward(self, batch: int, it: int, image: SparseImage, jitter: Jitter, targets: torch.Tensor,
                 param: torch.Tensor | None = None) -> LossState:
        param = image.param if param is None else param
        tokens, positions = image.tokens(jitter, param)
        with self.autocast():
            output = self.vit.forward(tokens, positions, attention_outputs=self.needs_attention_outputs)
        return LossState(
            image=image, param=param, jitter=jitter, tokens=tokens, positions=positions, output=output,
            targets=targets, teacher=self.vit, normalizer=self.loaded.normalizer, iteration=it,
            iterations=self.config.iterations, batch=batch,
        )

    def loss(self, state: LossState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted terms and their sum; their finiteness is checked when the values reach
        the host (``BatchRun``), so that the loop need not wait for the device here."""
        named: dict[str, torch.Tensor] = {}
        for spec, loss in self.losses:
            try:
                with self.autocast():
                    result = loss(state)
            except SmiError:
                raise
            except Exception as exc:  # a plugin's bug: name the loss and its plugin, in one line
                raise SmiError(f"loss {spec.name!r} ({loss_origin(spec.name)}) failed at iteration {state.iteration}: "
                               f"{type(exc).__name__}: {str(exc).strip()[:160]}; fix it or drop --loss {spec.name} "
                               "(an inversion then continues with --resume)") from None
            for key, value in as_terms(spec.name, result).items():
                named[key] = spec.weight * value
        if not named:
            raise SmiError("the losses returned no terms: check their weights")
        named = {key: value.float() for key, value in named.items()}
        return torch.stack(list(named.values())).sum(), named

    def score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.vit.cls_attention(patches, positions).float()

    @property
    def final_image(self) -> bool:
        """Whether a trajectory ends in an image (the patches inverted to the end, or frozen ones)."""
        return self.selection.keeps_remaining or self.selection.leaving == "freeze"

    @property
    def patches_per_image(self) -> list[int]:
        """Patches in each image a trajectory makes, in pool order (emitted ones, then the final one)."""
        n, kept = self.grid.num_patches, self.kept_per_stage
        emitted = [a - b for a, b in zip(kept, kept[1:])] if self.selection.leaving == "emit" else []
        if not self.final_image:
            return emitted
        if self.config.final_mask == "rescored" and not self.schedule.is_dense:
            remaining = math.prod(1.0 - stop.ratio for stop in self.schedule.stops)
            return [max(1, min(n, int((n + 1) * remaining)))]
        frozen = n - kept[-1] if self.selection.leaving == "freeze" else 0
        return [*emitted, kept[-1] * self.selection.keeps_remaining + frozen]

    @property
    def images_per_trajectory(self) -> int:
        return len(self.patches_per_image)

    def rescore(self, patches: torch.Tensor) -> torch.Tensor:
        """The seed's final mask: (B, K) cells of the top patches of the whole final image."""
        positions = torch.arange(self.grid.num_patches, device=patches.device).expand(len(patches), -1)
        scores = self.score(patches, positions)
        return scores.topk(self.patches_per_image[-1], dim=1).indices.sort(dim=1).values

    def save_preview(self, batch: int, it: int, pixels: torch.Tensor, keep: torch.Tensor) -> None:
        if self.run_dir is None:
            return
        name = f"batch-{batch:05d}-it{it:05d}.png"
        save_preview(self.run_dir.previews / name, pixels, keep, self.loaded.normalizer, self.grid)
        self.bus.emit("preview", batch=batch, iteration=it, path=f"previews/{name}")

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        """Write a batch's checkpoint (``BatchRun.save_checkpoint``) with the run's own state: the
        losses' and the config digest a resume checks."""
        data["losses"] = {spec.name: loss.state_dict() for spec, loss in self.losses if hasattr(loss, "state_dict")}
        data["config_digest"] = config_digest(self.config)
        with self.control.saving_state():
            self.run_dir.save_checkpoint(data, self.bus.rank)

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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smi_engine.vit.augment import Jitter
from smi_engine.checks import at_least, number, positive
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus
from smi_engine.inversion.losses import InversionContext, LossSpec, LossState, as_terms, loss_origin
from smi_engine.models import LoadedModel, ModelSpec, Normalizer
from smi_engine.inversion.preview import save_preview
from smi_engine.runtime.resources import MemoryProbe
from smi_engine.runs.rundir import RunDir
from smi_engine.vit.patches import PatchGrid
from smi_engine.pool import Pool
from smi_engine.inversion.schedule import Schedule
from smi_engine.inversion.selection import SelectionSpec, StopContext, build_selection, checked_choice, remaining_positions
from smi_engine.vit.sparse_image import SparseImage
from smi_engine.vit.sparse_vit import SparseViT

DEFAULT_LOSSES = (LossSpec("deepinversion"),)
#: What the pool's keep mask holds: the patches inverted to the end, or (the seed's) the top
#: patches re-scored on the final image, as many as the seed counts: int((N + 1) * prod(1 - r)),
#: its N + 1 counting the class token, so one more than were inverted at the seed's schedule.
FINAL_MASKS = ("inverted", "rescored")
#: The teacher's forward and backward under autocast; pixels and Adam state stay fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: On CUDA, iterations whose loss values are fetched together: one host sync per window, not
#: per iteration (on CPU there is nothing to overlap, so every iteration reports at once).
CUDA_EVENT_WINDOW = 16
PHASES = ("forward", "backward", "optimizer", "reporting")
#: More batches than any run makes (a million batches of one image take days on a GPU); the run
#: plans its batches up front, so an absurd count is refused rather than built.
MAX_BATCHES = 10**6


@dataclass
class InversionConfig:
    """A fully resolved inversion run (what ``config.json`` stores)."""

    model: ModelSpec
    schedule: Schedule = field(default_factory=Schedule)  # a str is parsed: the type holds from the edge in
    iterations: int = 4000
    batch_size: int = 32
    batches: int = 1
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    losses: list[LossSpec] = field(default_factory=lambda: list(DEFAULT_LOSSES))
    targets: str = "balanced"
    seed: int = 0
    jitter: float = 0.125
    flip: bool = True
    attention: str = "fused"
    jitter_at_stops: bool = True  # False: the seed's un-augmented steps just before and at each stop
    final_mask: str = "inverted"
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    precision: str = "fp32"
    compile: bool = False
    checkpoint_every: float = 60.0
    sinks: list[str] = field(default_factory=list)
    teacher_sha256: str | None = None  # of the teacher's weights file when the run started: --resume checks it

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            self.schedule = Schedule.parse(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["schedule"] = str(self.schedule)
        data["model"] = self.model.to_dict()
        data["losses"] = [spec.to_dict() for spec in self.losses]
        data["betas"] = list(self.betas)
        data["selection"] = self.selection.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InversionConfig":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["model"] = ModelSpec.from_dict(data["model"])
        fields["losses"] = [LossSpec.from_dict(d) for d in data.get("losses", [])]
        fields["betas"] = tuple(data.get("betas", (0.5, 0.99)))
        fields["selection"] = SelectionSpec.from_dict(data.get("selection"))
        return cls(**fields)

    def validate(self) -> None:
        at_least("--iterations", self.iterations, 1, 4000)
        at_least("--batch-size", self.batch_size, 1, 32)
        number("--batches", self.batches, 8, low=1, high=MAX_BATCHES, integer=True)
        number("--seed", self.seed, 0, low=0, high=2**63 - 1, integer=True)  # what a torch generator takes
        positive("--lr", self.lr, 0.25)
        for beta in self.betas:
            number("Adam beta", beta, 0.9, low=0, high=1, exclusive="high")
        number("--jitter", self.jitter, 0.125, low=0, high=1, exclusive="high")
        number("--checkpoint-every", self.checkpoint_every, 60, low=0)
        if not self.losses:
            raise SmiError("no loss to optimise: pass at least one --loss, e.g. --loss deepinversion")
        for spec in self.losses:
            spec.validate()
        if self.precision not in PRECISIONS:
            raise SmiError(f"unknown --precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.final_mask not in FINAL_MASKS:
            raise SmiError(f"unknown --final-mask {self.final_mask!r}: use {' or '.join(FINAL_MASKS)}")


def config_digest(config: InversionConfig) -> str:
    """What a checkpoint was made under: every setting but those a resume may change freely."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_every", "sinks")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """Each batch has its own random stream, so a batch's result never depends on which other
    batches ran before it, on resume or on how batches are spread over processes."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def parse_targets(spec: str, num_classes: int) -> list[int] | None:
    """The class list of ``--targets 3,5,7`` (None for ``balanced`` and ``random``), checked."""
    if spec in ("balanced", "random"):
        return None
    try:
        chosen = [int(v) for v in spec.split(",")]
    except ValueError:
        raise SmiError(f"bad --targets {spec!r}: use balanced, random, or class indices like 1,5,7") from None
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise SmiError(f"--targets class {bad[0]} is outside 0..{num_classes - 1}: the teacher has {num_classes} classes")
    return chosen


def make_targets(spec: str, batch: int, batch_size: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``balanced`` cycles through the classes across batches; ``random``; or ``3,5,7`` cycled."""
    chosen = parse_targets(spec, num_classes)
    if spec == "balanced":
        labels = (torch.arange(batch_size) + batch * batch_size) % num_classes
    elif spec == "random":
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    else:
        labels = torch.tensor(chosen * math.ceil(batch_size / len(chosen)))[:batch_size]
    return labels.sort().values


@dataclass
class Emission:
    """The images one stop of an emitting selection made: the patches that left, as they left."""

    iteration: int
    images: torch.Tensor  # (B, C, H, W) on CPU: the whole trajectory then; ``keep`` says what is in the image
    keep: torch.Tensor  # (B, rows, cols) bool
    correct: torch.Tensor  # (B,) bool: the teacher's top-1 on the image's own patches is its label

    def to_checkpoint(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "images": self.images, "keep": self.keep, "correct": self.correct}

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> "Emission":
        return cls(int(data["iteration"]), data["images"], data["keep"], data["correct"])


@dataclass
class BatchResult:
    """Every image one batch of trajectories made, grouped by emission (each stop's images in
    order, then the final ones): image ``e * B + i`` comes from trajectory ``i``."""

    batch: int
    images: torch.Tensor  # (E*B, C, H, W) normalised, on CPU
    labels: torch.Tensor
    keep: torch.Tensor  # (E*B, rows, cols) bool
    trajectory: torch.Tensor  # (E*B,) the run-wide index of the trajectory each image comes from
    emitted_at: torch.Tensor  # (E*B,) the iteration each image was made at (the run's length: the final ones)
    seconds: float
    best_loss: float
    losses: dict[str, float]  # last iteration's terms
    teacher_accuracy: float
    stage_seconds: list[float]  # wall time spent in each schedule stage
    stage_iterations: list[int]

    def pool(self, normalizer: Normalizer | None = None) -> Pool:
        """The batch's images as a pool; ``normalizer``: the teacher's, which they are stored in."""
        return Pool(self.images, self.labels, self.keep, self.trajectory, self.emitted_at, normalizer)


def _adam(param: torch.Tensor, lr: float, betas) -> torch.optim.Adam:
    # The fused kernel does the whole update in one pass (2-3x faster on CPU); same maths.
    return torch.optim.Adam([param], lr=lr, betas=betas, fused=param.device.type in ("cpu", "cuda"))


class BatchState:
    """The mutable state of one batch; ``to_checkpoint`` captures all of it."""

    def __init__(self, image: SparseImage, lr: float, betas: tuple[float, float], dropped: torch.Tensor | None = None):
        self.image = image
        # (B, N) patches that left the optimised set and the final image with it.
        self.dropped = torch.zeros_like(image.store[..., 0], dtype=torch.bool) if dropped is None else dropped
        self.emitted: list[Emission] = []
        self.optimizer = _adam(image.param, lr, betas)
        self.iteration = 0
        self.best_loss = torch.tensor(math.inf, device=image.param.device)  # on the device: no sync to compare
        self.best_param: torch.Tensor | None = None
        self.elapsed = 0.0
        self.stage_seconds: list[float] = []
        self.stage_iterations: list[int] = []

    def shrink(self, selected: torch.Tensor) -> None:
        """Stop all kept patches but ``selected`` (B, K'); Adam's moments follow their patches."""
        old_param, defaults = self.image.param, self.optimizer.defaults
        old = self.optimizer.state.get(old_param, {})
        self.image.shrink(selected)
        self.optimizer = _adam(self.image.param, defaults["lr"], defaults["betas"])
        if old:
            index = selected.unsqueeze(-1).expand(-1, -1, old_param.shape[-1])
            self.optimizer.state[self.image.param] = {
                "step": old["step"].clone(),
                "exp_avg": old["exp_avg"].gather(1, index),
                "exp_avg_sq": old["exp_avg_sq"].gather(1, index),
            }
        self.forget_best()  # losses over fewer tokens are not comparable

    def forget_best(self) -> None:
        self.best_loss, self.best_param = torch.full_like(self.best_loss, math.inf), None

    def track_best(self, total: torch.Tensor) -> None:
        """Remember the patches of the lowest loss so far, without leaving the device."""
        total, param = total.detach().float(), self.image.param.detach()
        better = total < self.best_loss
        self.best_loss = torch.where(better, total, self.best_loss)
        self.best_param = param.clone() if self.best_param is None else torch.where(better, param, self.best_param)

    def to_checkpoint(self) -> dict[str, Any]:
        adam = self.optimizer.state.get(self.image.param, {})
        return {
            "iteration": self.iteration,
            "store": self.image.store.cpu(),
            "kept": self.image.kept.cpu(),
            "dropped": self.dropped.cpu(),
            "emitted": [emission.to_checkpoint() for emission in self.emitted],
            "param": self.image.param.detach().cpu(),
            "adam": {k: v.cpu() for k, v in adam.items()},
            "best_loss": float(self.best_loss),
            "best_param": None if self.best_param is None else self.best_param.cpu(),
            "elapsed": self.elapsed,
            "stage_seconds": list(self.stage_seconds),
            "stage_iterations": list(self.stage_iterations),
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], grid: PatchGrid, device: torch.device, lr: float, betas) -> "BatchState":
        image = SparseImage(grid, data["store"].to(device), data["kept"].to(device), data["param"].to(device))
        # Checkpoints from before selection policies: every patch that left was dropped (smi).
        dropped = data.get("dropped")
        dropped = ~image.keep_mask().flatten(1) if dropped is None else dropped.to(device)
        state = cls(image, lr, betas, dropped)
        state.emitted = [Emission.from_checkpoint(e) for e in data.get("emitted", [])]
        if data["adam"]:
            state.optimizer.state[image.param] = {k: v.to(device) for k, v in data["adam"].items()}
        state.iteration = int(data["iteration"])
        state.best_loss = torch.tensor(float(data["best_loss"]), device=device)
        state.best_param = None if data["best_param"] is None else data["best_param"].to(device)
        state.elapsed = float(data["elapsed"])
        state.stage_seconds = list(data["stage_seconds"])
        state.stage_iterations = list(data["stage_iterations"])
        return state


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

    def start_batch(self, batch: int, checkpoint: dict[str, Any] | None = None) -> "BatchRun":
        """A batch that advances one iteration per ``step()`` (``invert_batch`` runs it through)."""
        return BatchRun(self, batch, checkpoint)

    def autocast(self):
        """The teacher's forward at the run's precision (a no-op at fp32)."""
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _stage(self, iteration: int) -> int:
        return sum(1 for s in self.schedule.stops if s.iteration <= iteration)

    def _forward(self, batch: int, it: int, image: SparseImage, jitter: Jitter, targets: torch.Tensor,
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

    def _loss(self, state: LossState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def _stop(self, batch: int, it: int, state: BatchState, generator: torch.Generator, targets: torch.Tensor) -> None:
        image = state.image
        width = image.kept.shape[1]
        count = self.kept_per_stage[self._stage(it)]
        stop = StopContext(iteration=it, ratio=self.stops[it], leaving=width - count, kept=image.kept, grid=self.grid,
                           generator=generator, score=lambda: self._score(image.param.detach(), image.kept))
        leaving = checked_choice(self.selection, self.config.selection.name, stop).sort(dim=1).values
        cells = image.kept.gather(1, leaving)  # sorted, as ``kept`` is
        emission = self._emit(it, image, leaving, cells, targets) if self.selection.leaving == "emit" else None
        if self.selection.leaving != "freeze":
            state.dropped.scatter_(1, cells, True)
        state.shrink(remaining_positions(leaving, width))
        self.bus.emit("stop", batch=batch, iteration=it, ratio=self.stops[it], kept=count, kept_indices=image.kept.tolist(),
                      in_image=self._in_image(state).flatten(1).sum(1).tolist())
        if emission is None:
            self._preview(batch, it, state)
        else:
            state.emitted.append(emission)
            self._save_preview(batch, it, emission.images, emission.keep)

    def _emit(self, it: int, image: SparseImage, leaving: torch.Tensor, cells: torch.Tensor,
              targets: torch.Tensor) -> Emission:
        """The image the patches leaving now make, scored by the teacher on those patches alone."""
        with torch.no_grad():
            patches = image.param.detach().gather(1, leaving.unsqueeze(-1).expand(-1, -1, image.param.shape[-1]))
            with self.autocast():
                logits = self.vit.forward(patches, cells).logits
            pixels = image.images(image.param.detach())
        return Emission(it, pixels.cpu(), self.grid.mask_from_indices(cells).cpu(), (logits.argmax(1) == targets).cpu())

    def _score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.vit.cls_attention(patches, positions).float()

    def _in_image(self, state: BatchState) -> torch.Tensor:
        """(B, rows, cols) the patches the final image will hold, as decided so far."""
        present = ~state.dropped
        if not self.selection.keeps_remaining:
            present = present & ~state.image.keep_mask().flatten(1)
        return present.view(-1, self.grid.rows, self.grid.cols)

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

    def _rescore(self, patches: torch.Tensor) -> torch.Tensor:
        """The seed's final mask: (B, K) cells of the top patches of the whole final image."""
        positions = torch.arange(self.grid.num_patches, device=patches.device).expand(len(patches), -1)
        scores = self._score(patches, positions)
        return scores.topk(self.patches_per_image[-1], dim=1).indices.sort(dim=1).values

    def _preview(self, batch: int, it: int, state: BatchState, param: torch.Tensor | None = None) -> None:
        """A PNG of the batch, greying the patches that will not be in the final image."""
        if self.run_dir is None:
            return
        with torch.no_grad():
            pixels = state.image.images(param)
        self._save_preview(batch, it, pixels, self._in_image(state))

    def _save_preview(self, batch: int, it: int, pixels: torch.Tensor, keep: torch.Tensor) -> None:
        if self.run_dir is None:
            return
        name = f"batch-{batch:05d}-it{it:05d}.png"
        save_preview(self.run_dir.previews / name, pixels, keep, self.loaded.normalizer, self.grid)
        self.bus.emit("preview", batch=batch, iteration=it, path=f"previews/{name}")

    def _save_checkpoint(self, batch: int, state: BatchState, generator: torch.Generator,
                         scaler: torch.amp.GradScaler) -> None:
        if self.run_dir is None:
            return
        data = state.to_checkpoint()
        data["grad_scaler"] = scaler.state_dict() if scaler.is_enabled() else None
        data["batch"] = batch
        data["generator"] = generator.get_state()
        data["losses"] = {spec.name: loss.state_dict() for spec, loss in self.losses if hasattr(loss, "state_dict")}
        data["config_digest"] = config_digest(self.config)
        with self.control.saving_state():
            self.run_dir.save_checkpoint(data, self.bus.rank)

    def _finish(self, batch: int, state: BatchState, targets: torch.Tensor, terms: dict[str, float]) -> BatchResult:
        image = state.image
        best = image.param.detach() if state.best_param is None else state.best_param
        with torch.no_grad():
            final = self._forward(batch, self.config.iterations, image, Jitter(), targets, param=best)
            logits = final.logits
            for _, loss in self.losses:
                end_batch = getattr(loss, "end_batch", None)
                if end_batch is not None:
                    end_batch(final)
            images, keep = final.images, self._in_image(state)
            if self.config.final_mask == "rescored" and not self.schedule.is_dense:
                kept = self._rescore(image.patches(best))
                keep = self.grid.mask_from_indices(kept)
                patches = self.grid.patchify(images).gather(1, kept.unsqueeze(-1).expand(-1, -1, self.grid.patch_dim))
                with self.autocast():
                    logits = self.vit.forward(patches, kept).logits
            final_correct = (logits.argmax(1) == targets).cpu()
        self._preview(batch, self.config.iterations, state, best)
        parts = list(state.emitted)
        if self.final_image:
            parts.append(Emission(self.config.iterations, images.cpu(), keep.cpu(), final_correct))
        correct = torch.cat([p.correct for p in parts])
        return BatchResult(
            batch=batch, images=torch.cat([p.images for p in parts]), labels=targets.cpu().repeat(len(parts)),
            keep=torch.cat([p.keep for p in parts]),
            trajectory=(torch.arange(len(targets)) + batch * len(targets)).repeat(len(parts)),
            emitted_at=torch.tensor([p.iteration for p in parts]).repeat_interleave(len(targets)),
            seconds=state.elapsed, best_loss=float(state.best_loss), losses=terms,
            teacher_accuracy=float(correct.float().mean()),
            stage_seconds=state.stage_seconds, stage_iterations=state.stage_iterations,
        )


class BatchRun:
    """One batch under inversion, advanced an iteration at a time."""

    def __init__(self, inverter: Inverter, batch: int, checkpoint: dict[str, Any] | None = None):
        inv, cfg, grid = inverter, inverter.config, inverter.grid
        self.inverter, self.batch = inverter, batch
        self.generator = batch_generator(cfg.seed, batch)
        self.targets = make_targets(cfg.targets, batch, cfg.batch_size, inv.loaded.num_classes, self.generator).to(inv.device)
        noise = torch.randn(cfg.batch_size, grid.channels, grid.height, grid.width, generator=self.generator)
        # fp16 gradients of small pixel updates underflow without loss scaling; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(inv.device.type, enabled=cfg.precision == "fp16")
        if checkpoint is None:
            kept = torch.arange(grid.num_patches, device=inv.device).expand(cfg.batch_size, -1).clone()
            self.state = BatchState(SparseImage(grid, grid.patchify(noise).to(inv.device), kept), cfg.lr, cfg.betas)
            inv.bus.emit("batch_start", batch=batch, iterations=cfg.iterations, num_patches=grid.num_patches,
                         stop_iterations=[s.iteration for s in inv.schedule.stops],
                         kept_per_stage=inv.kept_per_stage,
                         prefix_tokens=inv.vit.num_prefix_tokens, width=inv.vit.width, targets=self.targets.tolist())
        else:
            self.state = BatchState.from_checkpoint(checkpoint, grid, inv.device, cfg.lr, cfg.betas)
            self.generator.set_state(checkpoint["generator"])
            if checkpoint.get("grad_scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint["grad_scaler"])
            for spec, loss in inv.losses:
                if hasattr(loss, "load_state_dict") and spec.name in checkpoint.get("losses", {}):
                    loss.load_state_dict(checkpoint["losses"][spec.name])
            inv.bus.emit("batch_resumed", batch=batch, iteration=self.state.iteration)
        self.last_saved = time.monotonic()
        self.terms: dict[str, float] = {}
        self.memory = MemoryProbe(inv.device)
        self.window = CUDA_EVENT_WINDOW if inv.device.type == "cuda" else 1
        self.pending: list[tuple[int, torch.Tensor, list[str]]] = []  # iterations whose values are on the device
        self.window_started = 0.0
        #: Seconds per stage and phase of the iterations run so far (forward with the losses and
        #: any stop, backward, optimiser step with clamping, reporting) when ``profile`` is on;
        #: CPU timings (on CUDA they would need a sync per phase, which changes what they measure).
        self.profile = False
        self.phase_seconds: list[dict[str, float]] = [dict.fromkeys(PHASES, 0.0) for _ in range(len(inv.schedule.stops) + 1)]

    @property
    def done(self) -> bool:
        return self.state.iteration >= self.inverter.config.iterations

    def step(self) -> bool:
        """Run one iteration; False once the batch has run all its iterations."""
        if self.done:
            return False
        inv, cfg, state = self.inverter, self.inverter.config, self.state
        it = state.iteration
        if inv.control.should_stop():
            self._report()
            inv._save_checkpoint(self.batch, state, self.generator, self.scaler)
            raise RunInterrupted(f"stopped at batch {self.batch + 1}, iteration {it}", self.batch, it)  # 1-based, as shown
        if not self.pending:
            self.window_started = time.perf_counter()
        clock, stage = self.window_started, inv._stage(it)
        if it in inv.stops:
            inv._stop(self.batch, it, state, self.generator, self.targets)
        if cfg.jitter_at_stops or (it not in inv.stops and it + 1 not in inv.stops):
            jitter = Jitter.sample(inv.grid, cfg.jitter, cfg.flip, self.generator)
        else:  # the seed steps on the plain image just before and at each stop
            jitter = Jitter()
        total, named = inv._loss(inv._forward(self.batch, it, state.image, jitter, self.targets))
        clock = self._lap(stage, "forward", clock)
        state.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for _, loss in inv.losses:
            after = getattr(loss, "after_backward", None)
            if after is not None:
                after()
        clock = self._lap(stage, "backward", clock)
        if stage == len(inv.schedule.stops):
            state.track_best(total)
        self.scaler.step(state.optimizer)
        self.scaler.update()
        with torch.no_grad():
            state.image.param.clamp_(inv.low, inv.high)
        self._lap(stage, "optimizer", clock)
        self.pending.append((it, torch.stack([total.detach(), *named.values()]), list(named)))
        state.iteration += 1
        checkpoint_due = inv.run_dir is not None and 0 < cfg.checkpoint_every < time.monotonic() - self.last_saved
        if len(self.pending) >= self.window or self.done or state.iteration in inv.stops or checkpoint_due:
            self._report()
        if checkpoint_due:
            inv._save_checkpoint(self.batch, state, self.generator, self.scaler)
            self.last_saved = time.monotonic()
        return not self.done

    def _lap(self, stage: int, phase: str, since: float) -> float:
        if not self.profile:
            return since
        now = time.perf_counter()
        self.phase_seconds[stage][phase] += now - since
        return now

    def _report(self) -> None:
        """Fetch the pending iterations' loss values in one transfer, check them, account their
        time to the stage and emit their events."""
        if not self.pending:
            return
        inv, cfg, state = self.inverter, self.inverter.config, self.state
        rows = torch.stack([values for _, values, _ in self.pending]).tolist()  # the one device sync
        ended = time.perf_counter()
        seconds = (ended - self.window_started) / len(self.pending)
        stage = inv._stage(self.pending[0][0])
        while len(state.stage_seconds) <= stage:
            state.stage_seconds.append(0.0)
            state.stage_iterations.append(0)
        kept, prefix = state.image.kept.shape[1], inv.vit.num_prefix_tokens
        for (it, _, names), row in zip(self.pending, rows):
            if not all(math.isfinite(v) for v in row):
                values = dict(zip(names, row[1:]))
                # Finite terms can still overflow their sum: then the total is what to name.
                bad = next((n for n, v in values.items() if not math.isfinite(v)), "total")
                raise SmiError(f"loss term {bad!r} became {values.get(bad, row[0])} at iteration {it}: "
                               "lower --lr or that term's weight")
            state.elapsed += seconds
            state.stage_seconds[stage] += seconds
            state.stage_iterations[stage] += 1
            self.terms = {"total": row[0], **dict(zip(names, row[1:]))}
            inv.bus.emit(
                "iteration", batch=self.batch, iteration=it, losses=self.terms, kept=kept, tokens=kept + prefix,
                seconds=seconds, images_per_s=cfg.batch_size / seconds,
                tokens_per_s=cfg.batch_size * (kept + prefix) / seconds, **self.memory.read(),
            )
        self.pending.clear()
        reporting = time.perf_counter() - ended  # part of the run's time, not of any one iteration's
        state.elapsed += reporting
        state.stage_seconds[stage] += reporting
        if self.profile:
            self.phase_seconds[stage]["reporting"] += reporting

    def finish(self) -> BatchResult:
        self._report()
        started = time.perf_counter()
        result = self.inverter._finish(self.batch, self.state, self.targets, self.terms)
        result.seconds += time.perf_counter() - started
        return result

"""One batch of trajectories under inversion: its state (pixels, Adam, what has left and
been emitted), advanced an iteration at a time by ``BatchRun``, and what it makes
(``BatchResult``). The run-wide parts (teacher, losses, selection, previews) are the
``Inverter``'s, which ``BatchRun`` uses through its public methods; everything that takes the
batch's state lives here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smi_engine.inversion.config import parse_targets
from smi_engine.inversion.selection import StopContext, checked_choice, remaining_positions
from smi_engine.models import Normalizer
from smi_engine.pool import Pool
from smi_engine.runs.control import RunInterrupted
from smi_engine.errors import SmiError
from smi_engine.runtime.resources import MemoryProbe
from smi_engine.vit.augment import Jitter
from smi_engine.vit.patches import PatchGrid
from smi_engine.vit.sparse_image import SparseImage

if TYPE_CHECKING:
    from smi_engine.inversion.loop import Inverter

#: On CUDA, iterations whose loss values are fetched together: one host sync per window, not
#: per iteration (on CPU there is nothing to overlap, so every iteration reports at once).
CUDA_EVENT_WINDOW = 16
PHASES = ("forward", "backward", "optimizer", "reporting")


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """Each batch has its own random stream, so a batch's result never depends on which other
    batches ran before it, on resume or on how batches are spread over processes."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


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

    def in_image(self, keeps_remaining: bool) -> torch.Tensor:
        """(B, rows, cols) the patches the final image will hold, as decided so far: all but
        those dropped, and without the ones still optimised where the policy keeps none of them."""
        present = ~self.dropped
        if not keeps_remaining:
            present = present & ~self.image.keep_mask().flatten(1)
        grid = self.image.grid
        return present.view(-1, grid.rows, grid.cols)

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
            self.save_checkpoint()
            raise RunInterrupted(f"stopped at batch {self.batch + 1}, iteration {it}", self.batch, it)  # 1-based, as shown
        if not self.pending:
            self.window_started = time.perf_counter()
        clock, stage = self.window_started, inv.stage(it)
        if it in inv.stops:
            self._stop(it)
        if cfg.jitter_at_stops or (it not in inv.stops and it + 1 not in inv.stops):
            jitter = Jitter.sample(inv.grid, cfg.jitter, cfg.flip, self.generator)
        else:  # the seed steps on the plain image just before and at each stop
            jitter = Jitter()
        total, named = inv.loss(inv.forward(self.batch, it, state.image, jitter, self.targets))
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
            self.save_checkpoint()
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
        stage = inv.stage(self.pending[0][0])
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

    # -- stops, previews, checkpoints -----------------------------------------------------------
    def _stop(self, it: int) -> None:
        """Ask the selection which kept patches leave now, and send them where it says."""
        inv, state = self.inverter, self.state
        image = state.image
        width = image.kept.shape[1]
        count = inv.kept_per_stage[inv.stage(it)]
        stop = StopContext(iteration=it, ratio=inv.stops[it], leaving=width - count, kept=image.kept, grid=inv.grid,
                           generator=self.generator, score=lambda: inv.score(image.param.detach(), image.kept))
        leaving = checked_choice(inv.selection, inv.config.selection.name, stop).sort(dim=1).values
        cells = image.kept.gather(1, leaving)  # sorted, as ``kept`` is
        emission = self._emit(it, leaving, cells) if inv.selection.leaving == "emit" else None
        if inv.selection.leaving != "freeze":
            state.dropped.scatter_(1, cells, True)
        state.shrink(remaining_positions(leaving, width))
        inv.bus.emit("stop", batch=self.batch, iteration=it, ratio=inv.stops[it], kept=count,
                     kept_indices=image.kept.tolist(), in_image=self.in_image().flatten(1).sum(1).tolist())
        if emission is None:
            self._preview(it)
        else:
            state.emitted.append(emission)
            inv.save_preview(self.batch, it, emission.images, emission.keep)

    def _emit(self, it: int, leaving: torch.Tensor, cells: torch.Tensor) -> Emission:
        """The image the patches leaving now make, scored by the teacher on those patches alone."""
        inv, image = self.inverter, self.state.image
        with torch.no_grad():
            patches = image.param.detach().gather(1, leaving.unsqueeze(-1).expand(-1, -1, image.param.shape[-1]))
            with inv.autocast():
                logits = inv.vit.forward(patches, cells).logits
            pixels = image.images(image.param.detach())
        return Emission(it, pixels.cpu(), inv.grid.mask_from_indices(cells).cpu(), (logits.argmax(1) == self.targets).cpu())

    def in_image(self) -> torch.Tensor:
        """(B, rows, cols) the patches the final image will hold, as decided so far."""
        return self.state.in_image(self.inverter.selection.keeps_remaining)

    def _preview(self, it: int, param: torch.Tensor | None = None) -> None:
        """A PNG of the batch, greying the patches that will not be in the final image."""
        if self.inverter.run_dir is None:
            return
        with torch.no_grad():
            pixels = self.state.image.images(param)
        self.inverter.save_preview(self.batch, it, pixels, self.in_image())

    def save_checkpoint(self) -> None:
        """Everything needed to continue this batch bit for bit (a no-op without a run directory)."""
        if self.inverter.run_dir is None:
            return
        data = self.state.to_checkpoint()
        data["grad_scaler"] = self.scaler.state_dict() if self.scaler.is_enabled() else None
        data["batch"] = self.batch
        data["generator"] = self.generator.get_state()
        self.inverter.save_checkpoint(data)

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> BatchResult:
        """The final pass on the best patches, and every image the batch made."""
        self._report()
        started = time.perf_counter()
        result = self._result()
        result.seconds += time.perf_counter() - started
        return result

    def _result(self) -> BatchResult:
        inv, state, targets = self.inverter, self.state, self.targets
        image, iterations = state.image, inv.config.iterations
        best = image.param.detach() if state.best_param is None else state.best_param
        with torch.no_grad():
            final = inv.forward(self.batch, iterations, image, Jitter(), targets, param=best)
            logits = final.logits
            for _, loss in inv.losses:
                end_batch = getattr(loss, "end_batch", None)
                if end_batch is not None:
                    end_batch(final)
            images, keep = final.images, self.in_image()
            if inv.config.final_mask == "rescored" and not inv.schedule.is_dense:
                kept = inv.rescore(image.patches(best))
                keep = inv.grid.mask_from_indices(kept)
                patches = inv.grid.patchify(images).gather(1, kept.unsqueeze(-1).expand(-1, -1, inv.grid.patch_dim))
                with inv.autocast():
                    logits = inv.vit.forward(patches, kept).logits
            final_correct = (logits.argmax(1) == targets).cpu()
        self._preview(iterations, best)
        parts = list(state.emitted)
        if inv.final_image:
            parts.append(Emission(iterations, images.cpu(), keep.cpu(), final_correct))
        correct = torch.cat([p.correct for p in parts])
        return BatchResult(
            batch=self.batch, images=torch.cat([p.images for p in parts]), labels=targets.cpu().repeat(len(parts)),
            keep=torch.cat([p.keep for p in parts]),
            trajectory=(torch.arange(len(targets)) + self.batch * len(targets)).repeat(len(parts)),
            emitted_at=torch.tensor([p.iteration for p in parts]).repeat_interleave(len(targets)),
            seconds=state.elapsed, best_loss=float(state.best_loss), losses=self.terms,
            teacher_accuracy=float(correct.float().mean()),
            stage_seconds=state.stage_seconds, stage_iterations=state.stage_iterations,
        )

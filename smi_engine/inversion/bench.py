"""Speed benchmark: dense inversion against any selection policies and schedules, side by side.

Time: every run lives in one process and they advance in turns of a few iterations each (the
order reversed every round), so drift in the machine's speed, common on shared hosts, hits all
alike; each run's end-to-end time is the sum of all its own work (stops, scoring and the final
pass included). Where the time goes: per stage, milliseconds per iteration split into forward
(teacher and losses, stops included), backward, optimiser (Adam and clamping) and reporting.
Memory: what one steady-state iteration (after the last stop) keeps for its backward pass, per
run: the tensors autograd saves, counted exactly whatever the allocator does.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from smi_engine.checks import at_least
from smi_engine.errors import SmiError
from smi_engine.inversion.batch import PHASES, BatchRun
from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.loop import Inverter
from smi_engine.inversion.losses import build_losses
from smi_engine.models import LoadedModel, ModelSpec, load_model
from smi_engine.inversion.schedule import SEED_SCHEDULE_TEXT, Schedule, block_flops, speedup_bound
from smi_engine.inversion.selection import SelectionSpec

CHUNK = 5  # iterations per turn
DENSE = "dense"


@dataclass(frozen=True)
class Contender:
    """One sparse run of the comparison: a selection policy and its schedule."""

    label: str
    selection: SelectionSpec
    schedule: Schedule

    @classmethod
    def parse(cls, text: str, default_schedule: Schedule) -> "Contender":
        """``NAME`` (the benchmark's schedule) or ``NAME@ITERATION:RATIO,...``."""
        name, sep, schedule = text.strip().partition("@")
        if not name:
            raise SmiError(f"bad --compare {text!r}: write a selection NAME or NAME@SCHEDULE, e.g. pri@20:0.5,40:0.5")
        parsed = Schedule.parse(schedule) if sep else default_schedule
        if parsed.is_dense:
            raise SmiError(f"--compare {text!r} has no stops: dense is always measured; give a schedule with stops")
        return cls(text.strip(), SelectionSpec(name), parsed)


@dataclass
class BenchConfig:
    model: str = "deit_tiny_patch16_224"
    model_args: dict[str, Any] | None = None
    batch_size: int = 8
    iterations: int = 400
    schedule: str | None = None  # None: the seed's schedule scaled to ``iterations``
    compare: list[str] = field(default_factory=lambda: ["smi"])
    repeats: int = 1
    device: str = "cpu"
    attention: str = "fused"
    precision: str = "fp32"
    compile: bool = False
    memory: bool = True

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1, 8)
        at_least("--iterations", self.iterations, 1, 400)
        at_least("--repeats", self.repeats, 1, 3)
        if not self.compare:
            raise SmiError("nothing to compare with dense: pass --compare smi (repeatable)")
        labels = [c.label for c in self.contenders()]
        if len(set(labels)) != len(labels):
            raise SmiError("--compare lists the same run twice: give each selection/schedule once")

    def resolved_schedule(self) -> Schedule:
        if self.schedule:
            return Schedule.parse(self.schedule)
        return Schedule.parse(SEED_SCHEDULE_TEXT).scaled(self.iterations)

    def contenders(self) -> list[Contender]:
        return [Contender.parse(text, self.resolved_schedule()) for text in self.compare]


def _inverter(loaded: LoadedModel, config: BenchConfig, schedule: Schedule, iterations: int,
              selection: SelectionSpec = SelectionSpec()) -> Inverter:
    cfg = InversionConfig(model=loaded.spec, schedule=str(schedule), iterations=iterations, selection=selection,
                          batch_size=config.batch_size, attention=config.attention, precision=config.precision,
                          compile=config.compile, checkpoint_every=0)
    return Inverter(cfg, loaded, build_losses(cfg.losses), torch.device(config.device))


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _plans(config: BenchConfig) -> dict[str, tuple[Schedule, SelectionSpec]]:
    """Each run's schedule, its stops resolved for the benchmark's length (``every:V``)."""
    plans = {DENSE: (Schedule(), SelectionSpec())}
    plans.update({c.label: (c.schedule.resolved(config.iterations), c.selection) for c in config.contenders()})
    return plans


def time_side_by_side(config: BenchConfig, loaded: LoadedModel) -> dict[str, Any]:
    """One batch per run, advanced in turns; per run its time, per stage and per phase."""
    plans = _plans(config)
    # Warm caches and the allocator; compiled runs also compile every stage's graph beforehand.
    warm = plans.values() if config.compile else [(Schedule(), SelectionSpec())]
    for schedule, selection in warm:
        _inverter(loaded, config, schedule, schedule.stops[-1].iteration + 2 if schedule.stops else 3, selection).invert_batch(0)
    runs: dict[str, BatchRun] = {}
    for label, (schedule, selection) in plans.items():
        runs[label] = _inverter(loaded, config, schedule, config.iterations, selection).start_batch(0)
        runs[label].profile = not config.device.startswith("cuda")
    order = list(runs)
    while not all(run.done for run in runs.values()):
        for label in order:
            for _ in range(CHUNK):
                if not runs[label].step():
                    break
            _synchronize(config.device)
        order.reverse()
    results = {label: (run, run.finish()) for label, run in runs.items()}
    return {
        label: {"seconds": r.seconds,
                "stage_ms": [1000 * s / max(n, 1) for s, n in zip(r.stage_seconds, r.stage_iterations)],
                "stage_iterations": r.stage_iterations,
                "phase_ms": [{p: 1000 * phases[p] / max(n, 1) for p in PHASES}
                             for phases, n in zip(run.phase_seconds, r.stage_iterations)] if run.profile else None}
        for label, (run, r) in results.items()
    }


def activation_megabytes(run: BatchRun, device: str) -> dict[str, float]:
    """Memory one iteration of ``run`` keeps for its backward pass: the bytes of every tensor
    autograd saves (the model's own weights excluded), and on CUDA the allocator's peak."""
    weights = {p.untyped_storage().data_ptr() for p in run.inverter.loaded.model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run.step()
    result = {"saved_for_backward_mb": sum(seen.values()) / 2**20}
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_memory(config: BenchConfig, loaded: LoadedModel) -> dict[str, Any]:
    """Per run, one iteration of the steady state (after the last stop)."""
    found = {}
    for label, (schedule, selection) in _plans(config).items():
        steady_from = schedule.stops[-1].iteration if schedule.stops else 0
        run = _inverter(loaded, config, schedule, steady_from + 2, selection).start_batch(0)
        for _ in range(steady_from + 1):  # the iteration of the last stop runs the stop
            run.step()
        found[label] = activation_megabytes(run, config.device)
    return found


def _median(rounds: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(pick(r) for r in rounds)


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    config.validate()
    loaded = load_model(ModelSpec(config.model, config.model_args or {}), config.device)
    images_per_trajectory = {DENSE: 1}
    for contender in config.contenders():  # validates each schedule and selection before timing
        inverter = _inverter(loaded, config, contender.schedule, config.iterations, contender.selection)
        images_per_trajectory[contender.label] = inverter.images_per_trajectory
    probe = _inverter(loaded, config, Schedule(), config.iterations)
    grid, vit = probe.grid, probe.vit
    rounds = []
    for index in range(config.repeats):
        progress(f"timing round {index + 1}/{config.repeats}: {', '.join(_plans(config))} side by side")
        rounds.append(time_side_by_side(config, loaded))
    dense_seconds = _median(rounds, lambda r: r[DENSE]["seconds"])
    dense_ms = _median(rounds, lambda r: r[DENSE]["stage_ms"][0])
    runs = {}
    for label, (schedule, _) in _plans(config).items():
        kept, images = schedule.kept_patches(grid.num_patches), images_per_trajectory[label]
        stages = []
        for index, count in enumerate(kept):
            tokens = count + vit.num_prefix_tokens
            ms = _median(rounds, lambda r: r[label]["stage_ms"][index])
            phases = rounds[0][label]["phase_ms"]
            stages.append({
                "kept": count, "tokens": tokens, "iterations": rounds[0][label]["stage_iterations"][index],
                "ms_per_iteration": ms, "speedup": dense_ms / ms,
                "flop_speedup": block_flops(kept[0] + vit.num_prefix_tokens, vit.width) / block_flops(tokens, vit.width),
                "phase_ms": None if phases is None else {p: _median(rounds, lambda r: r[label]["phase_ms"][index][p])
                                                         for p in PHASES},
            })
        seconds = _median(rounds, lambda r: r[label]["seconds"])
        bound = speedup_bound(schedule, config.iterations, grid.num_patches, vit.num_prefix_tokens, vit.width)
        # Per image: a dense trajectory makes one image, an emitting one (Patch Rebirth) several.
        runs[label] = {"schedule": str(schedule), "seconds": seconds, "images_per_trajectory": images,
                       "images_per_second": config.batch_size * images / seconds,
                       "speedup": dense_seconds / seconds * images, "bound": bound * images,
                       "efficiency": dense_seconds / seconds / bound, "stages": stages}
    memory = None
    if config.memory:
        progress("memory: one steady-state iteration per run")
        memory = measure_memory(config, loaded)
    return {
        "config": {**asdict(config), "schedule": str(config.resolved_schedule())},
        "device": config.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dense_seconds": dense_seconds,
        "dense_ms_per_iteration": dense_ms,
        "runs": runs,
        "memory": memory,
        "rounds": rounds,
    }

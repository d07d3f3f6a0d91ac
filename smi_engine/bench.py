"""Speed benchmark: dense against sparse inversion, measured side by side in one run.

Time: both runs live in one process and advance in alternating chunks of iterations (the
order swapped every round), so drift in the machine's speed, common on shared hosts, hits
both alike; each run's end-to-end time is the sum of all its own work (stops, scoring and
the final pass included). Memory: what one steady-state iteration (after the last stop) keeps for its backward
pass, per mode: the tensors autograd saves, counted exactly whatever the allocator does.
Reported side by side: per-iteration time at each stage, end-to-end speedup, and the
token-FLOP bound of the schedule (``schedule.speedup_bound``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from smi_engine.checks import at_least
from smi_engine.invert import BatchRun, InversionConfig, Inverter
from smi_engine.losses import build_loss
from smi_engine.models import LoadedModel, ModelSpec, load_model
from smi_engine.plugins import get_registry
from smi_engine.schedule import SEED_SCHEDULE_TEXT, Schedule, block_flops, speedup_bound

CHUNK = 5  # iterations per turn when alternating dense and sparse
MODES = ("dense", "sparse")


@dataclass
class BenchConfig:
    model: str = "deit_tiny_patch16_224"
    model_args: dict[str, Any] | None = None
    batch_size: int = 8
    iterations: int = 400
    schedule: str | None = None  # None: the seed's schedule scaled to ``iterations``
    repeats: int = 1
    device: str = "cpu"
    attention: str = "fused"
    memory: bool = True

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1, 8)
        at_least("--iterations", self.iterations, 1, 400)
        at_least("--repeats", self.repeats, 1, 3)

    def resolved_schedule(self) -> Schedule:
        if self.schedule:
            return Schedule.parse(self.schedule)
        return Schedule.parse(SEED_SCHEDULE_TEXT).scaled(self.iterations)


def _inverter(loaded: LoadedModel, config: BenchConfig, schedule: str, iterations: int) -> Inverter:
    registry = get_registry()
    cfg = InversionConfig(model=loaded.spec, schedule=schedule, iterations=iterations,
                          batch_size=config.batch_size, attention=config.attention, checkpoint_every=0)
    losses = [(s, build_loss(s, registry.get("losses", s.name).factory)) for s in cfg.losses]
    return Inverter(cfg, loaded, losses, torch.device(config.device))


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(config: BenchConfig, loaded: LoadedModel, schedule: Schedule) -> dict[str, Any]:
    """One dense and one sparse batch, advanced in alternating chunks; results per mode."""
    _inverter(loaded, config, "dense", 3).invert_batch(0)  # warm caches and the allocator for both
    runs = {mode: _inverter(loaded, config, text, config.iterations).start_batch(0)
            for mode, text in zip(MODES, ("dense", str(schedule)))}
    order = list(MODES)
    while not all(run.done for run in runs.values()):
        for mode in order:
            for _ in range(CHUNK):
                if not runs[mode].step():
                    break
            _synchronize(config.device)
        order.reverse()
    results = {mode: run.finish() for mode, run in runs.items()}
    return {
        mode: {"seconds": r.seconds,
               "stage_ms": [1000 * s / max(n, 1) for s, n in zip(r.stage_seconds, r.stage_iterations)],
               "stage_iterations": r.stage_iterations}
        for mode, r in results.items()
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


def measure_memory(config: BenchConfig, loaded: LoadedModel, schedule: Schedule) -> dict[str, Any]:
    """Per mode, one iteration of the steady state (after the last stop)."""
    steady_from = schedule.stops[-1].iteration if schedule.stops else 0
    found = {}
    for mode, text in zip(MODES, ("dense", str(schedule))):
        run = _inverter(loaded, config, text, steady_from + 2).start_batch(0)
        for _ in range(steady_from + 1):  # the iteration of the last stop runs the stop
            run.step()
        found[mode] = activation_megabytes(run, config.device)
    return found


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    schedule = config.resolved_schedule()
    loaded = load_model(ModelSpec(config.model, config.model_args or {}), config.device)
    probe = _inverter(loaded, config, str(schedule), config.iterations)  # validates the schedule
    grid, vit = probe.grid, probe.vit
    rounds = []
    for index in range(config.repeats):
        progress(f"timing round {index + 1}/{config.repeats}: dense and sparse side by side")
        rounds.append(time_side_by_side(config, loaded, schedule))
    dense_seconds = statistics.median(r["dense"]["seconds"] for r in rounds)
    sparse_seconds = statistics.median(r["sparse"]["seconds"] for r in rounds)
    dense_ms = statistics.median(r["dense"]["stage_ms"][0] for r in rounds)
    tokens = [k + vit.num_prefix_tokens for k in schedule.kept_patches(grid.num_patches)]
    stages = []
    for index, (kept, n) in enumerate(zip(schedule.kept_patches(grid.num_patches), rounds[0]["sparse"]["stage_iterations"])):
        ms = statistics.median(r["sparse"]["stage_ms"][index] for r in rounds)
        stages.append({
            "kept": kept, "tokens": tokens[index], "iterations": n, "ms_per_iteration": ms, "speedup": dense_ms / ms,
            "flop_speedup": block_flops(tokens[0], vit.width) / block_flops(tokens[index], vit.width),
        })
    bound = speedup_bound(schedule, config.iterations, grid.num_patches, vit.num_prefix_tokens, vit.width)
    speedup = dense_seconds / sparse_seconds
    memory = None
    if config.memory:
        progress("memory: one steady-state iteration per mode")
        memory = measure_memory(config, loaded, schedule)
    return {
        "config": {**asdict(config), "schedule": str(schedule)},
        "device": config.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dense_seconds": dense_seconds,
        "sparse_seconds": sparse_seconds,
        "dense_ms_per_iteration": dense_ms,
        "speedup": speedup,
        "bound": bound,
        "efficiency": speedup / bound,
        "stages": stages,
        "memory": memory,
        "rounds": rounds,
    }

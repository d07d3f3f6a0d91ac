"""What a run's events say about it, folded into one plain object (``RunState``): the state
the dashboard draws, ``smi runs`` lists and the Python API reports.

Engine logic, no UI: the same folding serves live runs, finished runs and tests. Times come
from the events themselves, so a recorded run always renders the same. Every event is checked
against one schema where it is read (a run folder is untrusted).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smi_engine.errors import plain
from smi_engine.runs.events import RunClock, iter_events
from smi_engine.runs.rundir import RunDir
from smi_engine.runs.liveness import Evidence, Liveness, assess
from smi_engine.inversion.schedule import CostModel, block_flops

SPEED_SMOOTHING = 0.2  # weight of the newest iteration in the throughput averages

_NUMBER = (int, float)
_TEXT, _COUNT, _LIST, _OBJECT = str, int, list, dict
#: The fields each event's handler reads, with their types: an event that lacks a required one,
#: or holds any of them with the wrong type or out of bounds, is counted as damaged and skipped
#: whole (the state never half-applies it). Counts are non-negative ints; numbers are finite.
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "run_start_invert": {"schedule": _TEXT, "stops": _LIST, "iterations": _COUNT, "batches": _COUNT,
                         "batch_size": _COUNT, "grid": _LIST, "num_patches": _COUNT, "prefix_tokens": _COUNT,
                         "width": _COUNT},
    "batch_start": {"batch": _COUNT},
    "batch_resumed": {"batch": _COUNT, "iteration": _COUNT},
    "iteration": {"batch": _COUNT, "iteration": _COUNT, "kept": _COUNT, "tokens": _COUNT, "seconds": _NUMBER,
                  "tokens_per_s": _NUMBER, "losses": _OBJECT},
    "stop": {"batch": _COUNT, "kept": _COUNT, "kept_indices": _LIST},
    "preview": {"path": _TEXT},
    "epoch_end": {"epoch": _COUNT, "epochs": _COUNT, "val_top1": _NUMBER},
    "train_step": {"epoch": _COUNT, "step": _COUNT, "loss": _NUMBER},
}
_STARTED = {"kind": _TEXT, "model": _TEXT, "student": _TEXT, "teacher": _TEXT, "device": _TEXT, "host": _TEXT,
            "pid": _COUNT, "model_has_weights": bool}
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "run_start_invert": {**_STARTED, "selection": _TEXT, "world_size": _COUNT, "images_per_trajectory": _COUNT,
                         "kept_per_stage": _LIST},
    "run_start": {**_STARTED, "epochs": _COUNT, "total_steps": _COUNT},
    "batch_start": {"iterations": _COUNT, "num_patches": _COUNT, "kept_per_stage": _LIST, "stop_iterations": _LIST,
                    "prefix_tokens": _COUNT, "width": _COUNT},
    "iteration": {"rss_mb": _NUMBER, "cuda_peak_mb": _NUMBER, "gpu": _OBJECT},
    "train_step": {"epochs": _COUNT, "done_steps": _COUNT, "total_steps": _COUNT, "steps": _COUNT, "gpu": _OBJECT},
    "epoch_end": {"kt_loss": _NUMBER, "train_loss": _NUMBER},
    "batch_end": {"images": _COUNT},
    "run_end": {"summary": _OBJECT},
    "run_error": {"message": _TEXT},
    "run_interrupted": {"message": _TEXT},
}
RECENT_EVENTS = 64  # event times kept to measure a run's usual interval between events
#: Bounds of what an event may say, far past any real run: a log is untrusted, and a 30000 x
#: 30000 grid or a 10^12-batch plan must be refused as damage, not allocated.
MAX_NUMBER, MAX_GRID_SIDE, MAX_BATCHES, MAX_ITEMS = 2.0**53, 4096, 10**6, 2**22


def well_formed(event: dict[str, Any]) -> bool:
    """Whether an event holds the fields its handler reads, with their types and within bounds."""
    kind = event.get("event")
    if not isinstance(kind, str):
        return False
    if kind in ("run_start", "run_resumed"):
        run_kind = _given(event, "kind", "invert")
        if not isinstance(run_kind, str):
            return False
        kind = "run_start_invert" if run_kind == "invert" else "run_start"
    required, optional = REQUIRED.get(kind, {}), {"rank": _COUNT, "time": _NUMBER, **OPTIONAL.get(kind, {})}
    if not all(name in event for name in required):
        return False
    if not all(_typed(event[name], types) for fields in (required, optional) for name, types in fields.items()
               if name in event and (event[name] is not None or name in required)):
        return False
    if kind == "run_start_invert" and not _plan_bounded(event):
        return False
    if kind == "batch_start" and not (all(_counts(event.get(k) or []) for k in ("kept_per_stage", "stop_iterations"))
                                      and (event.get("num_patches") or 0) <= MAX_GRID_SIDE**2):
        return False
    if kind == "iteration" and not (len(event["losses"]) <= 64 and all(finite_number(v) for v in event["losses"].values())):
        return False
    return kind != "stop" or _index_rows(event["kept_indices"])


def _typed(value: Any, types: type | tuple[type, ...]) -> bool:
    """A field's value has its type; a bool is no number, a count is no float and never
    negative, and every number is finite and bounded."""
    if types is bool:
        return isinstance(value, bool)
    if not isinstance(value, types) or isinstance(value, bool):
        return False
    if isinstance(value, _NUMBER):
        return finite_number(value) and (value >= 0 or types is _NUMBER)
    return not isinstance(value, (str, list, dict)) or len(value) <= MAX_ITEMS


def _counts(values: list) -> bool:
    return len(values) <= 4097 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ITEMS
                                       for v in values)


def finite_number(value: Any) -> bool:
    """A real number from a file: not a bool, not NaN or infinite, within ``MAX_NUMBER``."""
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value) and abs(value) <= MAX_NUMBER


def _plan_bounded(e: dict[str, Any]) -> bool:
    grid, stops = e["grid"], e["stops"]
    return (len(grid) == 2 and all(isinstance(v, int) and 1 <= v <= MAX_GRID_SIDE for v in grid)
            and e["num_patches"] == grid[0] * grid[1] and e["batches"] <= MAX_BATCHES and e["batch_size"] <= MAX_ITEMS
            and len(stops) <= 4096 and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], int)
                                           and finite_number(s[1]) for s in stops)
            and _counts(e.get("kept_per_stage") or []))


def _index_rows(rows: Any) -> bool:
    return (len(rows) <= MAX_ITEMS and all(isinstance(r, list) and len(r) <= MAX_ITEMS for r in rows)
            and all(isinstance(i, int) and 0 <= i < MAX_GRID_SIDE**2 for r in rows for i in r))


def terminal_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with every string in it (keys too) passed through ``plain``; deeper than any
    event of ours goes, the rest is dropped."""
    if isinstance(value, str):
        return plain(value)
    if depth > 8:
        return None
    if isinstance(value, dict):
        return {plain(k): terminal_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [terminal_safe(v, depth + 1) for v in value]
    return value


GPU_FIELDS = ("utilization", "memory_used_mb", "memory_total_mb", "temperature_c")


def _gpu(value: Any, default: Any) -> Any:
    """An NVML reading from an event (every field a finite number), or ``default``."""
    if isinstance(value, dict) and all(finite_number(value.get(k)) for k in GPU_FIELDS):
        return {k: value[k] for k in GPU_FIELDS}
    return default


def _given(e: dict, key: str, default: Any) -> Any:
    """An optional field of an event (already type-checked by ``well_formed``), or ``default``
    where the event leaves it out or says null."""
    value = e.get(key)
    return default if value is None else value


@dataclass
class LossHistory:
    """One series per loss term, indexed by the run's global step."""

    series: dict[str, list[float]] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.series.setdefault(name, []).append(value)


@dataclass
class RunState:
    kind: str = "invert"
    model: str = "?"
    device: str = "?"
    pid: int | None = None
    host: str | None = None
    model_has_weights: bool = True
    schedule: str = ""
    selection: str = ""
    stops: list[tuple[int, float]] = field(default_factory=list)
    iterations: int = 0
    batches: int = 0
    batch_size: int = 0  # trajectories per batch
    images_per_trajectory: int = 1  # more than 1 under an emitting selection (Patch Rebirth)
    grid: tuple[int, int] = (0, 0)
    num_patches: int = 0
    prefix_tokens: int = 1
    width: int = 0
    world_size: int = 1
    # progress
    batch: int = 0
    iteration: int = -1
    batches_done: int = 0
    images_made: int = 0  # images written to the pool so far
    open_batches: dict[int, int] = field(default_factory=dict)  # rank -> iterations done in its current batch
    kept: int = 0
    keep: list[list[int]] = field(default_factory=list)  # kept grid indices per image of the current batch
    losses: LossHistory = field(default_factory=LossHistory)
    paused: bool = False
    # speed (per rank, summed for the header)
    iterations_per_s: dict[int, float] = field(default_factory=dict)
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    cost: CostModel | None = None
    dense_cost: float = 0.0  # cost-model FLOPs of the iterations done, had nothing been stopped
    actual_cost: float = 0.0
    iteration_seconds: float = 0.0  # wall-clock seconds of the iterations done (all ranks)
    clock: RunClock = field(default_factory=RunClock)  # active time and time since start
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))  # times of the latest events
    rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    gpu: dict[str, float] | None = None  # NVML: utilisation %, memory used/total MB, temperature
    # outcome
    preview: str | None = None  # path of the newest preview PNG, relative to the run directory
    preview_version: int = 0
    finished: bool = False
    interrupted: str | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # training runs (distill, teacher)
    epoch: int = -1  # the last validated
    current_epoch: int = -1  # the one training now
    epochs: int = 0
    done_steps: int = 0
    total_steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_top1: list[float] = field(default_factory=list)
    events: int = 0
    damaged: int = 0  # lines of events.jsonl that were not events, and events missing their fields

    # -- folding ----------------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        """Fold one event in; anything malformed is counted and skipped, never raised. Its text is
        made terminal-safe here, once, so no panel or listing shows a control character."""
        if not isinstance(event, dict) or event.get("event") == "damaged_line" or not well_formed(event):
            self.damaged += 1
            return
        event = terminal_safe(event)
        self.events += 1
        handler = getattr(self, f"_on_{event.get('event')}", None)
        if event.get("time") is not None:
            self.clock.add(event)
            self.recent.append(event["time"])
        if handler is not None:
            try:
                handler(event)
            except (KeyError, TypeError, ValueError, IndexError):  # a shape REQUIRED does not describe
                self.events, self.damaged = self.events - 1, self.damaged + 1

    def _on_run_start(self, e: dict) -> None:
        self.kind = _given(e, "kind", self.kind)
        self.model = _given(e, "model", "") or _given(e, "student", "") or self.model
        self.device = _given(e, "device", self.device)
        if e.get("rank", 0) == 0:  # the process that holds the run's lock
            self.pid, self.host = e.get("pid"), e.get("host")
        self.model_has_weights = _given(e, "model_has_weights", True)
        if self.kind == "invert":
            self.schedule, self.stops = e["schedule"], [tuple(s) for s in e["stops"]]
            self.selection = _given(e, "selection", "")
            self.iterations, self.batches, self.batch_size = e["iterations"], e["batches"], e["batch_size"]
            self.grid, self.num_patches = tuple(e["grid"]), e["num_patches"]
            self.prefix_tokens, self.width = e["prefix_tokens"], e["width"]
            self.world_size = max(_given(e, "world_size", 1), 1)
            self.images_per_trajectory = _given(e, "images_per_trajectory", 1)
            self.kept = self.num_patches
            if isinstance(e.get("kept_per_stage"), list):
                self.cost = CostModel.of([s[0] for s in self.stops], e["kept_per_stage"], self.prefix_tokens,
                                         self.width, self.iterations)
        else:
            self.epochs = _given(e, "epochs", 0)
            self.total_steps = e.get("total_steps") or self.total_steps
            if self.kind == "distill":
                self.model = f"{e.get('teacher')} -> {e.get('student')}"
        self.finished, self.error, self.interrupted, self.paused = False, None, None, False

    _on_run_resumed = _on_run_start

    def _on_batch_start(self, e: dict) -> None:
        self.batch, self.iteration = e["batch"], -1
        if e.get("iterations") is not None:  # batches made on demand (distill --synthesize) carry their own shape
            self.iterations, self.num_patches = e["iterations"], _given(e, "num_patches", self.num_patches)
        if isinstance(e.get("kept_per_stage"), list):
            self.prefix_tokens, self.width = e["prefix_tokens"], e["width"]
            self.cost = CostModel.of(e["stop_iterations"], e["kept_per_stage"], self.prefix_tokens, self.width,
                                     self.iterations)
        self.kept = self.num_patches
        self.keep = []

    def _on_batch_resumed(self, e: dict) -> None:
        self.batch, self.iteration = e["batch"], e["iteration"] - 1

    def _on_iteration(self, e: dict) -> None:
        rank = e.get("rank", 0)
        self.batch, self.iteration, self.kept = e["batch"], e["iteration"], e["kept"]
        self.open_batches[rank] = e["iteration"] + 1
        self.losses.add(e["losses"])
        self.paused = False
        self.iteration_seconds += e["seconds"]
        rate = 1.0 / max(e["seconds"], 1e-9)
        for store, value in ((self.iterations_per_s, rate), (self.tokens_per_s, e["tokens_per_s"])):
            store[rank] = value if rank not in store else (1 - SPEED_SMOOTHING) * store[rank] + SPEED_SMOOTHING * value
        if self.width:
            self.dense_cost += block_flops(self.num_patches + self.prefix_tokens, self.width)
            self.actual_cost += block_flops(e["tokens"], self.width)
        self.rss_mb = e["rss_mb"] if finite_number(e.get("rss_mb")) else self.rss_mb
        self.cuda_peak_mb = e["cuda_peak_mb"] if finite_number(e.get("cuda_peak_mb")) else self.cuda_peak_mb
        self.gpu = _gpu(e.get("gpu"), self.gpu)

    def _on_paused(self, e: dict) -> None:
        self.paused = True

    def _on_unpaused(self, e: dict) -> None:
        self.paused = False

    def _on_train_step(self, e: dict) -> None:
        self.current_epoch = e["epoch"]
        self.epochs = _given(e, "epochs", self.epochs)
        self.done_steps = _given(e, "done_steps", self.done_steps + 1)
        self.total_steps = e.get("total_steps") or self.total_steps or _given(e, "steps", 0) * self.epochs
        self.train_loss.append(e["loss"])
        self.gpu = _gpu(e.get("gpu"), self.gpu)

    def _on_stop(self, e: dict) -> None:
        self.batch, self.kept = e["batch"], e["kept"]
        self.keep = [[i for i in row if i < self.num_patches] for row in e["kept_indices"]]  # cells of this grid only

    def _on_preview(self, e: dict) -> None:
        self.preview, self.preview_version = e["path"], self.preview_version + 1

    def _on_batch_end(self, e: dict) -> None:
        self.batches_done += 1
        self.images_made += _given(e, "images", self.batch_size * self.images_per_trajectory)
        self.open_batches.pop(e.get("rank", 0), None)

    def _on_epoch_end(self, e: dict) -> None:
        self.epoch, self.epochs = e["epoch"], e["epochs"]
        self.current_epoch = max(self.current_epoch, e["epoch"])
        self.losses.add({k: e[k] for k in ("kt_loss", "train_loss") if e.get(k) is not None})
        self.val_epochs.append(e["epoch"] + 1)
        self.val_top1.append(e["val_top1"])

    def _on_run_end(self, e: dict) -> None:
        self.finished, self.summary = True, _given(e, "summary", {})

    def _on_run_interrupted(self, e: dict) -> None:
        self.interrupted = _given(e, "message", "interrupted")

    def _on_run_error(self, e: dict) -> None:
        self.error = _given(e, "message", "failed")

    # -- derived ------------------------------------------------------------------------------
    @property
    def is_training(self) -> bool:
        return self.kind in ("distill", "teacher")

    @property
    def total_iterations(self) -> int:
        return self.iterations * max(self.batches, 1)

    @property
    def done_iterations(self) -> int:
        return self.batches_done * self.iterations + sum(self.open_batches.values())

    @property
    def total_images(self) -> int:
        return self.batches * self.batch_size * self.images_per_trajectory

    @property
    def images_per_second(self) -> float | None:
        """Images written to the pool per second of inversion (each rank's time counted once)."""
        if not self.images_made or not self.iteration_seconds:
            return None
        return self.images_made / (self.iteration_seconds / max(self.world_size, 1))

    @property
    def iteration_rate(self) -> float:
        return sum(self.iterations_per_s.values())

    @property
    def eta_seconds(self) -> float | None:
        """The average speed so far over the remaining work: for an inversion, the schedule's
        remaining cost (its later iterations are cheaper); for training, the remaining steps."""
        if self.finished or self.paused:
            return None
        if self.is_training:
            if not self.done_steps or not self.total_steps:
                return None
            return self.clock.active / self.done_steps * max(self.total_steps - self.done_steps, 0)
        if self.cost is None:
            return None
        done = self.cost.batch_cost * self.batches_done + sum(self.cost.cost(0, d) for d in self.open_batches.values())
        unstarted = self.batches - self.batches_done - len(self.open_batches)
        return self.cost.eta(self.iteration_seconds, done, self.open_batches.values(), unstarted, self.world_size)

    @property
    def started(self) -> float | None:
        return self.clock.first

    @property
    def latest(self) -> float | None:
        return self.clock.latest

    @property
    def seconds_per_iteration(self) -> float | None:
        """Wall-clock seconds per iteration so far: the basis of every speedup shown."""
        done = self.done_iterations
        return self.iteration_seconds / done if done and self.iteration_seconds else None

    @property
    def flops_fraction(self) -> float | None:
        """Token FLOPs of the iterations done as a fraction of the same iterations dense (cost model)."""
        return self.actual_cost / self.dense_cost if self.dense_cost else None

    @property
    def recent_interval(self) -> float | None:
        """Mean seconds between the latest events."""
        if len(self.recent) < 2:
            return None
        return (self.recent[-1] - self.recent[0]) / (len(self.recent) - 1)

    @property
    def status(self) -> str:
        """How the run ended, or "running": from the events alone (see ``liveness`` for the rest)."""
        if self.error:
            return "failed"
        if self.interrupted:
            return "interrupted"
        return "finished" if self.finished else "running"

    def liveness(self, run_dir: Path, now: float) -> Liveness:
        """The status with what the events cannot say: paused, stalled or dead."""
        ended = None if self.status == "running" else self.status
        return assess(run_dir, Evidence(ended, self.pid, self.host, self.latest, self.recent_interval, self.paused), now)


def read_run(path: Path) -> RunState:
    """A run's events folded into one state. A finished run's summary holds its results, so
    only the head of its log is read, up to ``run_start`` (a long run logs tens of thousands of
    events)."""
    run_dir = RunDir(path)
    state = RunState(kind=run_dir.read_config().get("kind", "invert"))
    finished = run_dir.is_finished
    for event in iter_events(run_dir.events):  # streamed: a long log is never held whole
        state.apply(event)
        if finished and event.get("event") == "run_start":
            break
    state.finished = state.finished or finished  # summary.json is written last: its presence marks a finished run
    return state

"""Run events and the sinks that consume them.

An event is a JSON-able dict with at least ``event`` (its kind), ``time`` (Unix seconds) and
``rank``. The engine emits; sinks (the JSON-lines file, a progress bar, the dashboard, plugin
loggers) consume. Kinds emitted by inversion:

``run_start``       pid, host (who writes the run, for liveness), config, model, device, grid,
                    schedule, selection, kept_per_stage, speedup_bound, ...
``batch_start``     batch, targets, and the batch's cost shape: iterations, num_patches,
                    stop_iterations, kept_per_stage, prefix_tokens, width
``iteration``       batch, iteration, losses {name: value, ..., total}, kept, tokens,
                    seconds, images_per_s, tokens_per_s; rss_mb, cuda_peak_mb and ``gpu``
                    {utilization, memory_used_mb, memory_total_mb, temperature_c} (NVML) when read
``stop``            batch, iteration, ratio, kept, kept_indices (per image, grid indices still
                    optimised), in_image (per image, patches the final image will hold)
``preview``         batch, iteration, path (PNG, relative to the run directory)
``batch_end``       batch, seconds, shard, kept, best_loss, teacher_accuracy, losses
``paused``          the run waits (paused from an in-process dashboard); ``unpaused`` when it goes on
``run_end``         summary
``run_interrupted`` batch, iteration, message
``run_error``       message
Distillation and teacher training add ``train_step`` (epoch, epochs, step, done_steps,
total_steps, loss) and ``epoch_end``; quantisation adds ``progress`` (phase, done, total),
``calibrated`` and ``quantized``; see ``smi_engine.downstream.distill`` and ``smi_engine.downstream.quantize``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from smi_engine.files import open_regular

EventSink = Callable[[dict[str, Any]], None]


class EventBus:
    """Stamps events and hands them to every subscribed sink, in order."""

    def __init__(self, sinks: Iterable[EventSink] = (), rank: int = 0):
        self.sinks: list[EventSink] = list(sinks)
        self.rank = rank

    def subscribe(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        event = {"event": kind, "time": time.time(), "rank": self.rank, **fields}
        for sink in self.sinks:
            sink(event)
        return event

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class JsonlSink:
    """Appends one JSON object per line; each line is one ``write`` on an O_APPEND file, so
    lines from several processes never interleave and a reader sees each line as soon as it
    is written (though it may catch one half-written: readers keep an unterminated tail)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def __call__(self, event: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class GuardedSink:
    """Wraps a third-party sink: its first failure is reported once and the sink is dropped,
    so a broken logger never stops a run."""

    def __init__(self, name: str, sink: EventSink):
        self.name, self.sink, self.failed = name, sink, False

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.failed:
            self._guarded(self.sink, event)

    def close(self) -> None:
        close = getattr(self.sink, "close", None)
        if close is not None and not self.failed:
            self._guarded(close)

    def _guarded(self, call: Callable[..., Any], *args: Any) -> None:
        from smi_engine.plugins import plugin_code, warn

        try:
            with plugin_code():  # what it prints is kept off stdout; sys.exit is its failure, not the run's
                call(*args)
        except Exception as exc:  # a plugin's bug must not end the run
            self.failed = True
            warn(f"event sink {self.name!r} failed and was disabled: {type(exc).__name__}: {exc}")


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], bytes, int]:
    """Complete JSON lines of ``data`` -> the events (JSON objects), the unfinished tail to keep
    for later, and how many complete lines were damaged (not UTF-8, not JSON, not an object)."""
    *lines, tail = data.split(b"\n")
    events, damaged = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            event = None
        if isinstance(event, dict):
            events.append(event)
        else:
            damaged += 1
    return events, tail, damaged


#: The longest line an event may be; a longer one is damage, skipped without being held whole.
MAX_EVENT_LINE = 2**20


def iter_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete events of a JSON-lines file, one at a time, in bounded memory (a line past
    ``MAX_EVENT_LINE`` bytes yields ``{"event": "damaged_line"}``; never through a link or FIFO)."""
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:
        while line := handle.readline(MAX_EVENT_LINE + 1):
            if len(line) > MAX_EVENT_LINE:
                while line and not line.endswith(b"\n"):  # the rest of the over-long line
                    line = handle.readline(MAX_EVENT_LINE)
                yield {"event": "damaged_line"}
                continue
            if not line.endswith(b"\n"):
                return  # half-written: the writer is mid-way
            events, _, damaged = parse_lines(line)
            yield from events
            for _ in range(damaged):
                yield {"event": "damaged_line"}


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a JSON-lines file (a half-written last line and damaged lines are skipped)."""
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:  # never through a link or a FIFO
        events, _, _ = parse_lines(handle.read())
    return events


@dataclass
class RunClock:
    """A run's two durations, from its events' times, defined here once for every reader (the
    summary, ``smi runs``, the dashboard): **active**, the time its processes worked on it, every
    session summed (each from its ``run_start`` or ``run_resumed`` to its last event), and
    **since start**, from its first event to its latest (a dead spell before a resume included)."""

    first: float | None = None
    latest: float | None = None
    session_start: float | None = None
    closed: float = 0.0  # active seconds of the sessions before the current one

    def add(self, event: dict[str, Any]) -> None:
        at = event.get("time")
        if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at):
            return
        if event.get("event") in ("run_start", "run_resumed") and event.get("rank", 0) == 0:
            if self.session_start is not None:
                self.closed += max(self.latest - self.session_start, 0.0)
            self.session_start = at
        self.first = at if self.first is None else min(self.first, at)
        self.latest = at if self.latest is None else max(self.latest, at)
        if self.session_start is None:
            self.session_start = at

    @property
    def active(self) -> float:
        current = 0.0 if self.session_start is None else max(self.latest - self.session_start, 0.0)
        return self.closed + current

    @property
    def since_start(self) -> float:
        return 0.0 if self.first is None else self.latest - self.first

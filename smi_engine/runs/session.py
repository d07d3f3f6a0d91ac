"""One run's lifecycle, the same for every command that writes a run directory.

    session = RunSession(run_dir, "distill", bus, placement)
    session.claim(config, sinks)        # lock (rank 0), create or reopen, subscribe the log
    with session:                       # exactly one of run_end / run_interrupted / run_error
        session.start(teacher=..., ...) # run_start (or run_resumed) with pid, host, versions
        ...
        summary = session.end(summary)  # summary.json (rank 0), then run_end

Leaving the ``with`` block closes the bus and releases the lock on every path; a failure inside
``claim`` releases the lock before it propagates, so a refused start holds nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from smi_engine.runs.control import RunInterrupted
from smi_engine.runtime.distributed import Placement
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus, EventSink, GuardedSink, JsonlSink, RunClock, iter_events
from smi_engine.files import ensure_folder, write_json
from smi_engine.runs.rundir import RunDir
from smi_engine.runs.runlock import RunLock


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The software that wrote a run (recorded in config.json and run_start)."""
    from importlib.metadata import version

    import timm
    import torch

    return {"smi": version("smi-toolkit"), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def build_sinks(names: Iterable[str], run_dir: RunDir, config: dict[str, Any],
                options: dict[str, dict[str, Any]] | None = None) -> list[EventSink]:
    """The plugin sinks a run names (``--sink``), started on its directory and configuration,
    each with its ``--sink-option NAME.KEY=VALUE`` options (typed as its factory annotates)."""
    from smi_engine.plugins import build_plugin, get_registry, plugin_code

    names, options = list(names), options or {}
    stray = sorted(set(options) - set(names))
    if stray:
        raise SmiError(f"--sink-option is for event sink {stray[0]!r}, which this run does not use: pass --sink {stray[0]}")
    registry = get_registry()
    sinks = []
    for name in names:
        registration = registry.get("sinks", name)
        try:
            with plugin_code():
                sink = build_plugin("sinks", name, dict(options.get(name, {})), args=(run_dir.path, config))
        except SmiError:
            raise
        except Exception as exc:
            raise SmiError(f"event sink {name!r} (plugin {registration.plugin}) failed to start: {exc}") from None
        sinks.append(GuardedSink(name, sink))
    return sinks


class RunSession:
    """A command's hold on one run directory, from the claim to the run's last event."""

    def __init__(self, run_dir: RunDir, kind: str, bus: EventBus, placement: Placement = Placement(),
                 resumable: bool = False):
        self.run_dir, self.kind, self.bus, self.placement, self.resumable = run_dir, kind, bus, placement, resumable
        self.lock: RunLock | None = None
        self.ended = False

    def check_claimable(self) -> None:
        """Refuse a directory this session could not create (rank 0 checks; nothing is written)."""
        if self.placement.is_main:
            self.run_dir.check_claimable(self.kind, resumable=self.resumable)

    def claim(self, config: dict[str, Any] | None, sinks: Iterable[EventSink] = (),
              folders: Iterable[Path] = ()) -> "RunSession":
        """Take the run: rank 0 locks the directory, then creates it with ``config`` or, with
        ``None``, reopens it to resume (clearing the stop request that ended the last attempt);
        the run's sub-``folders`` are made, or checked to be real folders, not links. Then every
        rank logs to ``events.jsonl`` and to ``sinks``."""
        main = self.placement.is_main
        self.lock = RunLock(self.run_dir.path).acquire() if main else None
        log = None
        try:
            self.placement.barrier()  # every rank has read the old state before rank 0 changes it
            if main:
                if config is not None:
                    self.run_dir.create({"config": config, "created": dt.datetime.now().isoformat(timespec="seconds"),
                                         "versions": versions(), "world_size": self.placement.world_size},
                                        self.kind, resumable=self.resumable)
                for folder in folders:
                    ensure_folder(folder)
                log = JsonlSink(self.run_dir.events)  # a link or FIFO is refused before the old state changes
                if config is None:
                    self.run_dir.clear_request()
            self.placement.barrier()  # the other ranks write into the directory rank 0 claimed
            log = log or JsonlSink(self.run_dir.events)
        except BaseException:
            if log is not None:
                log.close()
            self._release()
            raise
        self.bus.subscribe(log)
        for sink in sinks:
            self.bus.subscribe(sink)
        return self

    def start(self, resumed: bool = False, **fields: Any) -> None:
        """``run_start`` (``run_resumed``) naming the run's kind, the writing process and its software."""
        self.bus.emit("run_resumed" if resumed else "run_start", kind=self.kind, pid=os.getpid(),
                      host=socket.gethostname(), versions=versions(), world_size=self.placement.world_size, **fields)

    def end(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The run's result with its durations: ``summary.json`` (written last, it marks the run
        finished), then ``run_end``; returns what was written."""
        if self.placement.is_main:
            summary = {**summary, **self.durations()}
            write_json(self.run_dir.summary, summary)
            self.bus.emit("run_end", summary=summary)
        self.ended = True
        return summary

    def durations(self) -> dict[str, float]:
        """The run's active time and time since start, as ``RunClock`` defines them, read from
        its own log up to now (a resumed run counts every session)."""
        clock = RunClock()
        for event in iter_events(self.run_dir.events):
            clock.add(event)
        clock.add({"time": time.time()})
        return {"active_seconds": clock.active, "since_start_seconds": clock.since_start}

    def __enter__(self) -> "RunSession":
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        try:
            if exc is None or self.ended:
                pass
            elif isinstance(exc, RunInterrupted):
                self.bus.emit("run_interrupted", message=str(exc), batch=exc.batch, iteration=exc.iteration)
            elif isinstance(exc, KeyboardInterrupt):  # a command without a stop point of its own
                self.bus.emit("run_interrupted", message="interrupted")
            else:
                self.bus.emit("run_error", message=str(exc) or type(exc).__name__, error=type(exc).__name__)
        finally:
            try:
                self.bus.close()
            finally:
                self._release()
        return False

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

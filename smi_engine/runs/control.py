"""Stopping and pausing a running job from outside the loop, between iterations.

Requests come from Ctrl-C (the CLI's signal handler), an in-process dashboard, or a
``control.json`` file in the run directory (``smi watch`` writes it over SSH).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from smi_engine.runs.rundir import RunDir

POLL_SECONDS = 0.5


class RunInterrupted(Exception):
    """Raised by the engine after it saved its state because a stop was requested."""

    def __init__(self, message: str, batch: int, iteration: int):
        super().__init__(message)
        self.batch, self.iteration = batch, iteration


class RunControl:
    def __init__(self, run_dir: RunDir | None = None):
        self.run_dir = run_dir
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.saving = False
        #: Told "paused" and "unpaused" (the run emits them as events, so watchers see a pause).
        self.listeners: list[Callable[[str], None]] = []

    @contextlib.contextmanager
    def saving_state(self) -> Iterator[None]:
        """Mark a checkpoint being written: an impatient second Ctrl-C must not cut it short."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def request_stop(self) -> None:
        self._stop.set()
        self._running.set()  # a paused job must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def _tell(self, change: str) -> None:
        for listener in self.listeners:
            listener(change)

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def should_stop(self) -> bool:
        """Check the control file (a stat per call), wait while paused, report a stop.

        "paused" and "unpaused" are told from here, the loop's own thread, when it really
        waits: told from the thread that asked, "paused" came before the iteration still
        under way, whose event then showed the run as running again."""
        self._poll_file()
        if not self._running.is_set():
            self._tell("paused")
            while not self._running.wait(timeout=POLL_SECONDS):
                self._poll_file()
            if not self._stop.is_set():
                self._tell("unpaused")
        return self._stop.is_set()

    def _poll_file(self) -> None:
        # The request stays in place until the run is prepared again: every rank must see it.
        if self.run_dir is not None and self.run_dir.control.exists() and self.run_dir.pending_request() == "stop":
            self.request_stop()

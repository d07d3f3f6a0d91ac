"""Ctrl-C, SIGTERM (job schedulers) and SIGHUP (an SSH session that dropped) ask a run to stop
cleanly between iterations, checkpoint first."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from rich.console import Console

from smi_engine.runs.control import RunControl


CHECKPOINT = "stopping after this iteration and saving a checkpoint"


@contextlib.contextmanager
def stop_on_signals(control: RunControl, console: Console, stopping: str = CHECKPOINT) -> Iterator[None]:
    """``stopping`` says what the command does when asked to stop (the default: an inversion's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def say(message: str) -> None:
        try:
            console.print(f"[yellow]{message}[/]")
        except OSError:  # the terminal is gone (SIGHUP): the run still stops cleanly
            pass

    def handler(signum, frame):
        if control.saving:  # never cut a checkpoint short: the stop follows right after it
            say("still saving the checkpoint; the run stops as soon as it is written")
            return
        if control.stop_requested:  # a second signal (Ctrl-C): give up at once
            raise KeyboardInterrupt
        control.request_stop()
        say(f"{stopping} (Ctrl-C again to abort at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

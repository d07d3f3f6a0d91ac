"""Ctrl-C (and SIGTERM from job schedulers) ask a run to stop cleanly between iterations."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from rich.console import Console

from smi_engine.control import RunControl


@contextlib.contextmanager
def stop_on_signals(control: RunControl, console: Console) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if control.saving:  # never cut a checkpoint short: the stop follows right after it
            console.print("[yellow]still saving the checkpoint; the run stops as soon as it is written[/]")
            return
        if control.stop_requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        control.request_stop()
        console.print("[yellow]stopping after this iteration and saving a checkpoint (Ctrl-C again to abort without saving)[/]")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

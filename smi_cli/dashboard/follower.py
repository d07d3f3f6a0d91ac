"""Follows a growing events.jsonl in a thread: reads new bytes in chunks, keeps a half-written
last line for later, and hands complete events to a callback. A damaged line (not UTF-8, not
JSON, not an object) becomes a ``damaged_line`` marker, so the dashboard can count it; nothing
in the file stops the following."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

from smi_engine.errors import SmiError
from smi_engine.runs.events import parse_lines
from smi_engine.files import open_regular

CHUNK = 1 << 20
POLL_SECONDS = 0.1
DAMAGED = {"event": "damaged_line"}


class EventFollower(threading.Thread):
    def __init__(self, path: Path, deliver: Callable[[list[dict[str, Any]]], None], poll: float = POLL_SECONDS):
        super().__init__(daemon=True, name=f"follow {path}")
        self.path, self.deliver, self.poll = path, deliver, poll
        self.position = 0
        self.tail = b""
        self.stopped = threading.Event()

    def read_new(self) -> list[dict[str, Any]]:
        """Every complete event written since the last call."""
        try:
            with os.fdopen(open_regular(self.path, os.O_RDONLY), "rb") as handle:
                handle.seek(self.position)
                data = handle.read(CHUNK)
        except (FileNotFoundError, SmiError):  # not there yet, or a link or FIFO that is never read
            return []
        self.position += len(data)
        events, self.tail, damaged = parse_lines(self.tail + data)
        return events + [dict(DAMAGED) for _ in range(damaged)]

    def run(self) -> None:
        while not self.stopped.is_set():
            events = self.read_new()
            if events:
                self.deliver(events)
            else:
                self.stopped.wait(self.poll)

    def stop(self) -> None:
        self.stopped.set()

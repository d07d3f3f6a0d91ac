"""Messages from the event follower to the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class EventsArrived(Message):
    """New complete events of one run (index ``run`` in the dashboard)."""

    run: int
    events: list[dict[str, Any]]


@dataclass
class EngineFinished(Message):
    """The in-process job ended: ``error`` is its one-line failure, if any."""

    error: str | None = None
    interrupted: bool = False

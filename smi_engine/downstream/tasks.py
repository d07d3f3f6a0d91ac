"""Downstream tasks: what synthetic data is for.

A task plugin registers ``register(name, factory)`` in ``register_tasks``; ``factory(**options)``
returns an object with ``run(context) -> dict`` (the result, JSON-able), and the factory has a
``description``. ``smi task NAME -o key=value`` is the one place where such text becomes typed
options: it calls the factory through ``call_factory``, which converts each value to the type the
factory's signature annotates and refuses unknown and missing options in one line (a dataclass
of the options is the simplest factory). The built-in ``quantize`` and ``kt`` tasks register
through the same hook; ``smi quantize`` and ``smi distill`` build their typed configs and call the
engine directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from smi_engine.runs.control import RunControl
from smi_engine.runtime.distributed import Placement
from smi_engine.runs.events import EventBus, EventSink


@dataclass
class TaskContext:
    device: torch.device
    out: Path | None = None
    sinks: list[EventSink] | None = None
    control: RunControl | None = None
    placement: Placement = field(default_factory=Placement)

    def bus(self) -> EventBus:
        return EventBus(self.sinks or [])


class Task(Protocol):
    """What ``factory(**options)`` returns; the options are the factory's own."""

    def run(self, context: TaskContext) -> dict[str, Any]: ...

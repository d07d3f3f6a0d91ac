"""Downstream tasks: what synthetic data is for.

A task plugin registers ``register(name, factory)`` in ``register_tasks``; ``factory()``
returns an object with a ``description`` and ``run(options, context) -> dict`` (the result,
JSON-able). ``options`` are plain values (``smi task NAME -o key=value`` passes them as
given; ``smi quantize`` and ``smi distill`` fill them from their typed flags). The built-in
``quantize`` and ``kt`` tasks register through the same hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from smi_engine.control import RunControl
from smi_engine.distributed import Placement
from smi_engine.errors import SmiError
from smi_engine.events import EventBus, EventSink
from smi_engine.models import ModelSpec


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
    description: str

    def run(self, options: dict[str, Any], context: TaskContext) -> dict[str, Any]: ...


def model_from_options(options: dict[str, Any], key: str) -> ModelSpec:
    """A model given as a spec dict (``key``) or as a model folder (``key + "_dir"``)."""
    if isinstance(options.get(key), dict):
        return ModelSpec.from_dict(options[key])
    if options.get(f"{key}_dir"):
        return ModelSpec.from_dir(options[f"{key}_dir"])
    raise SmiError(f"the task needs a {key}: give {key}_dir=FOLDER (a model folder from `smi teacher train`)")


def require(options: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if options.get(k) in (None, "")]
    if missing:
        raise SmiError(f"the task needs option {missing[0]!r}: pass it as {missing[0]}=VALUE")

"""Downstream tasks: what synthetic data is for.

A task plugin registers ``register(name, factory)`` in ``register_tasks``; ``factory()``
returns an object with a ``description`` and ``run(options, context) -> dict`` (the result,
JSON-able). ``options`` are plain values (``smi task NAME -o key=value`` passes them as
given; ``smi quantize`` and ``smi distill`` fill them from their typed flags). The built-in
``quantize`` and ``kt`` tasks register through the same hook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from smi_engine.runs.control import RunControl
from smi_engine.runtime.distributed import Placement
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus, EventSink
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


class TaskOptions:
    """A task's ``KEY=VALUE`` options, read with their types: a value of the wrong type, and a
    key the task never reads, are one-line errors rather than a traceback or silence."""

    def __init__(self, task: str, values: dict[str, Any]):
        self.task, self.values, self.known = task, dict(values), set()

    def raw(self, key: str) -> Any:
        """The value as given (marks the key as known)."""
        self.known.add(key)
        return self.values.get(key)

    def _bad(self, key: str, value: Any, kind: str) -> SmiError:
        return SmiError(f"task {self.task!r}: option {key}={value!r} is not {kind}: pass e.g. -o {key}=...")

    def has(self, key: str) -> bool:
        return self.raw(key) not in (None, "")

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value in (None, "") else str(value)

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.raw(key)
        if value in (None, ""):
            return default
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self._bad(key, value, "a whole number")
        try:
            return int(value)
        except ValueError:
            raise self._bad(key, value, "a whole number") from None

    def real(self, key: str, default: float | None = None) -> float | None:
        value = self.raw(key)
        if value in (None, ""):
            return default
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise self._bad(key, value, "a finite number")
        return number

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw(key)
        if value in (None, ""):
            return default
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise self._bad(key, value, "true or false")

    def texts(self, key: str) -> list[str]:
        value = self.raw(key)
        if value in (None, ""):
            return []
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]

    def model(self, key: str) -> ModelSpec:
        """A model given as a spec dict (``key``) or as a model folder (``key + "_dir"``)."""
        spec, folder = self.raw(key), self.raw(f"{key}_dir")
        if isinstance(spec, dict):
            return ModelSpec.from_dict(spec)
        if folder:
            return ModelSpec.from_dir(folder)
        raise SmiError(f"task {self.task!r} needs a {key}: give -o {key}_dir=FOLDER (a model folder from `smi teacher train`)")

    def require(self, *keys: str) -> None:
        missing = [k for k in keys if self.raw(k) in (None, "")]
        if missing:
            raise SmiError(f"task {self.task!r} needs option {missing[0]!r}: pass -o {missing[0]}=VALUE")

    def check_unknown(self) -> None:
        """Refuse keys the task never read (typos would otherwise be ignored)."""
        unknown = sorted(set(self.values) - self.known)
        if unknown:
            raise SmiError(f"task {self.task!r} has no option {unknown[0]!r}: its options are {', '.join(sorted(self.known))}")

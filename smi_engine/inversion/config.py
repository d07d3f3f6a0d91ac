"""A resolved inversion run (``InversionConfig``, what ``config.json`` stores) and the checks
of its settings, apart from the loop that runs it: the CLI, the Python API, distillation's
synthesis and the benchmark all build one, and resumes read one back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from smi_engine.checks import at_least, number, positive
from smi_engine.errors import SmiError
from smi_engine.inversion.losses import LossSpec
from smi_engine.inversion.schedule import Schedule
from smi_engine.inversion.selection import SelectionSpec
from smi_engine.models import ModelSpec

DEFAULT_LOSSES = (LossSpec("deepinversion"),)
#: What the pool's keep mask holds: the patches inverted to the end, or (the seed's) the top
#: patches re-scored on the final image, as many as the seed counts: int((N + 1) * prod(1 - r)),
#: its N + 1 counting the class token, so one more than were inverted at the seed's schedule.
FINAL_MASKS = ("inverted", "rescored")
#: The teacher's forward and backward under autocast; pixels and Adam state stay fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: More batches than any run makes (a million batches of one image take days on a GPU); the run
#: plans its batches up front, so an absurd count is refused rather than built.
MAX_BATCHES = 10**6


@dataclass
class InversionConfig:
    """A fully resolved inversion run (what ``config.json`` stores)."""

    model: ModelSpec
    schedule: Schedule = field(default_factory=Schedule)  # a str is parsed: the type holds from the edge in
    iterations: int = 4000
    batch_size: int = 32
    batches: int = 1
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    losses: list[LossSpec] = field(default_factory=lambda: list(DEFAULT_LOSSES))
    targets: str = "balanced"
    seed: int = 0
    jitter: float = 0.125
    flip: bool = True
    attention: str = "fused"
    jitter_at_stops: bool = True  # False: the seed's un-augmented steps just before and at each stop
    final_mask: str = "inverted"
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    precision: str = "fp32"
    compile: bool = False
    checkpoint_every: float = 60.0
    sinks: list[str] = field(default_factory=list)
    sink_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # --sink-option, by sink name
    teacher_sha256: str | None = None  # of the teacher's weights file when the run started: --resume checks it

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            self.schedule = Schedule.parse(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["schedule"] = str(self.schedule)
        data["model"] = self.model.to_dict()
        data["losses"] = [spec.to_dict() for spec in self.losses]
        data["betas"] = list(self.betas)
        data["selection"] = self.selection.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InversionConfig":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["model"] = ModelSpec.from_dict(data["model"])
        fields["losses"] = [LossSpec.from_dict(d) for d in data.get("losses", [])]
        fields["betas"] = tuple(data.get("betas", (0.5, 0.99)))
        fields["selection"] = SelectionSpec.from_dict(data.get("selection"))
        return cls(**fields)

    def validate(self) -> None:
        at_least("--iterations", self.iterations, 1, 4000)
        at_least("--batch-size", self.batch_size, 1, 32)
        number("--batches", self.batches, 8, low=1, high=MAX_BATCHES, integer=True)
        number("--seed", self.seed, 0, low=0, high=2**63 - 1, integer=True)  # what a torch generator takes
        positive("--lr", self.lr, 0.25)
        for beta in self.betas:
            number("Adam beta", beta, 0.9, low=0, high=1, exclusive="high")
        number("--jitter", self.jitter, 0.125, low=0, high=1, exclusive="high")
        number("--checkpoint-every", self.checkpoint_every, 60, low=0)
        if not self.losses:
            raise SmiError("no loss to optimise: pass at least one --loss, e.g. --loss deepinversion")
        for spec in self.losses:
            spec.validate()
        if self.precision not in PRECISIONS:
            raise SmiError(f"unknown --precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.final_mask not in FINAL_MASKS:
            raise SmiError(f"unknown --final-mask {self.final_mask!r}: use {' or '.join(FINAL_MASKS)}")


def config_digest(config: InversionConfig) -> str:
    """What a checkpoint was made under: every setting but those a resume may change freely."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_every", "sinks", "sink_options")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def parse_targets(spec: str, num_classes: int) -> list[int] | None:
    """The class list of ``--targets 3,5,7`` (None for ``balanced`` and ``random``), checked."""
    if spec in ("balanced", "random"):
        return None
    try:
        chosen = [int(v) for v in spec.split(",")]
    except ValueError:
        raise SmiError(f"bad --targets {spec!r}: use balanced, random, or class indices like 1,5,7") from None
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise SmiError(f"--targets class {bad[0]} is outside 0..{num_classes - 1}: the teacher has {num_classes} classes")
    return chosen

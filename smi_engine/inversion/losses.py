"""The contract between the inversion loop and loss plugins, and shared image priors.

A loss plugin registers a factory; ``factory(**options)`` returns a callable ``loss(state)``
that returns a scalar tensor or a dict of named scalar tensors. Optionally the returned
object also has:

``requires``        a set of extra features it reads: ``{"attention_outputs"}``
``setup(context)``  called once before the first batch with an ``InversionContext``
``after_backward()``  called after every backward pass (e.g. to step a trainable head)
``end_batch(state)``  called with the final ``LossState`` of each batch
``state_dict()`` / ``load_state_dict(d)``  tensors to keep in resume checkpoints
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from smi_engine.vit.augment import Jitter
from smi_engine.errors import SmiError
from smi_engine.models import LoadedModel, Normalizer
from smi_engine.vit.patches import PatchGrid
from smi_engine.vit.sparse_image import NeighbourDifferences, SparseImage
from smi_engine.vit.sparse_vit import SparseOutput, SparseViT


@dataclass
class InversionContext:
    """What a loss may need to prepare itself (given once to ``setup``)."""

    teacher: SparseViT
    loaded: LoadedModel
    device: torch.device
    batch_size: int
    iterations: int


class LossState:
    """Everything a loss can read at one iteration. Tensors are on the run's device.

    patches     (B, K, D) the kept patches being optimised (the leaf tensor), D = C*ph*pw
    tokens      (B, K, D) the patch vectors fed to the teacher (after jitter/flip)
    positions   (B, K) grid cells of the fed tokens (augmented coordinates)
    logits      (B, classes) teacher output for the fed tokens
    targets     (B,) class each image is inverted towards
    keep        (B, rows, cols) bool, patches still being inverted
    block_outputs      per block, (B, P + K, E) tokens after the block (P prefix tokens first)
    attention_outputs  per block, (B, P + K, heads*head_dim) attention output before its
                       projection; filled only for losses whose ``requires`` names it
    images      (B, C, H, W) the full image, normalised space; gradients reach the kept
                patches, stopped ones are frozen. Built on first access (costs a full image).
    augmented   (B, C, H, W) the jittered/flipped full image; built on first access
    teacher     the SparseViT (``teacher.model`` is the timm model, ``teacher.grid`` the grid)
    normalizer  the teacher's input normalisation
    iteration, iterations, batch   where the run is
    neighbour_differences()  a NeighbourDifferences: the total-variation prior's pixel
                differences over the whole image with stopped pixels frozen (right, down, both
                diagonals), with ``l2()`` and ``l1()``; costs in proportion to K
    view(jitter)       (tokens, positions) of the kept patches under another jitter
    forward(tokens, positions, attention_outputs=False)  the teacher on another view
    """

    def __init__(
        self, *, image: SparseImage, param: torch.Tensor, jitter: Jitter, tokens: torch.Tensor,
        positions: torch.Tensor, output: SparseOutput, targets: torch.Tensor, teacher: SparseViT,
        normalizer: Normalizer, iteration: int, iterations: int, batch: int,
    ):
        self._image, self._jitter = image, jitter
        self.patches, self.tokens, self.positions = param, tokens, positions
        self.logits = output.logits
        self.block_outputs, self.attention_outputs = output.block_outputs, output.attention_outputs
        self.targets, self.teacher, self.normalizer = targets, teacher, normalizer
        self.iteration, self.iterations, self.batch = iteration, iterations, batch
        self.forward = teacher.forward

    @functools.cached_property
    def keep(self) -> torch.Tensor:
        return self._image.keep_mask()

    @functools.cached_property
    def images(self) -> torch.Tensor:
        return self._image.images(self.patches)

    @functools.cached_property
    def augmented(self) -> torch.Tensor:
        return self._jitter.apply(self.images)

    def view(self, jitter: Jitter) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept patches as the teacher sees them under another jitter: (tokens, positions),
        ready for ``forward``. Gradients flow back to ``patches``."""
        return self._image.tokens(jitter, self.patches)

    def neighbour_differences(self) -> NeighbourDifferences:
        return self._image.neighbour_differences(self.patches)

    @property
    def grid(self) -> PatchGrid:
        return self.teacher.grid

    @property
    def num_prefix_tokens(self) -> int:
        return self.teacher.num_prefix_tokens


class Loss(Protocol):
    def __call__(self, state: LossState) -> torch.Tensor | dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss NAME[:WEIGHT]`` with its ``--loss-option NAME.key=value`` options."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "LossSpec":
        name, sep, weight = text.strip().partition(":")
        try:
            return cls(name.strip(), float(weight) if sep else 1.0)
        except ValueError:
            raise SmiError(f"bad --loss {text!r}: write NAME or NAME:WEIGHT, e.g. --loss psaq:0.5") from None

    def validate(self) -> None:
        """Weights are finite and not negative (a negative weight would maximise the loss: a
        term meant to be maximised returns its negative); numeric options are finite."""
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise SmiError(f"--loss {self.name}:{self.weight}: a weight is a finite number >= 0 (a negative one would "
                           f"maximise the loss), e.g. --loss {self.name}:0.5")
        for key, value in self.options.items():
            if _is_non_finite(value):
                raise SmiError(f"--loss-option {self.name}.{key}={value} is not a finite number: give a number, e.g. 1e-4")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LossSpec":
        return cls(data["name"], float(data.get("weight", 1.0)), dict(data.get("options", {})))


def _is_non_finite(value: Any) -> bool:
    """nan or inf, given as a number or as text ("nan", "inf" do not parse as Python literals)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def attach_options(specs: list[LossSpec], options: list[str]) -> list[LossSpec]:
    """Fold ``--loss-option NAME.key=value`` strings into the specs they name."""
    from smi_engine.plugins import plugin_options

    typed = plugin_options("losses", options, [s.name for s in specs], {s.name: s.options for s in specs})
    return [LossSpec(s.name, s.weight, typed[s.name]) for s in specs]


def build_losses(specs: list[LossSpec]) -> list[tuple[LossSpec, Any]]:
    """Each spec with its registered loss, built with the spec's options (bad ones: one line)."""
    from smi_engine.plugins import build_plugin

    return [(spec, build_plugin("losses", spec.name, spec.options)) for spec in specs]


def as_terms(name: str, result: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loss's return value as ``{"name.term": scalar}`` (a bare tensor becomes ``name``)."""
    if isinstance(result, torch.Tensor):
        items = {name: result}
    elif isinstance(result, dict):
        items = {f"{name}.{term}": value for term, value in result.items()}
    else:
        raise SmiError(f"loss {name!r} returned {type(result).__name__}: a loss returns a scalar tensor or a dict of them")
    for key, value in items.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise SmiError(f"loss term {key!r} is not a scalar tensor: reduce it (e.g. .mean()) before returning")
    return {key: value.reshape(()) for key, value in items.items()}


def loss_origin(name: str) -> str:
    """Which plugin registered a loss, for error messages."""
    from smi_engine.plugins import get_registry

    registration = get_registry().entries["losses"].get(name)
    return f"plugin {registration.plugin}" if registration else "not registered"

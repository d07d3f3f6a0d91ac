"""The contract between the inversion loop and patch-selection policies.

At every stop of the schedule, ``ratio`` of the patches still being optimised leave the
optimised set: from then on they are frozen and no longer fed to the teacher, which is what
makes each later iteration cheaper. A selection policy decides *which* patches leave, where they
go, and whether the patches still optimised at the end form an image (every pool image carries a
keep mask of exactly the patches it holds).

A plugin registers a factory through ``register_selections``; ``factory(**options)`` returns
an object with

``choose(stop: StopContext) -> Tensor``  (B, stop.leaving) positions, in 0..K-1 of
                     ``stop.kept``, of the patches that leave at this stop
``leaving``          where they go: ``"drop"`` (out of every image: SMI), ``"freeze"`` (kept in
                     the trajectory's final image as they left) or ``"emit"`` (saved at once as
                     an image of their own, with the trajectory's label: Patch Rebirth, so one
                     trajectory yields one image per stop plus its final one)
``keeps_remaining``  bool: the patches still optimised at the end form the final image (with
                     the frozen ones, under ``"freeze"``)

The built-ins ``smi``, ``pri`` and ``random`` (``smi_plugins.selections``) use this same hook.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from smi_engine.errors import SmiError
from smi_engine.vit.patches import PatchGrid


@dataclass
class StopContext:
    """What a policy sees at one stop. Tensors are on the run's device."""

    iteration: int
    ratio: float
    leaving: int  # patches of each image that leave the optimised set now
    kept: torch.Tensor  # (B, K) grid cells still optimised, sorted
    grid: PatchGrid
    generator: torch.Generator  # the batch's own stream (CPU): deterministic, resumable
    score: Callable[[], torch.Tensor] = field(repr=False)

    @functools.cached_property
    def attention(self) -> torch.Tensor:
        """(B, K) the last block's CLS attention to each optimised patch on the current,
        un-augmented image (the other optimised patches, not the frozen ones, in context).
        Computed on first access: a policy that does not read it costs no forward pass."""
        return self.score()

    def random_scores(self) -> torch.Tensor:
        """(B, K) uniform scores from the batch's stream, on the run's device."""
        return torch.rand(self.kept.shape, generator=self.generator).to(self.kept.device)


#: Where the patches that leave go (``Selection.leaving``).
LEAVING = ("drop", "freeze", "emit")


class Selection(Protocol):
    leaving: str
    keeps_remaining: bool

    def choose(self, stop: StopContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class SelectionSpec:
    """``--selection NAME`` with its ``--selection-option NAME.key=value`` options."""

    name: str = "smi"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, option_texts: list[str] | None = None) -> "SelectionSpec":
        """``--selection NAME`` and its ``--selection-option NAME.key=value`` strings."""
        from smi_engine.plugins import plugin_options

        return cls(name, plugin_options("selections", option_texts, [name])[name])

    def __str__(self) -> str:
        # Booleans as the command line writes them (keep_remaining=false).
        return ",".join([self.name, *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.options.items())])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SelectionSpec":
        data = data or {}
        return cls(data.get("name", "smi"), dict(data.get("options", {})))


def build_selection(spec: SelectionSpec) -> Selection:
    """The policy a spec names, with its options, checked against the contract."""
    from smi_engine.plugins import build_plugin, get_registry

    registration = get_registry().get("selections", spec.name)
    policy = build_plugin("selections", spec.name, spec.options)
    origin = f"selection {spec.name!r} (plugin {registration.plugin})"
    missing = [a for a in ("choose", "leaving", "keeps_remaining") if not hasattr(policy, a)]
    if missing:
        raise SmiError(f"{origin} has no {missing[0]!r}: see the selection contract in README")
    if not isinstance(policy.leaving, str) or policy.leaving not in LEAVING:
        raise SmiError(f"{origin} has leaving={policy.leaving!r}: it must be one of {', '.join(LEAVING)}")
    if not isinstance(policy.keeps_remaining, bool):
        raise SmiError(f"{origin} has keeps_remaining={policy.keeps_remaining!r}: it must be True or False")
    if policy.leaving == "drop" and not policy.keeps_remaining:
        raise SmiError(f"selection {spec.name!r} drops the patches that leave and keeps none that remain: "
                       f"no image would be made; set {spec.name}.keep_remaining=true or {spec.name}.leaving=emit")
    return policy


def checked_choice(policy: Selection, name: str, stop: StopContext) -> torch.Tensor:
    """The policy's choice at a stop as (B, leaving) distinct positions, or a one-line error."""
    try:
        chosen = policy.choose(stop)
    except SmiError:
        raise
    except Exception as exc:  # a plugin's bug: name it, in one line
        raise SmiError(f"selection {name!r} failed at iteration {stop.iteration}: {type(exc).__name__}: "
                       f"{str(exc).strip()[:160]}; fix it or choose another --selection") from None
    batch, width = stop.kept.shape
    expected = (batch, stop.leaving)
    if not isinstance(chosen, torch.Tensor) or tuple(chosen.shape) != expected or chosen.dtype != torch.long:
        got = tuple(chosen.shape) if isinstance(chosen, torch.Tensor) else type(chosen).__name__
        raise SmiError(f"selection {name!r} returned {got} at iteration {stop.iteration}: choose() returns "
                       f"int64 positions of shape {expected}")
    if stop.leaving:
        if int(chosen.min()) < 0 or int(chosen.max()) >= width:
            raise SmiError(f"selection {name!r} chose a position outside 0..{width - 1} at iteration {stop.iteration}")
        if bool((chosen.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise SmiError(f"selection {name!r} chose the same patch twice at iteration {stop.iteration}")
    return chosen.to(stop.kept.device)


def remaining_positions(leaving: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width - L) sorted positions not in ``leaving`` (B, L)."""
    stays = torch.ones(leaving.shape[0], width, dtype=torch.bool, device=leaving.device)
    stays.scatter_(1, leaving, False)
    return stays.nonzero()[:, 1].view(leaving.shape[0], width - leaving.shape[1])

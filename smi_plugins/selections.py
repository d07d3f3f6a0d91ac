"""The built-in patch-selection policies, registered through ``register_selections`` like any plugin's.

``smi``     Sparse Model Inversion (Hu et al., ICML 2024): the *least* attended patches leave
            and are dropped from the final image; what is inverted to the end is the image.
``pri``     Patch Rebirth Inversion (Heo & Choi, arXiv 2509.23235): the *most* attended
            patches leave, frozen as they are, and stay in the final image; the rest keep
            evolving, no longer overshadowed, and are part of the final image too.
``random``  the ablation: patches leave at random (dropped, like smi, unless keep_leaving).

Every built-in takes ``keep_leaving`` and ``keep_remaining`` to change what the final image holds.
"""

from __future__ import annotations

import torch

from smi_engine.checks import flag_value
from smi_engine.hookspecs import hookimpl
from smi_engine.selection import StopContext


class RankedSelection:
    """Patches leave by a per-patch score: the lowest (``lowest=True``) or highest first."""

    def __init__(self, name: str, lowest: bool, keep_leaving, keep_remaining):
        self.lowest = lowest
        self.keeps_leaving = flag_value(f"--selection-option {name}.keep_leaving", keep_leaving)
        self.keeps_remaining = flag_value(f"--selection-option {name}.keep_remaining", keep_remaining)

    def scores(self, stop: StopContext) -> torch.Tensor:
        return stop.attention

    def choose(self, stop: StopContext) -> torch.Tensor:
        return self.scores(stop).topk(stop.leaving, dim=1, largest=not self.lowest).indices


class RandomSelection(RankedSelection):
    """Patches leave in a random order drawn from the batch's own stream."""

    def scores(self, stop: StopContext) -> torch.Tensor:
        return stop.random_scores()


def smi(keep_leaving: bool = False, keep_remaining: bool = True) -> RankedSelection:
    return RankedSelection("smi", True, keep_leaving, keep_remaining)


def pri(keep_leaving: bool = True, keep_remaining: bool = True) -> RankedSelection:
    return RankedSelection("pri", False, keep_leaving, keep_remaining)


def random(keep_leaving: bool = False, keep_remaining: bool = True) -> RandomSelection:
    return RandomSelection("random", True, keep_leaving, keep_remaining)


@hookimpl
def register_selections(register):
    register("smi", smi)
    register("pri", pri)
    register("random", random)

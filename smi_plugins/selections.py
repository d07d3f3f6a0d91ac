"""The built-in patch-selection policies, registered through ``register_selections`` like any plugin's.

``smi``     Sparse Model Inversion (Hu et al., ICML 2024): the *least* attended patches leave
            and are dropped; what is inverted to the end is the image.
``pri``     Patch Rebirth Inversion (Heo & Choi, arXiv 2509.23235): the *most* attended
            patches leave and are saved as a sparse image of their own; the rest keep evolving,
            no longer overshadowed, and compete at the next stop. One trajectory, one image
            per stop plus the last one.
``random``  the ablation: patches leave at random, emitted like pri's.

Every built-in takes ``leaving`` (drop, freeze or emit) and ``keep_remaining``:
``pri.leaving=freeze`` is the frozen variant (the detached patches stay in the one final image).
"""

from __future__ import annotations

import torch

from smi_engine import LEAVING, StopContext, choice, hookimpl


class RankedSelection:
    """Patches leave by a per-patch score: the lowest (``lowest=True``) or highest first."""

    def __init__(self, name: str, lowest: bool, leaving, keep_remaining):
        self.lowest = lowest
        self.leaving = choice(f"--selection-option {name}.leaving", leaving, LEAVING)
        self.keeps_remaining = keep_remaining  # a bool: smi converts options to their annotated types

    def scores(self, stop: StopContext) -> torch.Tensor:
        return stop.attention

    def choose(self, stop: StopContext) -> torch.Tensor:
        return self.scores(stop).topk(stop.leaving, dim=1, largest=not self.lowest).indices


class RandomSelection(RankedSelection):
    """Patches leave in a random order drawn from the batch's own stream."""

    def scores(self, stop: StopContext) -> torch.Tensor:
        return stop.random_scores()


def smi(leaving: str = "drop", keep_remaining: bool = True) -> RankedSelection:
    return RankedSelection("smi", True, leaving, keep_remaining)


def pri(leaving: str = "emit", keep_remaining: bool = True) -> RankedSelection:
    return RankedSelection("pri", False, leaving, keep_remaining)


def random(leaving: str = "emit", keep_remaining: bool = True) -> RandomSelection:
    return RandomSelection("random", True, leaving, keep_remaining)


@hookimpl
def register_selections(register):
    register("smi", smi)
    register("pri", pri)
    register("random", random)

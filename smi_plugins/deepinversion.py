"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"), the dense loss SMI accelerates.

Terms (each weighted by its option; zero-weighted terms are skipped):
``ce``     cross-entropy of the teacher's logits against the targets (seed: 1)
``tv_l2``  total variation, l2 norm over four neighbour directions (seed for ViTs: 1e-4)
``tv_l1``  total variation, mean absolute difference (0)
``l2``     l2 norm of the image (0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smi_engine.hookspecs import hookimpl
from smi_engine.losses import LossState


class DeepInversionLoss:
    def __init__(self, ce: float = 1.0, tv_l2: float = 1e-4, tv_l1: float = 0.0, l2: float = 0.0):
        self.weights = {"ce": float(ce), "tv_l2": float(tv_l2), "tv_l1": float(tv_l1), "l2": float(l2)}

    def __call__(self, state: LossState) -> dict[str, torch.Tensor]:
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["ce"]:
            terms["ce"] = w["ce"] * F.cross_entropy(state.logits, state.targets)
        if w["tv_l2"] or w["tv_l1"]:
            diffs, counts = state.neighbour_differences()  # (B, 4, K*D), (4,)
            if w["tv_l2"]:  # sum over directions of the l2 norm of the differences
                terms["tv_l2"] = w["tv_l2"] * torch.linalg.vector_norm(diffs, dim=(0, 2)).sum()
            if w["tv_l1"]:  # sum over directions of the mean absolute difference
                terms["tv_l1"] = w["tv_l1"] * (diffs.abs().sum(dim=(0, 2)) / counts.clamp_min(1)).sum()
        if w["l2"]:
            terms["l2"] = w["l2"] * torch.linalg.vector_norm(state.patches)
        return terms


@hookimpl
def register_losses(register):
    register("deepinversion", DeepInversionLoss)

"""PSAQ-ViT's patch-similarity loss (Li et al., ECCV 2022, "Patch Similarity Aware Data-Free
Quantization for Vision Transformers").

For every block, the multi-head attention output (before its projection, averaged over heads)
of each fed patch token is compared with every other by cosine similarity. A Gaussian kernel
density estimate of those similarities is evaluated on ``points`` evenly spaced values between
their minimum and maximum, and its differential entropy (trapezoidal integral of -p log p) is
maximised: the loss is minus the entropy summed over blocks, averaged over images. Real images
give diverse patch similarities; noise does not. Only fed tokens take part, so it works as is
on sparse token sets. Defaults follow PSAQ-ViT: bandwidth 0.01, 10 points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smi_engine import LossState, hookimpl


def gaussian_kde(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Density at ``points`` (B, P) of the Gaussian KDE over ``samples`` (B, M)."""
    diffs = points.unsqueeze(-1) - samples.unsqueeze(1)  # (B, P, M)
    kernel = torch.exp(-diffs.pow(2) / (2 * bandwidth**2)) / math.sqrt(2 * math.pi * bandwidth**2)
    return kernel.mean(dim=-1)


def differential_entropy(density: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Mean over images of the trapezoidal integral of -p log p (p offset by 1e-4, as PSAQ)."""
    density = density + 1e-4
    return torch.trapezoid(-density * torch.log(density), points, dim=-1).mean()


def patch_similarity_entropy(tokens: torch.Tensor, bandwidth: float, points: int) -> torch.Tensor:
    """Entropy of the cosine-similarity distribution among patch tokens (B, K, C)."""
    sims = F.cosine_similarity(tokens.unsqueeze(1), tokens.unsqueeze(2), dim=3).flatten(1)  # (B, K*K)
    grid = torch.linspace(0, 1, points, device=tokens.device, dtype=tokens.dtype)
    low, high = sims.min().detach(), sims.max().detach()
    at = (low + (high - low) * grid).expand(sims.shape[0], -1)
    return differential_entropy(gaussian_kde(sims, at, bandwidth), at)


class PatchSimilarityLoss:
    requires = frozenset({"attention_outputs"})

    def __init__(self, bandwidth: float = 0.01, points: int = 10, blocks: str = "all"):
        if bandwidth <= 0 or points < 2:
            raise ValueError("bandwidth must be positive and points at least 2")
        self.bandwidth, self.points = bandwidth, points  # converted to the annotated types by smi
        self.blocks = None if blocks == "all" else [int(b) for b in blocks.strip("()[] ").split(",") if b.strip()]

    def __call__(self, state: LossState) -> torch.Tensor:
        heads = state.teacher.model.blocks[0].attn.num_heads
        chosen = state.attention_outputs if self.blocks is None else [state.attention_outputs[i] for i in self.blocks]
        total = state.logits.new_zeros(())
        for output in chosen:
            b, t, c = output.shape
            patches = output[:, state.num_prefix_tokens:].reshape(b, t - state.num_prefix_tokens, heads, c // heads).mean(2)
            total = total - patch_similarity_entropy(patches, self.bandwidth, self.points)
        return total


@hookimpl
def register_losses(register):
    register("psaq", PatchSimilarityLoss)

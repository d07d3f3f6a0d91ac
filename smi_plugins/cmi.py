"""Contrastive Model Inversion's instance contrastive loss (Fang et al., IJCAI 2021, "Contrastive
Model Inversion for Data-Free Knowledge Distillation"), for Vision Transformers.

Every synthetic image is seen in two views: the global view is the jittered input the teacher
already got this iteration; the local view is another jitter/flip of the same kept patches
with only a random subset of them fed (a fraction in ``[local_min, 1]``; dropping tokens is the
ViT counterpart of CMI's random resized crop, and stays exact under sparsity). An image's
feature is the mean of its patch tokens after each block, concatenated over blocks (CMI's
per-layer instance means). A small MLP head projects features onto the unit sphere; each
local view must pick out its own global view among those of the batch and of ``negatives``
earlier images drawn from a memory bank (``bank_size``), at ``temperature``. The head trains
alongside (Adam, ``head_lr``); the bank receives each batch's final images.
Defaults: temperature 0.1, bank 4096, 256 negatives, 128-d head with a 256-d hidden layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smi_engine import InversionContext, Jitter, LossState, hookimpl


def instance_features(block_outputs: list[torch.Tensor], prefix_tokens: int) -> torch.Tensor:
    """(B, blocks * E): mean of the patch tokens after each block."""
    return torch.cat([out[:, prefix_tokens:].mean(dim=1) for out in block_outputs], dim=1)


def contrastive_loss(local: torch.Tensor, global_: torch.Tensor, temperature: float, current: int) -> torch.Tensor:
    """CMI's loss on projected (unit) features: row i of ``local`` must match row i of
    ``global_`` (detached) among all rows. The first ``current`` rows are this batch; the rest
    come from the bank and are averaged separately, so the batch is not drowned out."""
    logits = local @ global_.detach().T / temperature
    losses = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")
    if len(logits) > current:
        return losses[:current].mean() + losses[current:].mean()
    return losses.mean()


class MemoryBank:
    """A ring buffer of (local, global) feature pairs of earlier synthetic images."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.data = torch.zeros(size, 2 * dim, device=device)
        self.count = 0  # how many rows were ever added

    def add(self, features: torch.Tensor) -> None:
        features = features.detach()[-len(self.data):]
        slots = (self.count + torch.arange(len(features), device=self.data.device)) % len(self.data)
        self.data[slots] = features
        self.count += len(features)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        filled = min(self.count, len(self.data))
        index = torch.randperm(filled, generator=generator)[:n].to(self.data.device)
        return self.data[index]


class ContrastiveLoss:
    def __init__(self, temperature: float = 0.1, bank_size: int = 4096, negatives: int = 256,
                 head_dim: int = 128, hidden_dim: int = 256, head_lr: float = 0.01, local_min: float = 0.25,
                 seed: int = 0):
        if temperature <= 0 or bank_size < 1 or negatives < 0 or not 0 < local_min <= 1:
            raise ValueError("need temperature > 0, bank_size >= 1, negatives >= 0 and local_min in (0, 1]")
        # Options arrive converted to the annotated types (smi_engine.plugins.typed_options).
        self.temperature, self.bank_size, self.negatives = temperature, bank_size, negatives
        self.head_dim, self.hidden_dim, self.head_lr, self.local_min = head_dim, hidden_dim, head_lr, local_min
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, context: InversionContext) -> None:
        dim = len(context.teacher.model.blocks) * context.teacher.width
        self.head = nn.Sequential(nn.Linear(dim, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, self.head_dim)).to(context.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.head_lr)
        self.bank = MemoryBank(self.bank_size, dim, context.device)

    def _local_view(self, state: LossState) -> torch.Tensor:
        jitter = Jitter.sample(state.grid, 0.125, True, self.generator)
        tokens, positions = state.view(jitter)
        k = tokens.shape[1]
        keep = max(1, round(k * float(torch.empty(1).uniform_(self.local_min, 1.0, generator=self.generator))))
        chosen = torch.rand(tokens.shape[:2], generator=self.generator).argsort(dim=1)[:, :keep].sort(dim=1).values
        chosen = chosen.to(tokens.device)
        tokens = tokens.gather(1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        out = state.forward(tokens, positions.gather(1, chosen))
        return instance_features(out.block_outputs, state.num_prefix_tokens)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=1)

    def __call__(self, state: LossState) -> torch.Tensor:
        global_ = instance_features(state.block_outputs, state.num_prefix_tokens)
        local = self._local_view(state)
        batch = len(global_)
        if self.bank.count and self.negatives:
            cached_local, cached_global = self.bank.sample(self.negatives, self.generator).chunk(2, dim=1)
            local, global_ = torch.cat([local, cached_local]), torch.cat([global_, cached_global])
        return contrastive_loss(self._project(local), self._project(global_), self.temperature, batch)

    def after_backward(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_batch(self, state: LossState) -> None:
        with torch.no_grad():
            local = self._local_view(state)
            global_ = instance_features(state.block_outputs, state.num_prefix_tokens)
        self.bank.add(torch.cat([local, global_], dim=1))

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "bank": self.bank.data.cpu(), "count": self.bank.count, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.data.copy_(state["bank"])
        self.bank.count = int(state["count"])
        self.generator.set_state(state["generator"])


@hookimpl
def register_losses(register):
    register("cmi", ContrastiveLoss)

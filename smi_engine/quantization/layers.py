"""The fake-quantised modules every built-in scheme composes: linear layers (and the patch
embedding's convolution) with quantised weights and inputs, and timm's attention with both
matmuls' operands quantised. Plugin schemes built from them get block reconstruction."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.quantization.quantizers import (
    ActivationQuantizer, LearnedRounding, WeightGrid, quantize_weight, quantize_weight_searched,
)


class QuantLinear(nn.Module):
    """A linear layer (or the patch-embedding convolution) with a fake-quantised weight and,
    optionally, a fake-quantised input. The weight stays float until it is rounded, to nearest
    (``quantize_weights``) or as learned (``learn_rounding``, then ``fix_rounding``)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, w_bit: int, input_quantizer: ActivationQuantizer | None = None,
                 searched_weights: bool = False):
        super().__init__()
        self.layer, self.w_bit, self.searched_weights = layer, w_bit, searched_weights
        self.input_quantizer = input_quantizer
        self._rounding: LearnedRounding | None = None  # while learning; never in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.input_quantizer is None else self.input_quantizer(x)
        if self._rounding is None:
            return self.layer(x)
        weight = self._rounding.soft_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)

    @torch.no_grad()
    def quantize_weights(self) -> None:
        quantize = quantize_weight_searched if self.searched_weights else quantize_weight
        self.layer.weight.copy_(quantize(self.layer.weight, self.w_bit))

    def learn_rounding(self) -> LearnedRounding:
        """Start learning how each weight rounds on this layer's grid; returns the learner."""
        self._rounding = LearnedRounding(self.layer.weight, WeightGrid(self.layer.weight, self.w_bit, self.searched_weights))
        return self._rounding

    @torch.no_grad()
    def fix_rounding(self) -> None:
        """Round the weight as learned, and stop learning."""
        self.layer.weight.copy_(self._rounding.hard_weight())
        self._rounding = None


class QuantAttention(nn.Module):
    """timm's multi-head attention, explicit, with both matmuls' operands fake-quantised."""

    def __init__(self, attention: nn.Module, q: nn.Module, k: nn.Module, probs: nn.Module, v: nn.Module):
        super().__init__()
        if not all(hasattr(attention, a) for a in ("qkv", "num_heads", "head_dim", "scale", "proj")):
            raise SmiError(f"cannot quantise {type(attention).__name__}: expected timm's Attention (fused qkv)")
        self.inner = attention
        self.q, self.k, self.probs, self.v = q, k, probs, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise SmiError("quantised attention does not take masks")
        a = self.inner
        b, n, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        probs = (self.q(q * a.scale) @ self.k(k).transpose(-2, -1)).softmax(dim=-1)
        if hasattr(self.probs, "observe_product"):  # a softmax quantiser calibrated on what the probabilities compute
            self.probs.observe_product(probs, v)
        out = (self.probs(probs) @ self.v(v)).transpose(1, 2).reshape(b, n, -1)
        out = a.norm(out)
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


def softmax_quantizers(qmodel: nn.Module) -> list[ActivationQuantizer]:
    """The quantisers of the attention probabilities (``QuantAttention.probs``): the one
    activation whose scale depends on how many tokens a sequence has."""
    return [m.probs for m in qmodel.modules() if isinstance(m, QuantAttention) and isinstance(m.probs, ActivationQuantizer)]


def is_attention(module: nn.Module) -> bool:
    return hasattr(module, "qkv") and hasattr(module, "proj") and not isinstance(module, QuantAttention)


def swap_attention(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if is_attention(child):
                setattr(module, name, make(child))


def swap_linear_layers(model: nn.Module, make: Callable[[str, nn.Module], QuantLinear]) -> None:
    """Replace every ``nn.Linear``/``nn.Conv2d`` by ``make(qualified_name, layer)``."""
    for parent_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.Linear, nn.Conv2d):
                setattr(module, name, make(f"{parent_name}.{name}".lstrip("."), child))


def finish_quantizers(qmodel: nn.Module) -> None:
    """Fix every activation range from what calibration fed."""
    for module in qmodel.modules():
        if isinstance(module, ActivationQuantizer):
            module.finish()


def round_weights(qmodel: nn.Module) -> None:
    """Round every quantised layer's weight to the nearest level."""
    for module in qmodel.modules():
        if isinstance(module, QuantLinear):
            module.quantize_weights()

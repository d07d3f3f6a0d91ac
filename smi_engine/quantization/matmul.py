"""The ``matmul`` scheme (the default): fake-quantise the inputs of every matrix product.

Activations per tensor on the input of every linear layer (patch embedding, qkv, proj, fc1,
fc2, head) and on both operands of both attention matmuls (q and k; the softmax probabilities
and v); LayerNorm, softmax and GELU stay in float. Weights per output channel, symmetric.
The modules here (quantised linear layers and attention) are shared with ``repq``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.quantization.quantizers import ActivationQuantizer, quantize_weight, quantize_weight_searched
from smi_engine.quantization.scheme import QuantConfig, quantizers


class QuantLinear(nn.Module):
    """A linear layer (or the patch-embedding convolution) with a fake-quantised weight and,
    optionally, a fake-quantised input."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, w_bit: int, input_quantizer: ActivationQuantizer | None = None,
                 searched_weights: bool = False):
        super().__init__()
        self.layer, self.w_bit, self.searched_weights = layer, w_bit, searched_weights
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x if self.input_quantizer is None else self.input_quantizer(x))

    @torch.no_grad()
    def quantize_weights(self) -> None:
        quantize = quantize_weight_searched if self.searched_weights else quantize_weight
        self.layer.weight.copy_(quantize(self.layer.weight, self.w_bit))


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
        out = (self.probs(probs) @ self.v(v)).transpose(1, 2).reshape(b, n, -1)
        out = a.norm(out)
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


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
    for quantizer in quantizers(qmodel):
        quantizer.finish()


def quantize_weights(qmodel: nn.Module) -> None:
    for module in qmodel.modules():
        if isinstance(module, QuantLinear):
            module.quantize_weights()


class MatmulScheme:
    description = "inputs of every linear layer and both attention matmuls, per tensor; weights per channel, symmetric"
    default_calibrator = "minmax"

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        swap_attention(model, lambda attention: QuantAttention(attention, *(config.activation() for _ in range(4))))
        swap_linear_layers(model, lambda _name, layer: QuantLinear(layer, config.w_bit, config.activation()))
        return model

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None:
        finish_quantizers(qmodel)
        quantize_weights(qmodel)

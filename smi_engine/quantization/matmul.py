"""The ``matmul`` scheme (the default): fake-quantise the inputs of every matrix product.

Activations per tensor on the input of every linear layer (patch embedding, qkv, proj, fc1,
fc2, head) and on both operands of both attention matmuls (q and k; the softmax probabilities
and v); LayerNorm, softmax and GELU stay in float. Weights per output channel, symmetric.
"""

from __future__ import annotations

from torch import nn

from smi_engine.quantization.layers import QuantAttention, QuantLinear, finish_quantizers, swap_attention, swap_linear_layers
from smi_engine.quantization.scheme import QuantConfig


class MatmulScheme:
    description = "inputs of every linear layer and both attention matmuls, per tensor; weights per channel, symmetric"
    default_calibrator = "minmax"

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        swap_attention(model, lambda attention: QuantAttention(attention, *(config.activation() for _ in range(4))))
        swap_linear_layers(model, lambda _name, layer: QuantLinear(layer, config.w_bit, config.activation()))
        return model

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None:
        finish_quantizers(qmodel)

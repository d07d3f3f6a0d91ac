"""The ``repq`` scheme, after RepQ-ViT (Li et al., ICCV 2023): the ``matmul`` positions, with

- the post-LayerNorm activations (the inputs of qkv and fc1) calibrated per channel, then
  reparameterised so that inference stays per tensor: channel c's scale s_c and zero point z_c
  become the layer's mean scale s and (rounded) mean zero point z by dividing the LayerNorm's
  affine by r_c = s_c / s and shifting it by b_c = (z - z_c) s, while the next layer's weight
  columns are multiplied by r_c and its bias absorbs W' b. Because z and z_c are integers, the
  per-tensor quantiser then gives exactly the per-channel quantisation; only the weights
  (quantised after the fold) see the change;
- the softmax probabilities quantised in the log-sqrt(2) domain (``softmax=adaptive-log``: on
  AdaLog's searched base, which holds at 3 bits);
- the other activations clipped by RepQ-ViT's percentile search, the image kept at 8 bits;
- weights per output channel, asymmetric, with the same search.

Departure: ranges are observed on float activations in one pass (RepQ-ViT calibrates each
quantiser on already-quantised inputs, in order).
"""

from __future__ import annotations

import torch
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.quantization.layers import (
    QuantAttention, QuantLinear, finish_quantizers, swap_attention, swap_linear_layers,
)
from smi_engine.quantization.quantizers import ActivationQuantizer, AdaptiveLogQuantizer, LogQuantizer, zero_point_levels
from smi_engine.quantization.scheme import QuantConfig

IMAGE_BITS = 8
SOFTMAX_QUANTIZERS = {"log-sqrt2": LogQuantizer, "adaptive-log": AdaptiveLogQuantizer, "uniform": None}


def post_norm_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, QuantLinear]]:
    """(LayerNorm, the linear layer reading its output) of every block: norm1 -> qkv, norm2 -> fc1."""
    pairs = []
    for block in getattr(model, "blocks", []):
        attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        attention = attention.inner if isinstance(attention, QuantAttention) else attention
        for norm, linear in ((getattr(block, "norm1", None), getattr(attention, "qkv", None)),
                             (getattr(block, "norm2", None), getattr(mlp, "fc1", None))):
            if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None and linear is not None:
                pairs.append((norm, linear))
    return pairs


@torch.no_grad()
def fold_channel_ranges(norm: nn.LayerNorm, linear: QuantLinear) -> None:
    """Fold the per-channel ranges of ``linear``'s input quantiser into ``norm`` and ``linear``."""
    quantizer = linear.input_quantizer
    scale_c, zero_c = zero_point_levels(quantizer.channel_low, quantizer.channel_high, quantizer.bits)
    scale, zero = scale_c.mean(), zero_c.mean().round()
    ratio = scale_c / scale
    shift = (zero - zero_c) * scale
    norm.weight.div_(ratio)
    norm.bias.div_(ratio).sub_(shift)
    layer = linear.layer
    layer.weight.mul_(ratio)
    layer.bias.add_(layer.weight @ shift)
    quantizer.low.fill_(float(-zero * scale))
    quantizer.high.fill_(float((2**quantizer.bits - 1 - zero) * scale))


class RepQScheme:
    """Options (``--scheme-option repq.KEY=VALUE``), each an ablation of one of RepQ-ViT's ideas:
    ``reparameterize=false`` quantises the post-LayerNorm activations per tensor with no fold,
    ``softmax`` picks the probabilities' grid (``log-sqrt2``, RepQ-ViT's; ``adaptive-log``,
    AdaLog's searched base; ``uniform``), ``image_bits`` sets the bits of the patch embedding's
    input (at least the activations' own)."""

    description = ("RepQ-ViT: matmul positions, post-LayerNorm activations per channel folded into LayerNorm, "
                   "log-sqrt(2) softmax, searched clipping")
    default_calibrator = "search"

    def __init__(self, reparameterize: bool = True, softmax: str = "log-sqrt2", image_bits: int = IMAGE_BITS):
        if not 2 <= image_bits <= 16:
            raise SmiError(f"--scheme-option repq.image_bits={image_bits} is outside 2..16: pass e.g. repq.image_bits=8")
        if softmax not in SOFTMAX_QUANTIZERS:
            raise SmiError(f"--scheme-option repq.softmax={softmax} is not a softmax grid: "
                           f"pass repq.softmax={' or '.join(SOFTMAX_QUANTIZERS)}")
        self.reparameterize, self.softmax, self.image_bits = reparameterize, softmax, image_bits

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        def softmax_quantizer() -> ActivationQuantizer:
            if self.softmax == "uniform":
                return config.activation()
            return SOFTMAX_QUANTIZERS[self.softmax](config.a_bit, config.calibrator, config.percentile)

        swap_attention(model, lambda attention: QuantAttention(
            attention, config.activation(), config.activation(), softmax_quantizer(), config.activation()))
        # By identity, before they are wrapped.
        folded = {id(linear) for _, linear in post_norm_pairs(model)} if self.reparameterize else set()

        def make(name: str, layer: nn.Module) -> QuantLinear:
            if isinstance(layer, nn.Conv2d):  # the patch embedding reads the image: 8 bits, as RepQ-ViT
                quantizer = ActivationQuantizer(max(self.image_bits, config.a_bit), config.calibrator, config.percentile)
            else:
                quantizer = config.activation(per_channel=id(layer) in folded)
                if id(layer) in folded and layer.bias is None:  # the fold needs a bias to shift
                    layer.bias = nn.Parameter(torch.zeros(layer.out_features), requires_grad=False)
            return QuantLinear(layer, config.w_bit, quantizer, searched_weights=True)

        swap_linear_layers(model, make)
        return model

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None:
        finish_quantizers(qmodel)
        if self.reparameterize:
            for norm, linear in post_norm_pairs(qmodel):
                fold_channel_ranges(norm, linear)

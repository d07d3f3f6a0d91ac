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
- weights per output channel, asymmetric, with the same search;
- optionally (``balance``), before calibration, channels balanced by an equivalent
  transformation of the float weights: queries against keys (q_c / t_c, k_c * t_c with
  t_c = sqrt(max|q_c| / max|k_c|), so both reach sqrt(max|q_c| max|k_c|) and q.k is unchanged),
  and values against the projection (v_c / s_c, the projection's column c times s_c, s_c the
  channel's reach over their geometric mean: SmoothQuant's alpha = 1). The per-tensor q, k and
  v quantisers then see channels of one reach; the qkv weights, quantised per row, lose nothing,
  and the projection's weights take the values' spread.

Departure: ranges are observed on float activations in one pass (RepQ-ViT calibrates each
quantiser on already-quantised inputs, in order).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.quantization.layers import (
    QuantAttention, QuantLinear, finish_quantizers, is_attention, swap_attention, swap_linear_layers,
)
from smi_engine.quantization.quantizers import ActivationQuantizer, AdaptiveLogQuantizer, LogQuantizer, zero_point_levels
from smi_engine.quantization.scheme import QuantConfig

IMAGE_BITS = 8
SOFTMAX_QUANTIZERS = {"log-sqrt2": LogQuantizer, "adaptive-log": AdaptiveLogQuantizer, "uniform": None}
BALANCES = ("none", "qk", "qkv")  # what ``balance`` equalises: nothing, queries with keys, and values too


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


@torch.no_grad()
def balance_attention(attention: QuantAttention, reach: torch.Tensor, values: bool) -> None:
    """Rescale ``attention``'s qkv rows (and, with ``values``, its projection's columns) from
    ``reach``, the largest |output| of its qkv layer per channel; the float model computes the same."""
    inner = attention.inner
    q, k, v = reach.view(3, -1)
    rows = torch.ones_like(reach).view(3, -1)
    rows[1] = torch.where((q > 0) & (k > 0), (q / k).sqrt(), 1.0)  # a dead channel stays as it is
    rows[0] = 1 / rows[1]
    if values:
        live = v > 0
        spread = torch.where(live, v / v[live].log().mean().exp(), 1.0)
        rows[2] = 1 / spread
        inner.proj.layer.weight.mul_(spread)
    qkv = inner.qkv.layer
    qkv.weight.mul_(rows.reshape(-1, 1))
    if qkv.bias is not None:
        qkv.bias.mul_(rows.reshape(-1))


def _check_balanceable(attention: nn.Module, values: bool) -> None:
    """Balancing passes a scale through q_norm and k_norm (and the output norm, for values): only
    an identity lets it through unchanged."""
    norms = ("q_norm", "k_norm", "norm") if values else ("q_norm", "k_norm")
    if any(not isinstance(getattr(attention, name, nn.Identity()), nn.Identity) for name in norms):
        option = "qkv" if values else "qk"
        raise SmiError(f"--scheme-option repq.balance={option} needs attention without q/k normalisation "
                       f"({type(attention).__name__} normalises them): pass repq.balance=none")


class RepQScheme:
    """Options (``--scheme-option repq.KEY=VALUE``), each an ablation of one of RepQ-ViT's ideas:
    ``reparameterize=false`` quantises the post-LayerNorm activations per tensor with no fold,
    ``softmax`` picks the probabilities' grid (``log-sqrt2``, RepQ-ViT's; ``adaptive-log``,
    AdaLog's searched base; ``uniform``), ``image_bits`` sets the bits of the patch embedding's
    input (at least the activations' own). ``balance`` goes beyond the paper: ``qk`` balances
    queries with keys, ``qkv`` values with the projection too (``none``, the default: as published)."""

    description = ("RepQ-ViT: matmul positions, post-LayerNorm activations per channel folded into LayerNorm, "
                   "log-sqrt(2) softmax, searched clipping")
    default_calibrator = "search"

    def __init__(self, reparameterize: bool = True, softmax: str = "log-sqrt2", image_bits: int = IMAGE_BITS,
                 balance: str = "none"):
        if not 2 <= image_bits <= 16:
            raise SmiError(f"--scheme-option repq.image_bits={image_bits} is outside 2..16: pass e.g. repq.image_bits=8")
        if softmax not in SOFTMAX_QUANTIZERS:
            raise SmiError(f"--scheme-option repq.softmax={softmax} is not a softmax grid: "
                           f"pass repq.softmax={' or '.join(SOFTMAX_QUANTIZERS)}")
        if balance not in BALANCES:
            raise SmiError(f"--scheme-option repq.balance={balance} is not a balancing: "
                           f"pass repq.balance={' or '.join(BALANCES)}")
        self.reparameterize, self.softmax, self.image_bits, self.balance = reparameterize, softmax, image_bits, balance

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        def softmax_quantizer() -> ActivationQuantizer:
            if self.softmax == "uniform":
                return config.activation()
            return SOFTMAX_QUANTIZERS[self.softmax](config.a_bit, config.calibrator, config.percentile)

        if self.balance != "none":
            for attention in model.modules():
                if is_attention(attention):
                    _check_balanceable(attention, values=self.balance == "qkv")
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

    @torch.no_grad()
    def prepare(self, qmodel: nn.Module, config: QuantConfig, feed: Callable[[], None]) -> None:
        """Balance each attention's channels on the largest values one float pass of the
        calibration images (``feed``) gives its qkv layer."""
        if self.balance == "none":
            return
        reach: dict[QuantAttention, torch.Tensor] = {}

        def watch(attention: QuantAttention):
            def seen(_module, _inputs, output: torch.Tensor) -> None:
                largest = output.detach().abs().flatten(0, -2).amax(0)
                reach[attention] = torch.maximum(reach[attention], largest) if attention in reach else largest
            return attention.inner.qkv.register_forward_hook(seen)

        attentions = [m for m in qmodel.modules() if isinstance(m, QuantAttention)]
        hooks = [watch(attention) for attention in attentions]
        try:
            feed()
        finally:
            for hook in hooks:
                hook.remove()
        for attention, largest in reach.items():  # one the forward never calls has nothing to balance
            balance_attention(attention, largest, values=self.balance == "qkv")

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None:
        finish_quantizers(qmodel)
        if self.reparameterize:
            for norm, linear in post_norm_pairs(qmodel):
                fold_channel_ranges(norm, linear)

"""Post-training quantisation of a timm ViT, by composition: modules are swapped for
fake-quantised twins that hold the same weights.

Weights: per output channel, symmetric, ``scale = max|w| / ((2^b - 1) / 2)``, levels
``[-2^(b-1), 2^(b-1) - 1]`` (as PSAQ-ViT and the seed). Activations: per tensor, asymmetric,
``scale = (high - low) / (2^b - 1)`` with a rounded zero point, on the input of every linear
layer (patch embedding, qkv, proj, fc1, fc2, head) and on both operands of both attention
matmuls (q and k; the softmax probabilities and v). LayerNorm, softmax and GELU stay in
float. Ranges come from calibration data through a calibrator: ``minmax`` (PSAQ-ViT),
``percentile`` (clip at the given percentile of values), ``mse`` (the clipping of the
observed range that minimises the quantisation error).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smi_engine.errors import SmiError

CALIBRATORS = ("minmax", "percentile", "mse")
SAMPLES_PER_OBSERVER = 2**18  # values kept per activation for percentile/mse calibration


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 8
    a_bit: int = 8
    calibrator: str = "minmax"
    percentile: float = 99.99

    def validate(self) -> None:
        for name in ("w_bit", "a_bit"):
            if not 2 <= getattr(self, name) <= 16:
                raise SmiError(f"--{name.replace('_', '-')} {getattr(self, name)} is outside 2..16 bits")
        if self.calibrator not in CALIBRATORS:
            raise SmiError(f"unknown calibrator {self.calibrator!r}: use {', '.join(CALIBRATORS)}")
        if not 50 < self.percentile <= 100:
            raise SmiError(f"--percentile {self.percentile} must be in (50, 100]")

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantisation."""
    levels = 2**bits - 1
    reach = weight.detach().abs().flatten(1).amax(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    scale = (reach / (levels / 2)).clamp_min(torch.finfo(weight.dtype).eps)
    return (weight / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def quantize_activation(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric fake quantisation to the range [low, high]."""
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(torch.finfo(x.dtype).eps)
    zero_point = (-(low / scale).round()).clamp(0, levels)
    return ((x / scale + zero_point).round().clamp(0, levels) - zero_point) * scale


class ActivationQuantizer(nn.Module):
    """Observes an activation while calibrating, fake-quantises it afterwards."""

    def __init__(self, bits: int, config: QuantConfig):
        super().__init__()
        self.bits, self.config = bits, config
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.calibrating = True
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrating:
            return quantize_activation(x, self.low, self.high, self.bits)
        values = x.detach().flatten()
        self.low.copy_(torch.minimum(self.low, values.min()) if self._samples else values.min())
        self.high.copy_(torch.maximum(self.high, values.max()) if self._samples else values.max())
        if values.numel() > SAMPLES_PER_OBSERVER:
            pick = torch.randint(values.numel(), (SAMPLES_PER_OBSERVER,), generator=self._generator)
            values = values[pick.to(values.device)]
        self._samples.append(values.float().cpu())
        return x

    def finish(self) -> None:
        """Fix the range from what was observed; from now on, quantise."""
        if not self._samples:
            raise SmiError("a quantiser saw no calibration data: the calibration set fed no tokens through it")
        values = torch.cat(self._samples)
        if len(values) > SAMPLES_PER_OBSERVER:
            values = values[torch.randperm(len(values), generator=self._generator)[:SAMPLES_PER_OBSERVER]]
        if self.config.calibrator == "percentile":
            q = self.config.percentile / 100
            self.low.fill_(float(torch.quantile(values, 1 - q)))
            self.high.fill_(float(torch.quantile(values, q)))
        elif self.config.calibrator == "mse":
            low, high = self._best_clip(values, float(self.low), float(self.high))
            self.low.fill_(low)
            self.high.fill_(high)
        self._samples = []
        self.calibrating = False

    def _best_clip(self, values: torch.Tensor, low: float, high: float) -> tuple[float, float]:
        """Shrink each end of the observed range (two rounds of coordinate descent over 2%..100%)
        to the clipping with the least mean squared quantisation error."""
        values = values[: SAMPLES_PER_OBSERVER // 4]
        fractions = torch.linspace(0.02, 1.0, 50).tolist()

        def error(lo: float, hi: float) -> float:
            return float((quantize_activation(values, torch.tensor(lo), torch.tensor(hi), self.bits) - values).pow(2).mean())

        lo, hi = low, high
        for _ in range(2):
            hi = min((high * f for f in fractions), key=lambda h: error(lo, h))
            lo = min((low * f for f in fractions), key=lambda l: error(l, hi))
        return lo, hi


class QuantLinear(nn.Module):
    """A linear layer (or the patch-embedding convolution) with fake-quantised input and weight."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, config: QuantConfig):
        super().__init__()
        self.layer = layer
        self.input_quantizer = ActivationQuantizer(config.a_bit, config)
        self.w_bit = config.w_bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.input_quantizer(x))


class QuantAttention(nn.Module):
    """timm's multi-head attention, explicit, with both matmuls' operands fake-quantised."""

    def __init__(self, attention: nn.Module, config: QuantConfig):
        super().__init__()
        if not all(hasattr(attention, a) for a in ("qkv", "num_heads", "head_dim", "scale", "proj")):
            raise SmiError(f"cannot quantise {type(attention).__name__}: expected timm's Attention (fused qkv)")
        self.inner = attention
        self.q, self.k, self.probs, self.v = (ActivationQuantizer(config.a_bit, config) for _ in range(4))

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


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A fake-quantised copy of ``model`` (the original is untouched), ready to calibrate."""
    config.validate()
    qmodel = copy.deepcopy(model)
    for module in list(qmodel.modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "qkv") and hasattr(child, "proj") and not isinstance(child, QuantAttention):
                setattr(module, child_name, QuantAttention(child, config))
    for module in list(qmodel.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Linear, nn.Conv2d):
                setattr(module, child_name, QuantLinear(child, config))
    return qmodel.eval()


def quantizers(qmodel: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in qmodel.modules() if isinstance(m, ActivationQuantizer)]


def freeze_quantizers(qmodel: nn.Module) -> None:
    """Quantise with the stored ranges (a saved model being loaded back)."""
    for quantizer in quantizers(qmodel):
        quantizer.calibrating = False


@torch.no_grad()
def finish_calibration(qmodel: nn.Module) -> None:
    """Fix every activation range and quantise the weights in place."""
    for quantizer in quantizers(qmodel):
        quantizer.finish()
    for module in qmodel.modules():
        if isinstance(module, QuantLinear):
            module.layer.weight.copy_(quantize_weight(module.layer.weight, module.w_bit))

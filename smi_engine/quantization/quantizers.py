"""The arithmetic of fake quantisation, and the observers that choose its ranges.

Weights are quantised per output channel: symmetric (``scale = max|w| / ((2^b - 1) / 2)``,
levels ``[-2^(b-1), 2^(b-1) - 1]``, as PSAQ-ViT and the seed) or asymmetric with a searched
clipping (RepQ-ViT). Activations are quantised per tensor, uniformly and asymmetrically
(``scale = (high - low) / (2^b - 1)`` with a rounded zero point), or on a logarithmic grid
for softmax probabilities: base sqrt(2) (RepQ-ViT) or a searched base (AdaLog). Observers see
float activations while calibrating and fix their range when calibration finishes; from then on
they quantise. Block reconstruction (``smi_engine.downstream.reconstruct``) then learns an
observer's step size (LSQ) and a layer's weight rounding (AdaRound) on the same grids.
"""

from __future__ import annotations

import torch
from torch import nn

from smi_engine.errors import SmiError

SEARCH_PERCENTILES = (0.999, 0.9999, 0.99999)
SAMPLES_PER_OBSERVER = 2**18  # values kept per activation and batch for the calibrators that need them


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantisation."""
    levels = 2**bits - 1
    reach = weight.detach().abs().flatten(1).amax(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    scale = (reach / (levels / 2)).clamp_min(torch.finfo(weight.dtype).eps)
    return (weight / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def quantize_weight_searched(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel asymmetric fake quantisation, each channel clipped at whichever of
    its 99.9/99.99/99.999th percentiles quantises it with the least squared error (RepQ-ViT)."""
    rows = weight.detach().flatten(1)
    low, high = searched_ranges(rows, bits, dim=1)
    return quantize_activation(rows, low.unsqueeze(1), high.unsqueeze(1), bits).view_as(weight).to(weight.dtype)


def searched_ranges(values: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (low, high) per slice along ``dim`` of a 2-D tensor: the percentile clipping
    (``SEARCH_PERCENTILES``) with the least mean squared quantisation error, the first on ties."""
    best_low = best_high = best_error = None
    for p in SEARCH_PERCENTILES:
        low, high = torch.quantile(values, 1 - p, dim=dim, keepdim=True), torch.quantile(values, p, dim=dim, keepdim=True)
        error = (quantize_activation(values, low, high, bits) - values).pow(2).mean(dim=dim, keepdim=True)
        if best_error is None:
            best_low, best_high, best_error = low, high, error
        else:
            better = error < best_error
            best_low, best_high = torch.where(better, low, best_low), torch.where(better, high, best_high)
            best_error = torch.minimum(error, best_error)
    return best_low.squeeze(dim), best_high.squeeze(dim)


@torch.no_grad()  # rounding passes no gradient to x: computed in place, one tensor instead of six
def quantize_activation(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform asymmetric fake quantisation to the range [low, high] (broadcasting); no gradient
    (``quantize_learned_step`` is the one that learns)."""
    scale, zero_point = zero_point_levels(low, high, bits)
    return (x / scale).add_(zero_point).round_().clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)


def quantize_learned_step(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``quantize_activation`` with a learnable step size: rounding passes gradients straight
    through (LSQ), so the step learns from the values inside the range and the clipped ones."""
    step = step.clamp_min(torch.finfo(step.dtype).eps)
    scaled = x / step
    levels = (scaled + (scaled.round() - scaled).detach() + zero).clamp(0, 2**bits - 1)
    return (levels - zero) * step


@torch.no_grad()  # rounding passes no gradient to x: computed in place, two tensors instead of eleven
def quantize_log(x: torch.Tensor, delta: torch.Tensor, exponent: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Logarithmic fake quantisation of non-negative values (softmax probabilities): level
    ``q = round(-log2(x / delta) / exponent)`` in ``0 .. 2^b - 1`` stands for
    ``delta * 2^(-q * exponent)``, a base of ``2^exponent``; values below the smallest level become 0."""
    levels = 2**bits
    q = (x / delta).clamp_min_(torch.finfo(x.dtype).tiny).log2_().div_(-exponent).round_()
    below = q >= levels
    return q.clamp_(0, levels - 1).mul_(-exponent).exp2_().mul_(delta).masked_fill_(below, 0.0)


def qdrop(quantized: torch.Tensor, float_values: torch.Tensor, drop: float) -> torch.Tensor:
    """``quantized`` with each value put back in float with probability ``drop`` (QDrop), in
    steps of 1/65536. The draw was a reconstruction step's largest cost on CPU (a float per
    value); one 64-bit word gives four values' 16 bits, twice as fast. A lerp with 0/1 weights
    picks either side exactly, several times faster than torch.where on CPU."""
    if drop >= 1:  # the threshold below would not fit 16 bits
        return float_values
    count = quantized.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=quantized.device).random_(-2**63, None)
    bits = words.view(torch.int16)[:count].view(quantized.shape)  # uniform over -32768 .. 32767
    return torch.lerp(quantized, float_values, (bits < round(drop * 65536) - 32768).to(quantized.dtype))


class ActivationQuantizer(nn.Module):
    """Observes an activation while calibrating, fake-quantises it per tensor afterwards.

    ``per_channel`` observers (the inputs RepQ-ViT reparameterises) also find one range per
    channel of the last dimension (``channel_low``/``channel_high``); the scheme folds those into
    the neighbouring layers and leaves this quantiser a per-tensor range.

    For block reconstruction a quantiser can pass values through in float (``bypass``: the float
    reference), leave each value in float with probability ``drop`` (QDrop), and learn its step
    size with the zero point held (``learn_step``/``fix_step``).
    """

    learns_step = True

    def __init__(self, bits: int, calibrator: str = "minmax", percentile: float = 99.99, per_channel: bool = False):
        super().__init__()
        self.bits, self.calibrator, self.percentile, self.per_channel = bits, calibrator, percentile, per_channel
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.calibrating = True
        self.bypass, self.drop = False, 0.0
        self._step_ratio: torch.Tensor | None = None  # learned step / calibrated step, a plain leaf: never in the state dict
        self.channel_low = self.channel_high = None
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self._step_ratio is not None:
            return quantize_learned_step(x, self._calibrated_step * self._step_ratio, self._zero, self.bits)
        return quantize_activation(x, self.low, self.high, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if not self.calibrating:
            quantized = self.quantize(x)
            if self.drop > 0:
                quantized = qdrop(quantized, x, self.drop)
            return quantized
        # A running min/max over every value seen (the seed's rule), whatever the calibrator.
        low, high = x.detach().min(), x.detach().max()
        self.low.copy_(torch.minimum(self.low, low) if self._samples else low)
        self.high.copy_(torch.maximum(self.high, high) if self._samples else high)
        self._samples.append(self._subsample(x.detach()))
        return x

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        values = x.reshape(-1, x.shape[-1]) if self.per_channel else x.flatten()
        budget = max(1, SAMPLES_PER_OBSERVER // (values.shape[1] if self.per_channel else 1))
        if len(values) > budget:
            values = values[torch.randint(len(values), (budget,), generator=self._generator).to(values.device)]
        return values.float().cpu()

    def finish(self) -> None:
        """Fix the range from what was observed; from now on, quantise."""
        if not self._samples:
            raise SmiError("a quantiser saw no calibration data: the calibration set fed no tokens through it")
        values = torch.cat(self._samples)
        if self.per_channel:
            self.channel_low, self.channel_high = self._channel_ranges(values)
        elif self.fits_range:
            low, high = self._fit(values[torch.randperm(len(values), generator=self._generator)[:SAMPLES_PER_OBSERVER]])
            self.low.fill_(low)
            self.high.fill_(high)
        self._samples = []
        self.calibrating = False

    def learn_step(self) -> torch.Tensor:
        """Start learning the step size of the fixed range (its zero point held); returns the
        learned factor on the calibrated step (1 at the start). A factor, not the step itself, so
        that one learning rate moves a 16-bit step (1e-4 of a range) as far, relatively, as a
        3-bit one."""
        scale, self._zero = zero_point_levels(self.low, self.high, self.bits)
        self._calibrated_step = scale.detach().clone()
        self._step_ratio = torch.ones_like(scale, requires_grad=True)
        return self._step_ratio

    @torch.no_grad()
    def fix_step(self) -> None:
        """Make the learned step size this quantiser's range and stop learning it."""
        step = (self._calibrated_step * self._step_ratio).clamp_min(torch.finfo(self._calibrated_step.dtype).eps)
        self.low.copy_(-self._zero * step)
        self.high.copy_((2**self.bits - 1 - self._zero) * step)
        self._step_ratio = None

    @property
    def fits_range(self) -> bool:
        """Whether the range comes from the samples rather than the running min/max."""
        return self.calibrator != "minmax"

    def _fit(self, values: torch.Tensor) -> tuple[float, float]:
        if self.calibrator == "percentile":
            q = self.percentile / 100
            return float(torch.quantile(values, 1 - q)), float(torch.quantile(values, q))
        if self.calibrator == "search":
            return min(((float(torch.quantile(values, 1 - p)), float(torch.quantile(values, p))) for p in SEARCH_PERCENTILES),
                       key=lambda r: self._error(values, *r))
        return self._best_clip(values, float(self.low), float(self.high))

    def _channel_ranges(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) lows and highs, one range per channel, by the calibrator (mse searches as ``search``)."""
        if self.calibrator == "minmax":
            return values.amin(dim=0), values.amax(dim=0)
        if self.calibrator == "percentile":
            q = self.percentile / 100
            return torch.quantile(values, 1 - q, dim=0), torch.quantile(values, q, dim=0)
        return searched_ranges(values, self.bits, dim=0)

    def _error(self, values: torch.Tensor, low: float, high: float) -> float:
        return float((quantize_activation(values, torch.tensor(low), torch.tensor(high), self.bits) - values).pow(2).mean())

    def _best_clip(self, values: torch.Tensor, low: float, high: float) -> tuple[float, float]:
        """Shrink each end of the observed range (two rounds of coordinate descent over 2%..100%)
        to the clipping with the least mean squared quantisation error."""
        values = values[: SAMPLES_PER_OBSERVER // 4]
        fractions = torch.linspace(0.02, 1.0, 50).tolist()
        lo, hi = low, high
        for _ in range(2):
            hi = min((high * f for f in fractions), key=lambda h: self._error(values, lo, h))
            lo = min((low * f for f in fractions), key=lambda l: self._error(values, l, hi))
        return lo, hi


class LogQuantizer(ActivationQuantizer):
    """Softmax probabilities in the log-sqrt(2) domain (RepQ-ViT); ``high`` holds delta, the
    value of level 0, searched among the 99.9/99.99/99.999th percentiles and the maximum."""

    fits_range = True
    learns_step = False  # its delta stays as searched
    EXPONENT = 0.5  # base 2^0.5

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_log(x, self.high, self.EXPONENT, self.bits)

    def _fit(self, values: torch.Tensor) -> tuple[float, float]:
        error = lambda d: float((quantize_log(values, torch.tensor(d), self.EXPONENT, self.bits) - values).pow(2).mean())
        return 0.0, min(_delta_candidates(values), key=error, default=1.0)


class AdaptiveLogQuantizer(LogQuantizer):
    """Softmax probabilities on a logarithmic grid whose base is searched too (AdaLog, Wu et al.,
    ECCV 2024). At 3 bits the eight levels of base sqrt(2) span only delta .. delta/11, and most
    probabilities of a 65-token row (mean 1/65) fall below them to 0; a wider base keeps them.
    The base ``2^exponent`` (exponent k/37, k in 10..110: AdaLog's grid) and delta are searched,
    two rounds of coordinate descent, for the least squared error of what the probabilities
    compute, ``probs @ v`` (seen through ``observe_product``), rather than of the probabilities
    themselves: there, the many small ones count by their sum. Departures: AdaLog holds delta
    at 1 and rounds its levels to a lookup table for integer hardware; here delta is searched as
    ``LogQuantizer``'s is, and the levels are exact powers of the base."""

    EXPONENTS = tuple(k / 37 for k in range(10, 111))

    def __init__(self, bits: int, calibrator: str = "minmax", percentile: float = 99.99):
        super().__init__(bits, calibrator, percentile)
        self.register_buffer("exponent", torch.tensor(self.EXPONENT))
        self._products: list[tuple[torch.Tensor, torch.Tensor]] = []

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_log(x, self.high, self.exponent, self.bits)

    def observe_product(self, probs: torch.Tensor, values: torch.Tensor) -> None:
        """Keep some (batch, head) slices of ``probs`` (..., n, n) and the ``values`` (..., n, d)
        they multiply, about ``SAMPLES_PER_OBSERVER`` probabilities a call."""
        if self.bypass or not self.calibrating:
            return
        probs, values = probs.detach().flatten(0, -3), values.detach().flatten(0, -3)
        budget = max(1, SAMPLES_PER_OBSERVER // probs[0].numel())
        picked = torch.randperm(len(probs), generator=self._generator)[:budget].to(probs.device)
        self._products.append((probs[picked].float().cpu(), values[picked].float().cpu()))

    def _fit(self, values: torch.Tensor) -> tuple[float, float]:
        """Fixes the base as it fits delta."""
        if not self._products:
            raise SmiError("the adaptive softmax quantiser saw no attention values: its attention must call observe_product")
        products = [(probs, v, probs @ v) for probs, v in self._products]
        self._products = []

        def error(delta: float, exponent: float) -> float:
            return sum(float((quantize_log(probs, torch.tensor(delta), exponent, self.bits) @ v - out).pow(2).sum())
                       for probs, v, out in products)

        deltas = _delta_candidates(values) or [1.0]
        delta, exponent = max(deltas), self.EXPONENT
        for _ in range(2):
            exponent = min(self.EXPONENTS, key=lambda e: error(delta, e))
            delta = min(deltas, key=lambda d: error(d, exponent))
        self.exponent.fill_(exponent)
        return 0.0, delta


def _delta_candidates(values: torch.Tensor) -> list[float]:
    """The positive ones of the 99.9/99.99/99.999th percentiles and the maximum."""
    candidates = [float(torch.quantile(values, p)) for p in SEARCH_PERCENTILES] + [float(values.max())]
    return [d for d in candidates if d > 0]


def validate_bits(w_bit: int, a_bit: int) -> None:
    for name, bits in (("w-bit", w_bit), ("a-bit", a_bit)):
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise SmiError(f"--{name} {bits} is outside 2..16 bits: choose e.g. 8, 4 or 3")


def zero_point_levels(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and the integer zero point that ``quantize_activation`` uses for [low, high]."""
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(torch.finfo(low.dtype).eps)
    return scale, (-(low / scale).round()).clamp(0, levels)


class WeightGrid:
    """The per-output-channel levels a weight is quantised to: ``(q - zero) * scale`` for integer
    ``q`` in ``[low_level, high_level]``; symmetric (zero 0, as ``quantize_weight``) or asymmetric
    with searched clipping (as ``quantize_weight_searched``)."""

    def __init__(self, weight: torch.Tensor, bits: int, searched: bool):
        shape = (-1, *([1] * (weight.dim() - 1)))
        rows = weight.detach().flatten(1)
        if searched:
            scale, zero = zero_point_levels(*searched_ranges(rows, bits, dim=1), bits)
            self.low_level, self.high_level = 0, 2**bits - 1
        else:
            scale = (rows.abs().amax(dim=1) / ((2**bits - 1) / 2)).clamp_min(torch.finfo(weight.dtype).eps)
            zero = torch.zeros_like(scale)
            self.low_level, self.high_level = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.scale, self.zero = scale.view(shape), zero.view(shape)

    def value(self, below: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The weight at level ``below + up`` (``up`` in [0, 1]: soft while learning)."""
        levels = (below + up + self.zero).clamp(self.low_level, self.high_level)
        return (levels - self.zero) * self.scale


class LearnedRounding(nn.Module):
    """AdaRound (Nagel et al., 2020): each weight rounds down or up, chosen by a learned
    rectified sigmoid ``h(alpha)`` that starts at the weight's exact fractional level; a
    regulariser pushes every ``h`` to 0 or 1, and the final weight takes ``alpha >= 0`` as up."""

    ZETA, GAMMA = 1.1, -0.1  # the stretch of the sigmoid beyond [0, 1], as in the paper

    def __init__(self, weight: torch.Tensor, grid: WeightGrid):
        super().__init__()
        self.grid = grid
        scaled = weight.detach() / grid.scale
        self.below = scaled.floor()
        rest = scaled - self.below
        self.alpha = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))

    def up(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0, 1)

    def soft_weight(self) -> torch.Tensor:
        return self.grid.value(self.below, self.up())

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        return self.grid.value(self.below, (self.alpha >= 0).to(self.below.dtype))

    def regulariser(self, sharpness: float) -> torch.Tensor:
        """Zero when every ``h`` is 0 or 1; ``sharpness`` (beta) anneals from flat to steep."""
        return (1 - (2 * self.up() - 1).abs().pow(sharpness)).sum()

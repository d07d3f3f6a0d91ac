"""Block reconstruction on the calibration images: BRECQ (Li et al., ICLR 2021) with QDrop
(Wei et al., ICLR 2022), after the ranges are fixed and before the weights are rounded.

The quantised model is a chain of units in the order data flows through it: by default the
patch embedding, each of ``blocks`` and the head (every ``QuantLinear`` outside the blocks); a
model laid out otherwise names its own with ``reconstruction_units()`` -> ``[(name, module)]``,
each module called once per forward. Each unit in turn:

- is fed what the quantised model feeds it (the units before it already reconstructed), and
  aims at what the float model's same unit outputs on the float model's inputs;
- learns how each weight of its ``QuantLinear`` layers rounds (AdaRound: Adam, a regulariser
  weighted 0.01 from 20 % of the iterations on, its sharpness annealed from 20 to 2) and the
  step size of each uniform ``ActivationQuantizer`` (LSQ: Adam on a factor of the calibrated
  step, so that one rate suits 3 and 16 bits alike; cosine to zero), minimising
  ``|out - target|^p`` summed over channels and averaged over images and tokens;
- with QDrop, leaves each activation, and each value of its input, in float with probability
  ``drop`` while learning (0: BRECQ, always quantised);
- ends with the rounding fixed and the step sizes written back as ranges: the model saves and
  reloads as any quantised model.

Defaults follow QDrop's published configuration (drop 0.5, p = 2, the regulariser and its
annealing, one calibration batch per iteration) except the step budget: QDrop runs 20,000
iterations per unit at Adam lr 1e-3 (rounding) and 4e-5 (step sizes, absolute); here 500
iterations at 1e-2 and 1e-3 of each step (the absolute 4e-4 used before is about that at 3 bits,
but multiplied a 16-bit step, 1e-4 of its range, many times over), so that alpha can travel far
enough from its start (which rounds to nearest) in a CPU's budget. Measured on the digits ViT,
W3A3, 5 calibration draws of 32 images: ranges alone 72.5 % on average, QDrop's learning rates
at 100 iterations no better (-1.2 to +7 points, unstable), these defaults +0.6 to +5.4 points,
every draw better.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from smi_engine.calibration import Batch, ModelFeeder
from smi_engine.errors import SmiError
from smi_engine.models import Normalizer
from smi_engine.quantization.layers import QuantLinear
from smi_engine.quantization.names import ReconstructConfig
from smi_engine.quantization.quantizers import ActivationQuantizer, qdrop

WARMUP = 0.2  # share of the iterations before the rounding regulariser starts
SHARPNESS = (20.0, 2.0)  # the regulariser's beta, annealed linearly after the warm-up
ROUNDING_WEIGHT = 0.01
REPORTS_PER_UNIT, MAX_STEPS_BETWEEN_REPORTS = 20, 25  # progress (and a chance to stop) at least this often

#: report(phase, done, total, **fields): progress, and where a requested stop ends the job.
Report = Callable[..., None]


@dataclass(frozen=True)
class UnitResult:
    name: str
    nearest_error: float  # the unit's output error with weights rounded to nearest, calibrated steps
    learned_error: float  # ... with the learned rounding and steps (both on quantised inputs, no drop)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconstruction_units(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units of a quantised model, in the order data flows (see the module docstring)."""
    if hasattr(qmodel, "reconstruction_units"):
        units = list(qmodel.reconstruction_units())
    else:
        blocks = {id(block) for block in getattr(qmodel, "blocks", [])}
        units, inside = [], None
        for name, module in qmodel.named_modules():
            if inside is not None and name.startswith(inside + "."):
                continue
            if id(module) in blocks or isinstance(module, QuantLinear):
                units.append((name, module))
                inside = name
    if not any(isinstance(m, QuantLinear) for _, unit in units for m in unit.modules()):
        raise SmiError(f"{type(qmodel).__name__} has no QuantLinear layers to reconstruct: build the scheme from "
                       "smi_engine.quantization.layers, or use --reconstruct none")
    return units


def lp_distance(output: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """|output - target|^p summed over channels (dim 1 of a convolution's output, else the last),
    averaged over the rest."""
    channels = 1 if output.dim() == 4 else -1
    return (output - target).abs().pow(p).sum(channels).mean()


class _Captured(Exception):
    """Raised from a unit's hook: the rest of the model need not run."""


@dataclass
class _Calls:
    inputs: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]


@torch.no_grad()
def _capture(feed: Callable[[Batch], torch.Tensor], unit: nn.Module, batches: list[Batch]) -> _Calls:
    """What ``unit`` receives and returns on each batch, running the model only up to it."""
    calls = _Calls([], [])

    def before(_module, args, kwargs):
        calls.inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    def after(_module, _args, _kwargs, output):
        calls.outputs.append(output.detach())
        raise _Captured

    handles = [unit.register_forward_pre_hook(before, with_kwargs=True),
               unit.register_forward_hook(after, with_kwargs=True)]
    try:
        for index, batch in enumerate(batches):
            try:
                feed(batch)
            except _Captured:
                pass
            if len(calls.outputs) != index + 1:
                raise SmiError(f"reconstruction unit {type(unit).__name__} was not called by the model's forward: "
                               "a scheme's reconstruction_units() must name modules its forward calls")
    finally:
        for handle in handles:
            handle.remove()
    return calls


def reconstruct(feeder: ModelFeeder, batches: list[Batch], source: Normalizer, config: ReconstructConfig,
                seed: int = 0, report: Report | None = None) -> list[UnitResult]:
    """Reconstruct every unit of the quantised model ``feeder`` feeds (ranges fixed, weights
    still float) in turn; its weights end rounded. ``batches`` are calibration batches in the
    ``source`` normalisation, fed the way ``feeder`` feeds them (sparse tokens or blanked)."""
    config.validate()
    qmodel = feeder.model
    report = report or (lambda *args, **fields: None)
    units = reconstruction_units(qmodel)
    reference = copy.deepcopy(qmodel)  # the float model: every quantiser passes values through
    for quantizer in reference.modules():
        if isinstance(quantizer, ActivationQuantizer):
            quantizer.bypass = True
    reference_units = dict(reconstruction_units(reference))
    quantized_feed, float_feed = feeder, feeder.for_model(reference)
    batches = [part for batch in batches for part in batch.by_kept_count()]  # one unit call per batch
    for parameter in qmodel.parameters():
        parameter.requires_grad_(False)
    device = next(qmodel.parameters()).device
    results = []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for index, (name, unit) in enumerate(units, 1):
            phase = f"reconstruct {index}/{len(units)} {name}"
            quantized = _capture(lambda b: quantized_feed(b, source), unit, batches)
            target = _capture(lambda b: float_feed(b, source), reference_units[name], batches)
            results.append(_reconstruct_unit(name, unit, quantized, target, config, lambda *a, **f: report(phase, *a, **f)))
    return results


def _reconstruct_unit(name: str, unit: nn.Module, quantized: _Calls, target: _Calls, config: ReconstructConfig,
                      report: Report) -> UnitResult:
    started = time.perf_counter()
    layers = [m for m in unit.modules() if isinstance(m, QuantLinear)]
    activations = [m for m in unit.modules() if isinstance(m, ActivationQuantizer)]
    learners = [a for a in activations if a.learns_step]
    nearest = _nearest_error(unit, layers, quantized, target, config.p)
    roundings = [layer.learn_rounding() for layer in layers]
    steps = [a.learn_step() for a in learners]
    for quantizer in activations:
        quantizer.drop = config.drop
    optimizers = [torch.optim.Adam([r.alpha for r in roundings], lr=config.rounding_lr)] if roundings else []
    schedulers = []
    if steps and config.step_lr > 0:
        optimizers.append(torch.optim.Adam(steps, lr=config.step_lr))
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[-1], T_max=config.iterations, eta_min=0.0))
    every = max(1, min(config.iterations // REPORTS_PER_UNIT, MAX_STEPS_BETWEEN_REPORTS))
    window = []
    try:
        for iteration in range(config.iterations):
            j = int(torch.randint(len(quantized.inputs), ()))
            args, kwargs = _mixed_inputs(quantized.inputs[j], target.inputs[j], config.drop)
            error = lp_distance(unit(*args, **kwargs), target.outputs[j], config.p)
            loss = error
            if roundings and iteration >= WARMUP * config.iterations:
                sharpness = _sharpness(iteration, config.iterations)
                loss = error + ROUNDING_WEIGHT * sum(r.regulariser(sharpness) for r in roundings)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            window.append(float(error.detach()))
            if (iteration + 1) % every == 0 or iteration + 1 == config.iterations:
                report(iteration + 1, config.iterations, loss=sum(window) / len(window))
                window = []
    finally:  # also when a stop is asked: the unit is left whole (rounded, ranges fixed)
        for quantizer in activations:
            quantizer.drop = 0.0
        for quantizer in learners:
            quantizer.fix_step()
        for layer in layers:
            layer.fix_rounding()
    learned = _output_error(unit, quantized, target, config.p)
    return UnitResult(name, nearest, learned, time.perf_counter() - started)


def _sharpness(iteration: int, iterations: int) -> float:
    start, end = SHARPNESS
    begin = WARMUP * iterations
    progress = (iteration - begin) / max(1.0, iterations - begin)
    return end + (start - end) * max(0.0, 1.0 - progress)


def _mixed_inputs(quantized: tuple[tuple, dict], reference: tuple[tuple, dict], drop: float) -> tuple[tuple, dict]:
    """The unit's quantised input with each value left in float with probability ``drop`` (QDrop)."""
    (args, kwargs), (float_args, _) = quantized, reference
    if drop <= 0 or not args or not torch.is_tensor(args[0]) or args[0].shape != float_args[0].shape:
        return args, kwargs
    first = qdrop(args[0], float_args[0], drop)
    return (first, *args[1:]), kwargs


@torch.no_grad()
def _output_error(unit: nn.Module, quantized: _Calls, target: _Calls, p: float) -> float:
    errors = [float(lp_distance(unit(*args, **kwargs), out, p)) for (args, kwargs), out in zip(quantized.inputs, target.outputs)]
    error = sum(errors) / len(errors)
    return error if math.isfinite(error) else float("inf")


@torch.no_grad()
def _nearest_error(unit: nn.Module, layers: list[QuantLinear], quantized: _Calls, target: _Calls, p: float) -> float:
    """The unit's error with its weights rounded to nearest (the float weights are restored)."""
    saved = [layer.layer.weight.clone() for layer in layers]
    for layer in layers:
        layer.quantize_weights()
    try:
        return _output_error(unit, quantized, target, p)
    finally:
        for layer, weight in zip(layers, saved):
            layer.layer.weight.copy_(weight)

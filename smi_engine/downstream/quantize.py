"""Data-free post-training quantisation, end to end: calibrate on synthetic (or noise, or real)
images, then measure the fake-quantised model against the full-precision one on real data.

With an output folder the job is a run directory like any other (``config.json``,
``events.jsonl``, ``summary.json`` with the results) that also holds the quantised model, so
``--teacher DIR`` loads it. Events: ``run_start``, ``progress`` (phase, done, total: images
while calibrating and evaluating, iterations with the loss while reconstructing a unit),
``calibrated``, ``reconstructed`` (each unit's error rounded to nearest and as learned),
``quantized``, ``run_end``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from smi_engine.calibration import Batch, ModelFeeder, calibration_batches
from smi_engine.checks import at_least, number
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.data import ModelInput, check_fits, load_data, loader
from smi_engine.downstream.evaluate import evaluate
from smi_engine.runs.events import EventBus
from smi_engine.files import check_writable
from smi_engine.models import LoadedModel, ModelSpec, Normalizer, load_model, save_model
from smi_engine.runs.rundir import RunDir
from smi_engine.quantization.layers import round_weights, softmax_quantizers
from smi_engine.quantization.quantizers import ActivationQuantizer
from smi_engine.quantization.names import DEFAULT_SPARSE_CALIB, ReconstructConfig, check_sparse_calib
from smi_engine.downstream.reconstruct import reconstruct
from smi_engine.quantization.scheme import (
    QuantConfig, QuantScheme, fix_ranges, prepare_calibration, quantize_model, quantizers,
)
from smi_engine.runs.session import RunSession

RUN_KIND = "quantize"


@dataclass
class QuantizeJob:
    model: ModelSpec
    calib: str  # RUN_DIR | noise | real:SPEC
    data: str  # real validation data for the accuracies
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib_size: int = 32
    batch_size: int = 64
    limit: int | None = None  # evaluate at most this many validation images
    seed: int = 0
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    sparse_calib: str = DEFAULT_SPARSE_CALIB  # how sparse pool images calibrate the model: hybrid | tokens | blanked

    def validate(self) -> None:
        self.quant.validate()
        self.reconstruct.validate()
        check_sparse_calib(self.sparse_calib)
        at_least("--calib-size", self.calib_size, 1, 32)
        at_least("--batch-size", self.batch_size, 1, 64)
        if self.limit is not None:
            at_least("--limit", self.limit, 0, 1000)
        number("--seed", self.seed, 0, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "calib": self.calib, "data": self.data, "quant": self.quant.to_dict(),
                "calib_size": self.calib_size, "batch_size": self.batch_size, "limit": self.limit, "seed": self.seed,
                "reconstruct": self.reconstruct.to_dict(), "sparse_calib": self.sparse_calib}


def calibrate(loaded: LoadedModel, job: QuantizeJob, device: torch.device, bus: EventBus | None = None,
              control: RunControl | None = None, scheme: QuantScheme | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A calibrated fake-quantised copy of the model (reconstructed with ``job.reconstruct``),
    and what it was calibrated on; ``scheme``: the job's, if already built."""
    bus = bus or EventBus()
    report = _reporter(bus, control)
    started = time.perf_counter()
    qmodel = quantize_model(loaded.model, job.quant, scheme).to(device)
    feeder = ModelFeeder(qmodel, loaded.normalizer, "blanked" if job.sparse_calib == "blanked" else "tokens")
    generator = torch.Generator().manual_seed(job.seed)
    batches, source, label = calibration_batches(job.calib, job.calib_size, job.batch_size, feeder.model_input, generator)
    batches = list(batches)  # reconstruction feeds them again
    for batch in batches:
        batch.images = batch.images.to(device)
    kept = [batch.keep.float().mean().item() for batch in batches if batch.keep is not None]
    images = sum(len(batch.images) for batch in batches)
    prepare_calibration(qmodel, job.quant, lambda: _observe(feeder, batches, source, quantizers(qmodel),
                                                            lambda done: report("prepare", done, images)))
    whole = softmax_quantizers(qmodel) if job.sparse_calib == "hybrid" and kept else []
    _observe(feeder, batches, source, whole, lambda done: report("calibrate", done, images))
    if whole:  # hybrid: the softmax ranges from the whole images, the other quantisers watching none of it
        others = [q for q in quantizers(qmodel) if all(q is not w for w in whole)]
        _observe(ModelFeeder(qmodel, loaded.normalizer, "blanked"), batches, source, others,
                 lambda done: report("calibrate softmax", done, images))
    fix_ranges(qmodel, job.quant)
    info = {"calib": label, "calib_images": images, "calib_kept_fraction": sum(kept) / len(kept) if kept else 1.0,
            "sparse_calib": job.sparse_calib, "reconstruct": job.reconstruct.mode}
    bus.emit("calibrated", **info, seconds=time.perf_counter() - started)
    if job.reconstruct.enabled:
        started = time.perf_counter()
        units = reconstruct(feeder, batches, source, job.reconstruct, job.seed, report)
        info["reconstruction"] = {"units": [u.to_dict() for u in units], "seconds": time.perf_counter() - started}
        bus.emit("reconstructed", **info["reconstruction"])
    else:
        round_weights(qmodel)
    return qmodel, info


@torch.no_grad()
def _observe(feeder: ModelFeeder, batches: list[Batch], source: Normalizer, blind: list[ActivationQuantizer],
             report: Callable[[int], None]) -> None:
    """Feed the calibration batches to the observers, all but the ``blind`` ones (those pass
    values through unseen); ``report(images so far)`` after each batch."""
    for quantizer in blind:
        quantizer.bypass = True
    try:
        seen = 0
        for batch in batches:
            feeder(batch, source)
            seen += len(batch.images)
            report(seen)
    finally:
        for quantizer in blind:
            quantizer.bypass = False


def _reporter(bus: EventBus, control: RunControl | None) -> Callable[..., None]:
    """Emits ``progress``; between batches (and reconstruction steps) is where a requested stop
    (Ctrl-C, ``smi watch --stop``) ends the job."""
    def report(phase: str, done: int, total: int, **fields: Any) -> None:
        bus.emit("progress", phase=phase, done=done, total=total, **fields)
        if control is not None and control.should_stop():
            raise RunInterrupted(f"stopped while {phase} ({done}/{total})", -1, -1)
    return report


def run_quantization(job: QuantizeJob, device: torch.device, bus: EventBus | None = None, out: Path | None = None,
                     control: RunControl | None = None) -> dict[str, Any]:
    """Calibrate and evaluate; with ``out``, as a run directory that keeps the quantised model.
    A stop asked of ``control`` ends the job with RunInterrupted (nothing saved)."""
    job.validate()
    bus = bus or EventBus()
    session = None if out is None else RunSession(RunDir(out), RUN_KIND, bus)
    if session is not None:
        check_writable(out, "--out")
        session.check_claimable()
    scheme = job.quant.build_scheme()  # once, here: a scheme that refuses its options does so before any write
    job = replace(job, quant=job.quant.resolved(scheme))
    loaded = load_model(job.model, device)
    splits = load_data(job.data)
    check_fits(loaded.spec.name, loaded.num_classes, loaded.spec.classes, splits, job.data)
    if session is None:
        return _quantize(job, loaded, splits, device, bus, control, scheme)[0]
    with session.claim(job.to_dict()):
        session.start(model=job.model.name, device=str(device), scheme=job.quant.scheme, w_bit=job.quant.w_bit,
                      a_bit=job.quant.a_bit, calib=job.calib, data=job.data)
        result, qmodel = _quantize(job, loaded, splits, device, bus, control or RunControl(session.run_dir), scheme)
        path = session.run_dir.path
        spec = ModelSpec.from_dict({**loaded.spec.to_dict(), "quantization": job.quant.to_dict()})
        save_model(path, LoadedModel(qmodel, spec, loaded.normalizer), {"quantized_top1": result["top1"], "calib": result["calib"]})
        result.update(run_dir=str(path), saved=str(path))
        return session.end(result)


def _quantize(job: QuantizeJob, loaded: LoadedModel, splits, device: torch.device, bus: EventBus,
              control: RunControl | None, scheme: QuantScheme) -> tuple[dict[str, Any], torch.nn.Module]:
    """Calibrate, then evaluate the float and the quantised model: the result and the model."""
    bits = f"W{job.quant.w_bit}A{job.quant.a_bit}"
    started = time.perf_counter()
    qmodel, calibration = calibrate(loaded, job, device, bus, control, scheme)
    val = loader(splits.val, ModelInput.for_model(loaded.model, loaded.normalizer), job.batch_size)

    report = _reporter(bus, control)

    def progress(phase: str):
        return lambda done, total: report(phase, done, total)

    fp32 = evaluate(loaded.model, val, device, job.limit, progress("eval fp32"))
    quantized = evaluate(qmodel, val, device, job.limit, progress(f"eval {bits}"))
    result = {
        "top1": quantized["top1"], "top5": quantized["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "scheme": job.quant.scheme, "scheme_options": job.quant.scheme_options, "w_bit": job.quant.w_bit,
        "a_bit": job.quant.a_bit, "calibrator": job.quant.calibrator,
        "eval_images": quantized["images"], "model": job.model.name, "data": job.data, **calibration,
        "seconds": time.perf_counter() - started,
    }
    bus.emit("quantized", **result)
    return result, qmodel

"""The built-in downstream tasks, registered through ``register_tasks`` like any plugin's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from smi_engine.distill import DistillConfig, pool_batch_size, resolve_recipe, run_distillation
from smi_engine.hookspecs import hookimpl
from smi_engine.invert import InversionConfig
from smi_engine.quantization.job import QuantizeJob, run_quantization
from smi_engine.quantization.scheme import DEFAULT_SCHEME, QuantConfig
from smi_engine.tasks import TaskContext, model_from_options, require


class QuantizeTask:
    description = "post-training quantisation of a ViT, calibrated on synthetic images (or noise, or real ones)"

    def run(self, options: dict[str, Any], context: TaskContext) -> dict[str, Any]:
        require(options, "calib", "data")
        job = QuantizeJob(
            model=model_from_options(options, "teacher"), calib=str(options["calib"]), data=str(options["data"]),
            quant=QuantConfig(int(options.get("w_bit", 8)), int(options.get("a_bit", 8)),
                              options.get("calibrator") or None, float(options.get("percentile", 99.99)),
                              str(options.get("scheme", DEFAULT_SCHEME))),
            calib_size=int(options.get("calib_size", 32)), batch_size=int(options.get("batch_size", 64)),
            limit=int(options["limit"]) if options.get("limit") else None, seed=int(options.get("seed", 0)),
        )
        save = Path(options["save"]) if options.get("save") else None
        return run_quantization(job, context.device, context.bus(), save)


class KnowledgeTransferTask:
    description = "data-free knowledge transfer: train a student on the teacher's outputs for synthetic images"

    def run(self, options: dict[str, Any], context: TaskContext) -> dict[str, Any]:
        require(options, "data")
        options = resolve_recipe(str(options.get("recipe") or "default"), options)
        teacher = model_from_options(options, "teacher")
        synthesize = options.get("synthesize")
        if isinstance(synthesize, dict):
            synthesize = InversionConfig.from_dict({**synthesize, "model": teacher.to_dict()})
        elif synthesize:  # "true" from the generic runner: the inversion defaults
            synthesize = InversionConfig(model=teacher)
        if synthesize and options.get("synth_batch_size"):
            synthesize = replace(synthesize, batch_size=int(options["synth_batch_size"]))
        pools = options.get("pools") or []
        pools = [pools] if isinstance(pools, str) else list(pools)
        grow = options.get("grow")
        if grow == "batch":  # the recipe's "one inverted batch per round", for a fixed pool only
            grow = pool_batch_size(pools[0]) if pools and not synthesize else None
        config = DistillConfig(
            teacher=teacher, student=model_from_options(options, "student"), data=str(options["data"]),
            pools=pools, synthesize=synthesize or None,
            synth_batches=int(options.get("synth_batches", 1)), epochs=int(options.get("epochs", 10)),
            steps_per_round=_int_or_none(options.get("steps_per_round")), grow=_int_or_none(grow),
            batch_size=int(options.get("batch_size", 64)), optimizer=str(options.get("optimizer", "adamw")),
            lr=float(options.get("lr", 1e-3)), lr_schedule=str(options.get("lr_schedule", "cosine")),
            weight_decay=float(options.get("weight_decay", 1e-4)),
            temperature=float(options.get("temperature", 20.0)), linear_probe=_bool(options.get("linear_probe", False)),
            flip=_bool(options.get("flip", True)), val_every=int(options.get("val_every", 1)), seed=int(options.get("seed", 0)),
            limit=int(options["limit"]) if options.get("limit") else None,
        )
        if context.out is None:
            require(options, "out")
        out = context.out or Path(options["out"])
        return run_distillation(config, out, context.device, context.sinks or [], context.control, context.placement)


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", 0, "0") else int(value)


def _bool(value: Any) -> bool:
    return value.lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


@hookimpl
def register_tasks(register):
    register("quantize", QuantizeTask)
    register("kt", KnowledgeTransferTask)

"""The built-in downstream tasks, registered through ``register_tasks`` like any plugin's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from smi_engine import (
    DistillConfig, InversionConfig, QuantConfig, QuantizeJob,
    TaskContext, TaskOptions, hookimpl, run_distillation, run_quantization,
)
from smi_engine.downstream.distill import resolve_grow, resolve_recipe
from smi_engine.quantization.scheme import DEFAULT_SCHEME


class QuantizeTask:
    description = "post-training quantisation of a ViT, calibrated on synthetic images (or noise, or real ones)"

    def run(self, options: dict[str, Any], context: TaskContext) -> dict[str, Any]:
        o = TaskOptions("quantize", options)
        o.require("calib", "data")
        job = QuantizeJob(
            model=o.model("teacher"), calib=o.text("calib"), data=o.text("data"),
            quant=QuantConfig(o.integer("w_bit", 8), o.integer("a_bit", 8), o.text("calibrator"),
                              o.real("percentile", 99.99), o.text("scheme", DEFAULT_SCHEME)),
            calib_size=o.integer("calib_size", 32), batch_size=o.integer("batch_size", 64),
            limit=o.integer("limit") or None, seed=o.integer("seed", 0),
        )
        out = context.out or (Path(o.text("out")) if o.has("out") else None)
        o.check_unknown()
        return run_quantization(job, context.device, context.bus(), out)


class KnowledgeTransferTask:
    description = "data-free knowledge transfer: train a student on the teacher's outputs for synthetic images"

    def run(self, options: dict[str, Any], context: TaskContext) -> dict[str, Any]:
        o = TaskOptions("kt", resolve_recipe(str(options.get("recipe") or "default"), options))
        o.text("recipe")
        o.require("data")
        teacher = o.model("teacher")
        synthesize = o.raw("synthesize")
        if isinstance(synthesize, dict):
            synthesize = InversionConfig.from_dict({**synthesize, "model": teacher.to_dict()})
        elif o.flag("synthesize"):  # "true" from the generic runner: the inversion defaults
            synthesize = InversionConfig(model=teacher)
        else:
            synthesize = None
        synth_batch_size = o.integer("synth_batch_size")
        if synthesize is not None and synth_batch_size:
            synthesize = replace(synthesize, batch_size=synth_batch_size)
        pools = o.texts("pools")
        grow = resolve_grow("batch" if o.text("grow") == "batch" else o.integer("grow"), pools, synthesize)
        config = DistillConfig(
            teacher=teacher, student=o.model("student"), data=o.text("data"), pools=pools, synthesize=synthesize,
            synth_batches=o.integer("synth_batches", 1), epochs=o.integer("epochs", 10),
            steps_per_round=o.integer("steps_per_round"), grow=grow, batch_size=o.integer("batch_size", 64),
            optimizer=o.text("optimizer", "adamw"), lr=o.real("lr", 1e-3), lr_schedule=o.text("lr_schedule", "cosine"),
            weight_decay=o.real("weight_decay", 1e-4), temperature=o.real("temperature", 20.0),
            linear_probe=o.flag("linear_probe"), flip=o.flag("flip", True), val_every=o.integer("val_every", 1),
            seed=o.integer("seed", 0), limit=o.integer("limit") or None, sinks=o.texts("sinks"),
        )
        out = context.out or (Path(o.text("out")) if o.has("out") else None)
        o.check_unknown()
        if out is None:
            o.require("out")
        return run_distillation(config, out, context.device, context.sinks or [], context.control, context.placement)


@hookimpl
def register_tasks(register):
    register("quantize", QuantizeTask)
    register("kt", KnowledgeTransferTask)

"""``smi quantize``: post-training quantisation calibrated without real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import stderr
from smi_engine.device import resolve_device
from smi_engine.files import write_json
from smi_engine.plugins import get_registry
from smi_engine.quantization import CALIBRATORS, DEFAULT_SCHEME
from smi_engine.tasks import TaskContext


def quantize(
    calib: Annotated[str, typer.Option("--calib", help="Calibration images: a run directory of `smi invert` (sparse images are fed as sparse tokens), noise, or real:SPEC.")],
    data: Annotated[str, typer.Option("--data", help="Real validation data for the accuracies, e.g. fashion-mnist or imagefolder:DIR.")],
    teacher: o.Teacher = None, model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None,
    scheme: Annotated[str, typer.Option(help="Where and how to quantise: matmul (inputs of every matmul), seed (the seed's / PSAQ-ViT's positions), repq (RepQ-ViT), or a plugin's (see `smi plugins`).")] = DEFAULT_SCHEME,
    w_bit: Annotated[int, typer.Option("--w-bit", help="Weight bits (per output channel): 8, 6, 4, 3.")] = 8,
    a_bit: Annotated[int, typer.Option("--a-bit", help="Activation bits (per tensor): 8, 6, 4, 3.")] = 8,
    calibrator: Annotated[Optional[str], typer.Option(help=f"How activation ranges are set: {', '.join(CALIBRATORS)} (default: the scheme's; minmax for matmul and seed, search for repq).")] = None,
    percentile: Annotated[float, typer.Option(help="Percentile for --calibrator percentile.")] = 99.99,
    calib_size: Annotated[int, typer.Option("--calib-size", help="Calibration images.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    limit: Annotated[int, typer.Option(help="Evaluate on at most N validation images (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Which calibration images are drawn.")] = 0,
    save: Annotated[Optional[Path], typer.Option("--save", help="Keep the calibrated quantised model in this folder (loads with --teacher).")] = None,
    device: o.Device = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results (top1, top5, fp32_top1, ...) to this JSON file.")] = None,
) -> None:
    """Quantise a ViT to W/A bits, calibrated on synthetic data, and compare with full precision on real data."""
    spec = o.model_spec(model, model_args, pretrained, checkpoint, mean, std, teacher)
    options = {"teacher": spec.to_dict(), "calib": calib, "data": data, "scheme": scheme, "w_bit": w_bit, "a_bit": a_bit,
               "calibrator": calibrator, "percentile": percentile, "calib_size": calib_size, "batch_size": batch_size,
               "limit": limit or None, "seed": seed, "save": str(save) if save else None}
    task = get_registry().get("tasks", "quantize").factory()
    result = task.run(options, TaskContext(resolve_device(device)))
    if json_out is not None:
        write_json(json_out, result)
    typer.echo(
        f"{result['model']} W{w_bit}A{a_bit} ({result['scheme']} scheme, {result['calibrator']}, calibrated on {result['calib']}, {result['calib_images']} images): "
        f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%  |  fp32 top-1 {result['fp32_top1']:.2f}% "
        f"top-5 {result['fp32_top5']:.2f}%  ({result['eval_images']} images of {data})"
    )
    if save is not None:
        stderr.print(f"saved the quantised model to {save}")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)

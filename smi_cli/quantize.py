"""``smi quantize``: post-training quantisation calibrated without real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.config_file import model_options, named_option_texts
from smi_cli.console import markup_safe, print_json, stderr, stopped
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, PhaseProgress, open_display
from smi_engine.quantization.names import (
    CALIBRATORS, DEFAULT_SCHEME, DEFAULT_SPARSE_CALIB, RECONSTRUCT_MODES, SPARSE_CALIBRATIONS, ReconstructConfig,
)


def options_from_run(config: dict) -> dict:
    """A quantisation's config.json as ``smi quantize`` options."""
    quant, recon = dict(config.get("quant", {})), config.get("reconstruct", {})
    scheme_option = named_option_texts([{"name": quant.get("scheme"), "options": quant.pop("scheme_options", None)}])
    renamed = {"iterations": "recon_iters", "rounding_lr": "recon_lr", "step_lr": "recon_step_lr", "drop": "recon_drop",
               "p": "recon_p", "mode": "reconstruct"}
    return {**model_options(config["model"]), **{k: v for k, v in quant.items() if v is not None},
            **({"scheme_option": scheme_option} if scheme_option else {}),
            **{renamed[k]: v for k, v in recon.items()}, "limit": config.get("limit") or 0,
            **{k: config[k] for k in ("calib", "data", "calib_size", "batch_size", "seed", "sparse_calib") if k in config}}


ConfigFile = o.config_option("quantize", options_from_run)


def quantize(
    calib: Annotated[str, typer.Option("--calib", help="Calibration images: a run directory of `smi invert` (sparse images are fed as sparse tokens), noise, or real:SPEC.")],
    data: Annotated[str, typer.Option("--data", help="Real validation data for the accuracies, e.g. fashion-mnist or imagefolder:DIR.")],
    config_file: ConfigFile = None,
    teacher: o.Teacher = None, model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None,
    scheme: Annotated[str, typer.Option(autocompletion=o.installed("schemes"), help="Where and how to quantise: matmul (inputs of every matmul), seed (the seed's / PSAQ-ViT's positions), repq (RepQ-ViT), or a plugin's (see `smi plugins`).")] = DEFAULT_SCHEME,
    scheme_option: Annotated[Optional[list[str]], typer.Option("--scheme-option", help="NAME.KEY=VALUE for the scheme's factory, repeatable, e.g. repq.reparameterize=false (see `smi plugins`).")] = None,
    w_bit: Annotated[int, typer.Option("--w-bit", help="Weight bits (per output channel), 2 to 16: e.g. 8, 4, 3.")] = 8,
    a_bit: Annotated[int, typer.Option("--a-bit", help="Activation bits (per tensor), 2 to 16: e.g. 8, 4, 3.")] = 8,
    calibrator: Annotated[Optional[str], typer.Option(help=f"How activation ranges are set: {', '.join(CALIBRATORS)} (default: the scheme's; minmax for matmul and seed, search for repq).", show_default=False)] = None,
    percentile: Annotated[float, typer.Option(help="Percentile for --calibrator percentile.")] = 99.99,
    calib_size: Annotated[int, typer.Option("--calib-size", help="Calibration images.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    limit: Annotated[int, typer.Option(help="Evaluate on at most N validation images (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Which calibration images are drawn (and reconstruction's randomness).")] = 0,
    sparse_calib: Annotated[str, typer.Option("--sparse-calib", help="How sparse pool images calibrate: hybrid (the kept patches as tokens, the softmax ranges from whole images: an attention map's scale depends on its token count), tokens (the kept patches only) or blanked (whole images, stopped patches at the normaliser's zero, the seed's way).", autocompletion=lambda: list(SPARSE_CALIBRATIONS))] = DEFAULT_SPARSE_CALIB,
    reconstruct: Annotated[str, typer.Option(rich_help_panel="Reconstruction options", help="After range calibration: none, or block (learn each block's weight rounding and activation step sizes against the float block's output: BRECQ/QDrop).", autocompletion=lambda: list(RECONSTRUCT_MODES))] = "none",
    recon_iters: Annotated[int, typer.Option("--recon-iters", rich_help_panel="Reconstruction options", help="Reconstruction steps per unit (patch embedding, each block, head).")] = ReconstructConfig.iterations,
    recon_lr: Annotated[float, typer.Option("--recon-lr", rich_help_panel="Reconstruction options", help="Adam learning rate of the weight rounding (AdaRound).")] = ReconstructConfig.rounding_lr,
    recon_step_lr: Annotated[float, typer.Option("--recon-step-lr", rich_help_panel="Reconstruction options", help="Adam learning rate of the activation step sizes (LSQ) relative to each calibrated step, cosine to 0; 0 keeps the calibrated ranges.")] = ReconstructConfig.step_lr,
    recon_drop: Annotated[float, typer.Option("--recon-drop", rich_help_panel="Reconstruction options", help="QDrop: chance each activation stays float while reconstructing (0: BRECQ, always quantised).")] = ReconstructConfig.drop,
    recon_p: Annotated[float, typer.Option("--recon-p", rich_help_panel="Reconstruction options", help="The objective: |quantised - float block output|^p (2: squared error).")] = ReconstructConfig.p,
    out: Annotated[Optional[Path], typer.Option("--out", help="A run directory for the results (summary.json) and the quantised model (loads with --teacher DIR); smi runs lists it.", show_default=False)] = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Quantise a ViT, calibrated on synthetic images.

    Calibrates a W/A-bit copy on synthetic data (no real data), then compares it with full
    precision on real validation data.

    \b
    Examples:
      smi quantize --teacher runs/teacher --calib runs/sparse \\
        --data fashion-mnist --scheme repq --w-bit 4 --a-bit 4 --out runs/w4a4
      smi quantize --teacher runs/teacher --calib runs/sparse \\
        --data fashion-mnist --scheme repq --w-bit 3 --a-bit 3 \\
        --reconstruct block --out runs/w3a3
      smi quantize --teacher runs/teacher --calib noise --data digits --json
    """
    from smi_cli.signals import stop_on_signals
    from smi_engine.plugins import plugin_options
    from smi_engine.runs.control import RunControl, RunInterrupted
    from smi_engine.runtime.device import resolve_device
    from smi_engine.runs.events import EventBus
    from smi_engine.quantization import QuantConfig
    from smi_engine.downstream.quantize import QuantizeJob, run_quantization
    from smi_engine.runs.rundir import RunDir

    display = open_display(stderr, quiet, progress_every)
    scheme_options = plugin_options("schemes", scheme_option, [scheme])[scheme]
    job = QuantizeJob(model=o.model_spec(model, model_args, pretrained, checkpoint, mean, std, teacher), calib=calib,
                      data=data, quant=QuantConfig(w_bit, a_bit, calibrator, percentile, scheme, scheme_options),
                      calib_size=calib_size,
                      batch_size=batch_size, limit=limit or None, seed=seed, sparse_calib=sparse_calib,
                      reconstruct=ReconstructConfig(reconstruct, recon_iters, recon_lr, recon_step_lr, recon_drop, recon_p))
    control = RunControl(RunDir(out) if out is not None else None)
    try:
        with stop_on_signals(control, stderr, "stopping after this batch; nothing is saved"), display:
            result = run_quantization(job, resolve_device(device), EventBus([PhaseProgress(display)]), out, control)
    except RunInterrupted as exc:
        again = f"; delete {out} to run it again" if out is not None else ""
        stopped(f"{exc}; nothing saved{again}")
    if json_output:
        print_json(result)
    elif not quiet:
        recon = result.get("reconstruction")
        if recon is not None:
            stderr.print(f"reconstructed {len(recon['units'])} units in {recon['seconds']:.1f} s: output error "
                         f"{_total(recon, 'nearest_error'):.4g} rounded to nearest, {_total(recon, 'learned_error'):.4g} learned",
                         soft_wrap=True)
        kept = result.get("calib_kept_fraction", 1.0)
        sparse = f", {kept:.0%} of their patches kept, fed {result['sparse_calib']}" if kept < 1 else ""
        typer.echo(
            f"{result['model']} W{w_bit}A{a_bit} ({result['scheme']} scheme, {result['calibrator']}, calibrated on {result['calib']}, {result['calib_images']} images{sparse}): "
            f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%  |  fp32 top-1 {result['fp32_top1']:.2f}% "
            f"top-5 {result['fp32_top5']:.2f}%  ({result['eval_images']} images of {data})"
        )
        if out is not None:
            stderr.print(f"results and the quantised model in {markup_safe(out)} (load it with --teacher {markup_safe(out)})",
                         soft_wrap=True)


def _total(reconstruction: dict, key: str) -> float:
    return sum(unit[key] for unit in reconstruction["units"])


def register(app: typer.Typer) -> None:
    command(app, "quantize")(quantize)

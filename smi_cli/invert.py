"""``smi invert``: synthesise images from a frozen ViT, densely or with sparse stopping."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.config_file import inversion_options, model_options, sink_flags
from smi_cli.console import markup_safe, no_terminal_reason, plain, print_json, show, stderr, stdout, stopped, warn
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, InversionProgress, duration, open_display
from smi_engine.errors import SmiError
from smi_engine.inversion.schedule import SEED_SCHEDULE_TEXT

RUN = o.RUN

# Options that define the run; with --resume they come from config.json instead.
CONFIG_OPTIONS = (
    "model", "model_args", "pretrained", "checkpoint", "mean", "std", "teacher", "schedule", "iterations",
    "batch_size", "batches", "lr", "targets", "seed", "loss", "loss_option", "attention", "jitter", "flip",
    "jitter_at_stops", "final_mask", "selection", "selection_option", "precision", "compile", "checkpoint_every", "sink",
    "sink_option",
)


def options_from_run(config: dict) -> dict:
    """An inversion's config.json as ``smi invert`` options (``--config runs/x/config.json``)."""
    config = dict(config)
    if [float(b) for b in config.pop("betas", (0.5, 0.99))] != [0.5, 0.99]:
        raise SmiError("this run set Adam's betas, which smi invert has no option for: repeat it with smi.invert() in Python")
    config.pop("teacher_sha256", None)  # of the teacher as it is when the new run starts
    losses, selection = config.pop("losses", []), config.pop("selection", {"name": "smi"})
    model, sinks = config.pop("model"), sink_flags(config.pop("sinks", []), config.pop("sink_options", None))
    return {**model_options(model), **config, **sinks, **inversion_options(losses, selection)}


ConfigFile = o.config_option("invert", options_from_run)


def invert(
    ctx: typer.Context,
    config_file: ConfigFile = None,
    model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None, teacher: o.Teacher = None,
    schedule: Annotated[str, typer.Option(help=f"'dense'; stops ITERATION:RATIO,... (ratio of the remaining patches), e.g. {SEED_SCHEDULE_TEXT}; or every:V (V equal shares at k*T/V: Patch Rebirth).", rich_help_panel=RUN)] = "dense",
    iterations: Annotated[int, typer.Option(help="Optimisation steps per batch.", rich_help_panel=RUN)] = 4000,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=RUN)] = 32,
    batches: Annotated[int, typer.Option(help="How many batches to synthesise.", rich_help_panel=RUN)] = 1,
    lr: Annotated[float, typer.Option(help="Adam learning rate on the pixels.", rich_help_panel=RUN)] = 0.25,
    targets: Annotated[str, typer.Option(help="balanced (cycle through classes), random, or class indices 3,5,7.", rich_help_panel=RUN)] = "balanced",
    seed: Annotated[int, typer.Option(help="Random seed (each batch derives its own stream).", rich_help_panel=RUN)] = 0,
    loss: Annotated[Optional[list[str]], typer.Option("--loss", autocompletion=o.installed("losses"), help="NAME[:WEIGHT], repeatable (see `smi plugins`). Default: deepinversion.", rich_help_panel=RUN)] = None,
    loss_option: Annotated[Optional[list[str]], typer.Option("--loss-option", help="NAME.KEY=VALUE for a loss's factory, repeatable.", rich_help_panel=RUN)] = None,
    attention: Annotated[str, typer.Option(help="Attention kernel: fused (scaled_dot_product_attention) or explicit.", rich_help_panel=RUN)] = "fused",
    jitter: Annotated[float, typer.Option(help="Random roll, as a fraction of the image size.", rich_help_panel=RUN)] = 0.125,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.", rich_help_panel=RUN)] = True,
    jitter_at_stops: Annotated[bool, typer.Option("--jitter-at-stops/--no-jitter-at-stops", help="Jitter and flip on every step, or (the seed's) step on the plain image just before and at each stop.", rich_help_panel=RUN)] = True,
    final_mask: Annotated[str, typer.Option(help="The pool's keep mask: inverted (the patches inverted to the end) or rescored (the seed's: top patches of the final image by CLS attention, int((N+1)*prod(1-r)) of them).", rich_help_panel=RUN)] = "inverted",
    selection: o.Selection = "smi",
    selection_option: o.SelectionOption = None,
    precision: o.Precision = "fp32",
    compile: o.Compile = False,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between resume checkpoints (0: only when stopped).", rich_help_panel=RUN)] = 60.0,
    sink: o.Sink = None,
    sink_option: o.SinkOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/TIME-MODEL-dense or -sparse).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --out.")] = False,
    device: o.Device = "auto",
    tui: Annotated[bool, typer.Option("--tui", help="Run with the live dashboard in this terminal.")] = False,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Synthesise images from a frozen ViT, dense or sparse.

    Optimises images towards target classes; with --schedule, stops inverting the least
    informative patches as it goes, so later iterations are cheaper.

    \b
    Examples:
      smi invert --teacher runs/teacher --schedule 20:0.3,40:0.3,80:0.3 \\
        --iterations 400 --batch-size 64 --out runs/sparse
      smi invert --resume --out runs/sparse
    """
    from smi_cli.signals import stop_on_signals
    from smi_engine.runtime import distributed
    from smi_engine.runs.control import RunControl, RunInterrupted
    from smi_engine.inversion.config import InversionConfig
    from smi_engine.inversion.run import InversionRun, default_out_dir
    from smi_engine.inversion.losses import LossSpec, attach_options
    from smi_engine.runs.rundir import RunDir
    from smi_engine.inversion.schedule import Schedule
    from smi_engine.inversion.selection import SelectionSpec

    if tui and (why := no_terminal_reason()):  # nohup, a redirect: a dashboard would write escapes to a log
        warn(f"--tui needs a terminal ({why}): showing plain progress lines instead")
        tui = False
    display = open_display(stderr, quiet or tui, progress_every)
    if resume:
        if out is None:
            raise SmiError("--resume needs --out RUN_DIR: the run to continue")
        given = [n for n in CONFIG_OPTIONS if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
        if given or config_file is not None:
            flag = given[0].replace('_', '-') if given else "config"
            raise SmiError(f"--resume continues {out} exactly as configured in its config.json: drop --{flag}")
        config = None
    else:
        specs = attach_options([LossSpec.parse(t) for t in (loss or ["deepinversion"])], loss_option or [])
        config = InversionConfig(
            model=o.model_spec(model, model_args, pretrained, checkpoint, mean, std, teacher),
            schedule=Schedule.parse(schedule), iterations=iterations, batch_size=batch_size, batches=batches, lr=lr,
            losses=specs, targets=targets, seed=seed, jitter=jitter, flip=flip, attention=attention,
            jitter_at_stops=jitter_at_stops, final_mask=final_mask,
            selection=SelectionSpec.parse(selection, selection_option), precision=precision, compile=compile,
            checkpoint_every=checkpoint_every, sinks=list(sink or []), sink_options=o.sink_options(sink, sink_option),
        )
        config.validate()
    placement, torch_device = distributed.start(device)
    if tui and placement.distributed:
        raise SmiError("--tui runs in one process: under torchrun, open `smi watch RUN_DIR` in another terminal")
    try:
        out = out or placement.agree(default_out_dir(config))
        control = RunControl(RunDir(out))
        quiet = quiet or not placement.is_main  # one progress display and one summary per job
        if tui:
            summary = _run_with_dashboard(config, out, resume, torch_device, control)
        else:
            with stop_on_signals(control, stderr):
                sinks = [] if quiet else [warn_random_weights, InversionProgress(display)]
                run = InversionRun.prepare(config, out, resume=resume, device=torch_device, sinks=sinks,
                                           control=control, placement=placement)
                with display:
                    summary = run.run()
    except RunInterrupted as exc:
        stopped(f"{exc}; continue with: smi invert --resume --out {out}")
    finally:
        distributed.finish()
    if json_output and placement.is_main:
        print_json(summary)
    elif not quiet:
        print_summary(summary)


def _run_with_dashboard(config, out: Path, resume: bool, device, control) -> dict:
    """The job in a worker thread, the dashboard in front; bad requests fail before it opens."""
    from smi_cli.dashboard.app import Dashboard
    from smi_engine.runs.control import RunInterrupted
    from smi_engine.inversion.run import InversionRun

    run = InversionRun.prepare(config, out, resume=resume, device=device, control=control)
    result: dict = {}
    dashboard = Dashboard([Path(out)], ["invert"], control=control, job=lambda: result.update(run.run()))
    dashboard.run()
    if dashboard.job_thread is not None and dashboard.job_thread.is_alive():  # closed while running
        control.request_stop()
        dashboard.job_thread.join()  # the job saves its checkpoint at the next iteration
    if dashboard.job_interrupted or (control.stop_requested and not result):
        raise RunInterrupted("stopped from the dashboard", -1, -1)
    if dashboard.job_error:
        raise SmiError(dashboard.job_error)
    return result


def warn_random_weights(event: dict) -> None:
    if event["event"] == "run_start" and not event["model_has_weights"]:
        warn(f"{event['model']} has random weights (no --pretrained, --checkpoint or --teacher): fine for timing, "
             "but the images will not look like data")


def print_summary(summary: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    per_image, images, trajectories = summary["patches_per_image"], summary["images"], summary["trajectories"]
    counts = "/".join(str(n) for n in dict.fromkeys(per_image))  # each distinct count once
    kept = f"{counts}/{summary['num_patches']} per image ({100 * summary['kept_fraction']:.0f}%)"
    made = f"{images} images" if images == trajectories else f"{images} images from {trajectories} trajectories"
    bound = f"{summary['speedup_bound']:.2f}x (token FLOPs of the schedule)"
    if images != trajectories:
        bound = f"{summary['speedup_bound_per_image']:.2f}x per image (token FLOPs of the schedule; per trajectory {summary['speedup_bound']:.2f}x)"
    losses = " · ".join(f"{k} {v:.4g}" for k, v in summary["final_losses"].items())
    for key, value in (
        ("schedule", summary["schedule"] + ("" if summary["schedule"] == "dense" else f" · selection {summary['selection']}")),
        ("images", f"{made} in {summary['seconds']:.1f} s of inversion ({summary['images_per_second']:.1f} images/s, "
                   f"{summary['iterations_per_second']:.1f} it/s)"),
        ("time", f"active {duration(summary['active_seconds'])} · since start {duration(summary['since_start_seconds'])}"),
        ("kept patches", kept),
        ("speedup bound", bound),
        ("teacher accuracy", f"{100 * summary['teacher_accuracy']:.1f}% on the synthetic images"),
        ("final losses", losses),
        ("pool", summary["pool"]),
        ("preview", summary["preview"]),
    ):
        table.add_row(key, Text(plain(value)))  # paths and plugin names are text, never markup
    stdout.print(f"[bold green]done[/] {markup_safe(summary['run_dir'])}")
    show(table)


def register(app: typer.Typer) -> None:
    command(app, "invert")(invert)

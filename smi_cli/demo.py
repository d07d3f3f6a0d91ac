"""``smi demo``: the built-in default, end to end, with nothing but this package installed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import markup_safe, plain, print_json, show, stderr, stdout
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, InversionProgress, TrainingProgress, open_display


def demo(
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the two run directories (default runs/<time>-demo).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Where the demo teacher is kept (default: the user cache dir).")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the demo teacher again even if cached.")] = False,
    selection: Annotated[Optional[list[str]], typer.Option("--selection", help="Sparse runs to compare with dense, one per selection policy, repeatable (default: smi), e.g. --selection smi --selection pri.")] = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Dense vs sparse inversion of a small ViT, end to end.

    Trains (once, cached) a small ViT on scikit-learn's digits, inverts it dense and sparse
    and compares them.

    \b
    Examples:
      smi demo
      smi demo --selection smi --selection pri    # dense, SMI and Patch Rebirth
    """
    from smi_engine.downstream import demo as recipe
    from smi_engine.runtime.device import resolve_device
    from smi_engine.runs.events import EventBus
    from smi_engine.files import check_writable
    from smi_engine.inversion.run import run_inversion
    from smi_engine.models import read_card
    from smi_engine.inversion.selection import SelectionSpec, build_selection

    selections = [SelectionSpec.parse(name) for name in dict.fromkeys(selection or ["smi"])]
    out = out or Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-demo"
    check_writable(out, "--out")
    folder = recipe.teacher_dir(cache)
    check_writable(folder, "--cache")
    torch_device = resolve_device(device)
    display = open_display(stderr, quiet, progress_every)
    if not quiet:
        stderr.print(f"teacher: {markup_safe(folder)}", soft_wrap=True)
    summaries = {}
    with display:
        folder, trained = recipe.ensure_teacher(folder, torch_device, retrain, EventBus([TrainingProgress(display, "teacher")]))
        configs = recipe.inversion_configs(folder, selections=selections)
        for config in configs.values():
            build_selection(config.selection)  # an unknown name fails before any run starts
        for mode, config in configs.items():
            summaries[mode] = run_inversion(config, out / mode, device=device, sinks=[InversionProgress(display, mode)])
    accuracy = read_card(folder).get("accuracy", {}).get("top1")
    result = {
        "teacher": str(folder), "teacher_trained_now": trained, "teacher_top1": accuracy,
        "speedups": {mode: summaries["dense"]["seconds"] / s["seconds"] for mode, s in summaries.items()},
        "runs": summaries,
    }
    if json_output:
        print_json(result)
    elif not quiet:
        print_comparison(result)


# Short headers: three runs side by side still fit 80 columns (the title names the methods).
TITLES = {"dense": "dense", "smi": "SMI", "pri": "PRI", "random": "random"}


def print_comparison(result: dict) -> None:
    from rich.table import Table

    runs = result["runs"]
    table = Table(title="smi demo: dense inversion (DeepInversion) vs sparse (SMI; PRI: Patch Rebirth) of a digits ViT")
    table.add_column("", no_wrap=True)
    for mode in runs:
        table.add_column(TITLES.get(mode, mode), justify="right")

    def bound(mode: str, s: dict) -> str:
        return "" if mode == "dense" else f" (bound {s['speedup_bound']:.2f}x)"

    rows = [
        ("schedule", lambda m, s: s["schedule"].replace(",", ", ")),
        ("inversion time", lambda m, s: f"{s['seconds']:.1f} s"),
        ("speedup", lambda m, s: f"{result['speedups'][m]:.2f}x{bound(m, s)}"),
        ("patches in the image", lambda m, s: f"{s['kept_patches']}/{s['num_patches']}"),
        ("teacher accuracy on synthetic", lambda m, s: f"{100 * s['teacher_accuracy']:.1f}%"),
        ("final CE loss", lambda m, s: f"{s['final_losses'].get('deepinversion.ce', float('nan')):.4f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(mode, summary) for mode, summary in runs.items()))
    console = stdout
    teacher = f"{result['teacher_top1']:.1f}% val top-1" if result["teacher_top1"] is not None else "cached"
    console.print(f"teacher: {markup_safe(result['teacher'])} ({markup_safe(teacher)}"
                  f"{', trained now' if result['teacher_trained_now'] else ''})")
    show(table)
    for mode, summary in runs.items():  # above its bound, a speedup is not one: say why on the spot
        if mode != "dense" and result["speedups"][mode] > summary["speedup_bound"] * 1.02:
            console.print(plain(f"note: {mode} measured {result['speedups'][mode]:.2f}x, above the {summary['speedup_bound']:.2f}x "
                                "its token FLOPs allow: the machine's speed changed between the runs (other work on it). "
                                "Measure alone, or with `smi bench`, which interleaves the modes."), soft_wrap=True,
                          markup=False, style="yellow")
    for mode, summary in runs.items():
        console.print(f"{mode:6s} run {markup_safe(summary['run_dir'])}  preview {markup_safe(summary['preview'])}", soft_wrap=True)
    console.print("open the dashboard: [bold]smi watch " + markup_safe(" ".join(s["run_dir"] for s in list(runs.values())[:2]))
                  + "[/]", soft_wrap=True)


def register(app: typer.Typer) -> None:
    command(app, "demo")(demo)

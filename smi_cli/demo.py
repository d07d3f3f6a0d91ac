"""``smi demo``: the built-in default, end to end, with nothing but this package installed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from smi_cli import options as o
from smi_cli.console import print_json, stderr
from smi_cli.progress import InversionProgress
from smi_engine import demo as recipe
from smi_engine.device import resolve_device
from smi_engine.events import EventBus
from smi_engine.inversion_run import run_inversion
from smi_engine.files import check_writable
from smi_engine.models import read_card
from smi_engine.selection import SelectionSpec, build_selection


def demo(
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the two run directories (default runs/<time>-demo).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Where the demo teacher is kept (default: the user cache dir).")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the demo teacher again even if cached.")] = False,
    selection: Annotated[Optional[list[str]], typer.Option("--selection", help="Sparse runs to compare with dense, one per selection policy, repeatable (default: smi), e.g. --selection smi --selection pri.")] = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Train (once) a small ViT on scikit-learn's digits, invert it dense and sparse, compare.

    Dense against SMI and Patch Rebirth: smi demo --selection smi --selection pri
    """
    selections = [SelectionSpec.parse(name) for name in dict.fromkeys(selection or ["smi"])]
    out = out or Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-demo"
    check_writable(out, "--out")
    folder = recipe.teacher_dir(cache)
    check_writable(folder, "--cache")
    torch_device = resolve_device(device)
    if not quiet:
        stderr.print(f"teacher: {folder}")
    bus = EventBus([] if quiet else [_TrainingLog()])
    folder, trained = recipe.ensure_teacher(folder, torch_device, retrain, bus)
    accuracy = read_card(folder).get("accuracy", {}).get("top1")
    summaries = {}
    configs = recipe.inversion_configs(folder, selections=selections)
    for config in configs.values():
        build_selection(config.selection)  # an unknown name fails before any run starts
    for mode, config in configs.items():
        sinks = [] if quiet else [InversionProgress(stderr, label=f"{mode:6s}")]
        if sinks:
            with sinks[0]:
                summaries[mode] = run_inversion(config, out / mode, device=device, sinks=sinks)
        else:
            summaries[mode] = run_inversion(config, out / mode, device=device)
    result = {
        "teacher": str(folder), "teacher_trained_now": trained, "teacher_top1": accuracy,
        "speedups": {mode: summaries["dense"]["seconds"] / s["seconds"] for mode, s in summaries.items()},
        "runs": summaries,
    }
    if json_output:
        print_json(result)
    else:
        _print_comparison(result)


class _TrainingLog:
    def __call__(self, event: dict) -> None:
        if event["event"] == "epoch_end":
            stderr.print(f"training the demo teacher: epoch {event['epoch'] + 1}/{event['epochs']}  "
                         f"val top-1 {event['val_top1']:.1f}%  ({event['seconds']:.1f} s)")


# Short headers: three runs side by side still fit 80 columns (the title names the methods).
TITLES = {"dense": "dense", "smi": "SMI", "pri": "PRI", "random": "random"}


def _print_comparison(result: dict) -> None:
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
    console = Console()
    teacher = f"{result['teacher_top1']:.1f}% val top-1" if result["teacher_top1"] is not None else "cached"
    console.print(f"teacher: {result['teacher']} ({teacher}{', trained now' if result['teacher_trained_now'] else ''})")
    console.print(table)
    for mode, summary in runs.items():
        console.print(f"{mode:6s} run {summary['run_dir']}  preview {summary['preview']}", soft_wrap=True)
    console.print("open the dashboard: [bold]smi watch " + " ".join(s["run_dir"] for s in list(runs.values())[:2]) + "[/]", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)

"""``smi export``: a run's synthetic images as PNG files (ImageFolder layout) or one .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smi_cli import options as o
from smi_cli.console import markup_safe, print_json, stderr
from smi_cli.help import command


def export(
    run: Annotated[Path, typer.Argument(help="A run directory with a pool (smi invert, or smi distill --synthesize).", show_default=False)],
    to: Annotated[Path, typer.Option("--to", help="A new folder for the images (never overwritten).", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="png: one file per image, a folder per class; npz: one archive of arrays.")] = "png",
    stopped: Annotated[str, typer.Option("--stopped", help="Patches outside an image's keep mask: black, or transparent (an alpha channel).")] = "black",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
) -> None:
    """Write a run's synthetic images out, as pixels.

    Denormalised with the teacher's mean and std; patches that are not in an image black (or
    transparent). PNGs go in one folder per class, which torchvision's ImageFolder reads.

    \b
    Examples:
      smi export runs/sparse --to exported/sparse
      smi export runs/pri --to exported/pri-arrays --format npz --json
    """
    from smi_engine.downstream.export import export_pool

    result = export_pool(run, to, format, stopped)
    if json_output:
        print_json(result)
    elif not quiet:
        stderr.print(f"[bold green]exported[/] {result['images']} images of {markup_safe(run)} to {markup_safe(to)} "
                     f"({format}, stopped patches {stopped})", soft_wrap=True)


def register(app: typer.Typer) -> None:
    command(app, "export")(export)

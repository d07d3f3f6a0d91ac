"""``smi watch RUN [RUN]``: the dashboard on run directories, live or finished (works over SSH)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smi_engine.errors import SmiError
from smi_engine.rundir import RunDir


def watch(
    runs: Annotated[list[Path], typer.Argument(help="One run directory, or two to compare side by side.")],
    stop: Annotated[bool, typer.Option("--stop", help="Ask the run(s) to stop cleanly (they save a checkpoint), then exit.")] = False,
) -> None:
    """Open the dashboard on run directories: patch retention, losses, throughput, previews."""
    if len(runs) > 2:
        raise SmiError(f"smi watch shows one or two runs, got {len(runs)}: pick two to compare")
    kinds = [run_kind(path) for path in runs]
    if stop:
        for path in runs:
            RunDir(path).request("stop")
            typer.echo(f"asked {path} to stop; it saves a checkpoint first (smi invert --resume --out {path})")
        return
    from smi_cli.dashboard.app import Dashboard

    app = Dashboard(list(runs), kinds)
    app.run()
    if app.return_code:  # the app crashed (Textual printed why): say so in the exit status too
        raise typer.Exit(app.return_code)


def run_kind(path: Path) -> str:
    """The kind of a run directory (invert, distill, teacher), or a one-line error."""
    if not path.exists():
        raise SmiError(f"{path} does not exist: pass a run directory (smi invert --out DIR makes one)")
    run_dir = RunDir(path)
    if not run_dir.is_run:
        raise SmiError(f"{path} is not a run directory (no config.json and events.jsonl): pass the --out of a smi run")
    return run_dir.read_config().get("kind", "invert")


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)

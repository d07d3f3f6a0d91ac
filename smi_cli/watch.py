"""``smi watch RUN [RUN]``: the dashboard on run directories, live or finished (works over SSH)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from smi_cli.console import no_terminal_reason, plain
from smi_cli.help import command
from smi_engine.errors import SmiError
from smi_engine.runs.rundir import RunDir


def watch(
    runs: Annotated[list[Path], typer.Argument(help="One run directory, or two to compare side by side.", metavar="RUNS...", show_default=False)],
    stop: Annotated[bool, typer.Option("--stop", help="Ask the run(s) to stop cleanly (they save a checkpoint), then exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="With --stop: print nothing.")] = False,
) -> None:
    """Open the live dashboard on one or two runs.

    Patch retention, losses, throughput and previews, live or finished (works over SSH).

    \b
    Examples:
      smi watch runs/sparse
      smi watch runs/dense runs/sparse
      smi watch runs/sparse --stop
    """
    if len(runs) > 2:
        raise SmiError(f"smi watch shows one or two runs, got {len(runs)}: pick two to compare (smi runs lists them all)")
    kinds = [run_kind(path) for path in runs]
    if stop:
        _stop(runs, kinds, quiet)
        return
    if "quantize" in kinds:
        raise SmiError("smi watch shows inversion and training runs; a quantize run's result: smi runs " + str(runs[kinds.index("quantize")]))
    if why := no_terminal_reason():
        raise SmiError(f"smi watch draws a dashboard and needs a terminal ({why}): run it in one, or list runs with "
                       "smi runs (--json)")
    from smi_cli.dashboard.app import Dashboard

    app = Dashboard(list(runs), kinds)
    app.run()
    if app.return_code:  # the app crashed (Textual printed why): say so in the exit status too
        raise typer.Exit(app.return_code)


def _stop(runs: list[Path], kinds: list[str], quiet: bool) -> None:
    """Ask each live run to stop; if any is finished or dead, nothing is written at all."""
    from smi_engine.runs.state import read_run

    for path, kind in zip(runs, kinds):
        liveness = read_run(path).liveness(path, time.time())
        if liveness.ended:
            why = f" ({liveness.reason})" if liveness.reason else ""
            resumable = kind == "invert" and liveness.status in ("dead", "interrupted")
            raise SmiError(f"{path} is {liveness.status}{why}: there is nothing to stop"
                           + (f"; continue it with smi invert --resume --out {path}" if resumable else ""))
    for path, kind in zip(runs, kinds):
        RunDir(path).request("stop")
        if not quiet:
            typer.echo(plain(f"asked {path} to stop; it saves a checkpoint first (smi invert --resume --out {path})"
                             if kind == "invert" else f"asked {path} to stop"))


def run_kind(path: Path) -> str:
    """The kind of a run directory (invert, distill, teacher, quantize), or a one-line error."""
    if not path.exists():
        raise SmiError(f"{path} does not exist: pass a run directory (smi invert --out DIR makes one; smi runs lists them)")
    run_dir = RunDir(path)
    if not run_dir.is_run:
        raise SmiError(f"{path} is not a run directory (no config.json and events.jsonl): pass the --out of a smi run")
    return run_dir.read_config().get("kind", "invert")


def register(app: typer.Typer) -> None:
    command(app, "watch")(watch)

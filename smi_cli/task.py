"""``smi task NAME -o KEY=VALUE``: run any registered downstream task (plugins' too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import print_json, stderr
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, PhaseProgress, TrainingProgress, open_display
from smi_engine.errors import SmiError


def task(
    name: Annotated[str, typer.Argument(help="A task from `smi plugins`, e.g. quantize or kt.", metavar="NAME", show_default=False)],
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="KEY=VALUE for the task, repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory, for tasks that write one.", show_default=False)] = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Run a downstream task by name (plugins' too).

    Options are KEY=VALUE; the result is printed as JSON on stdout.

    \b
    Example:
      smi task quantize -o teacher_dir=runs/teacher -o calib=runs/sparse \\
        -o data=fashion-mnist -o w_bit=4
    """
    from smi_engine.runtime.device import resolve_device
    from smi_engine.checks import parse_pairs
    from smi_engine.plugins import call_factory, get_registry
    from smi_engine.downstream.tasks import TaskContext

    display = open_display(stderr, quiet, progress_every)
    registration = get_registry().get("tasks", name)
    options = {}
    for item in option or []:
        options.update(parse_pairs(item, "-o", "epochs=5"))
    sinks = [PhaseProgress(display), TrainingProgress(display, name)]
    try:
        # The one place where -o text becomes a task's typed options: refused here, before any work.
        job = call_factory(registration.factory, options, f"task {name!r}", "-o KEY=VALUE")
        with display:
            result = job.run(TaskContext(resolve_device(device), out, sinks))
    except SmiError:
        raise
    except Exception as exc:  # a plugin's bug: name the task and its plugin, in one line
        raise SmiError(f"task {name!r} (plugin {registration.plugin}) failed: {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}") from None
    print_json(result)


def register(app: typer.Typer) -> None:
    command(app, "task")(task)

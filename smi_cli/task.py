"""``smi task NAME -o KEY=VALUE``: run any registered downstream task (plugins' too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import print_json
from smi_engine.device import resolve_device
from smi_engine.errors import SmiError
from smi_engine.models import parse_model_args
from smi_engine.plugins import get_registry
from smi_engine.tasks import TaskContext


def task(
    name: Annotated[str, typer.Argument(help="A task from `smi plugins`, e.g. quantize or kt.")],
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="KEY=VALUE for the task, repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory, for tasks that write one.")] = None,
    device: o.Device = "auto",
) -> None:
    """Run a downstream task by name with KEY=VALUE options; prints its result as JSON.

    Example: smi task quantize -o teacher_dir=runs/teacher -o calib=runs/sparse -o data=fashion-mnist -o w_bit=4
    """
    registration = get_registry().get("tasks", name)
    options = {}
    for item in option or []:
        options.update(parse_model_args(item))
    try:
        result = registration.factory().run(options, TaskContext(resolve_device(device), out))
    except SmiError:
        raise
    except Exception as exc:  # a plugin's bug: name the task and its plugin, in one line
        raise SmiError(f"task {name!r} (plugin {registration.plugin}) failed: {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}") from None
    print_json(result)


def register(app: typer.Typer) -> None:
    app.command("task")(task)

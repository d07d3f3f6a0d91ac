"""``smi plugins``: what is installed and what each plugin registers."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from smi_cli.console import print_json
from smi_engine.plugins import KINDS, get_registry


def plugins(json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List installed plugins (built-ins included) and the losses, tasks, sinks and quantisation schemes they add."""
    infos = list(get_registry().plugins.values())
    if json_output:
        print_json([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
             **{kind: i.registers[kind] for kind in KINDS}, "error": i.error}
            for i in infos
        ])
        return
    table = Table(title="smi plugins")
    for column in ("plugin", "distribution", *KINDS, "status"):
        table.add_column(column, overflow="fold")  # wrap, never cut a name a user has to type
    for i in infos:
        status = f"[red]{i.error}[/]" if i.error else ("built-in" if i.builtin else "ok")
        table.add_row(i.name, f"{i.distribution or '?'} {i.version or ''}".strip(),
                      *(", ".join(i.registers[kind]) for kind in KINDS), status)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)

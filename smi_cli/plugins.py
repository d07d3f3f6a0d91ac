"""``smi plugins``: what is installed and what each plugin registers."""

from __future__ import annotations

from typing import Annotated

import typer

from smi_cli import options as o
from smi_cli.console import fits, plain, print_json, show, stdout
from smi_cli.help import command


def plugins(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the plugins that failed, one line each.")] = False,
    json_output: o.Json = False,
) -> None:
    """List plugins and what each one registers.

    Built-ins included: losses, selections, tasks, event sinks and quantisation schemes.

    \b
    Examples:
      smi plugins
      SMI_LOAD_PLUGINS= smi plugins --json    # the built-ins only
    """
    from rich.table import Table
    from rich.text import Text

    from smi_engine.plugins import KINDS, get_registry

    infos = list(get_registry().plugins.values())
    if json_output:
        print_json([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
             **{kind: i.registers[kind] for kind in KINDS}, "error": i.error}
            for i in infos
        ])
        return
    if quiet:
        for i in infos:
            if i.error:
                typer.echo(plain(f"{i.name}: {i.error}"))
        return
    table = Table(title="smi plugins")
    for column in ("plugin", "distribution", *KINDS, "status"):
        table.add_column(column, overflow="fold")  # wrap, never cut a name a user has to type
    for i in infos:
        status = Text(plain(i.error), style="red") if i.error else Text("built-in" if i.builtin else "ok")
        cells = [i.name, f"{i.distribution or '?'} {i.version or ''}".strip(), *(", ".join(i.registers[kind]) for kind in KINDS)]
        table.add_row(*(Text(plain(c)) for c in cells), status)  # a plugin's words are text, never markup
    if fits(table):
        show(table)
        return
    for i in infos:  # too narrow for the table: a line per plugin, wrapped between words, never inside a name
        registers = " · ".join(f"{kind} {', '.join(i.registers[kind])}" for kind in KINDS if i.registers[kind])
        status = f"failed: {i.error}" if i.error else ("built-in" if i.builtin else "ok")
        line = Text(plain(i.name), style="bold")
        line.append(plain(f"  {i.distribution or '?'} {i.version or ''} · {status}" + (f" · {registers}" if registers else "")),
                    style="red" if i.error else "")
        stdout.print(line)


def register(app: typer.Typer) -> None:
    command(app, "plugins")(plugins)

"""The ``smi`` Typer application: one module per command (group), plugins may add more.

Command modules import torch and timm inside their functions only, so ``smi --help``,
``smi --version`` and shell completion start in a fraction of a second.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

import typer

from smi_cli import bench, data, demo, distill, evaluate, export, invert, plugins, quantize, runs, task, teacher, watch
from smi_cli.console import describe_failure, fail, stopped
from smi_cli.help import new_app
from smi_engine.errors import SmiError

app = new_app(
    name="smi",
    help="Sparse Model Inversion of Vision Transformers: synthesise data from a trained ViT, fast, "
    "then quantize or distill it without real data.\n\n\b\nStart here:\n"
    "  smi demo            dense vs sparse inversion of a small ViT\n"
    "  smi invert --help   invert your own timm ViT\n"
    "  smi runs            every run under ./runs, with its status",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"smi {version('smi-toolkit')}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Sparse Model Inversion toolkit."""


for module in (invert, quantize, distill, evaluate, export, runs, watch, task, plugins, bench, demo):
    module.register(app)
app.add_typer(teacher.app, name="teacher")
app.add_typer(data.app, name="data")


def _register_plugin_commands() -> None:
    """Each plugin's commands, one plugin at a time: a broken one is skipped with a warning,
    like its other hooks, and never takes `smi` (or `smi --help`) down with it."""
    from smi_engine.plugins import command_hooks, plugin_code, warn

    for impl in command_hooks().get_hookimpls():
        taken = {_command_name(c) for c in app.registered_commands} | {g.name for g in app.registered_groups}
        known = len(app.registered_commands)
        try:
            with plugin_code():
                impl.function(cli=app)
        except Exception as exc:
            del app.registered_commands[known:]
            warn(f"plugin {impl.plugin_name!r} failed in register_commands: {type(exc).__name__}: {exc}; "
                 "continuing without its commands")
            continue
        for info in app.registered_commands[known:]:  # like every other kind: the first registration stays
            if _command_name(info) in taken:
                app.registered_commands.remove(info)
                warn(f"plugin {impl.plugin_name!r} registers command {_command_name(info)!r}, which smi already has; "
                     "keeping smi's")


def _command_name(info) -> str:
    """The name a Typer command is called by (its function's name, dashed, unless given)."""
    return info.name or info.callback.__name__.replace("_", "-")


try:  # current Typer vendors click; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_exceptions


def main() -> None:
    # Under torchrun every rank speaks: say which one.
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "?")
    rank = f"rank {rank}: " if world.strip().isdigit() and int(world) > 1 else ""  # a bad value is start()'s to refuse
    try:
        _register_plugin_commands()
        code = app(prog_name="smi", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # `smi` or a group alone: its help
        typer.echo(exc.ctx.get_help() if exc.ctx else "")
        raise SystemExit(2) from None
    except click_exceptions.ClickException as exc:  # a usage error (bad type, unknown option): one line too
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "smi"
        fail(rank + f"{exc.format_message()} (see `{command} --help`)", code=exc.exit_code)
    except SmiError as exc:
        fail(rank + str(exc))
    except KeyboardInterrupt:
        stopped(rank + "interrupted")
    except Exception as exc:  # no traceback reaches the user: one line, and the traceback on request
        if os.environ.get("SMI_DEBUG"):
            raise
        message, code = describe_failure(exc)
        fail(rank + message, code=code)
    if isinstance(code, int) and code:  # a command's typer.Exit(code)
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())

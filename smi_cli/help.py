"""How commands present themselves: plain help that wraps (never cuts) at any width, flags
without type placeholders, and usage lines that read ``smi watch [OPTIONS] RUNS...``."""

from __future__ import annotations

from typing import Any, Callable

import typer
from typer.core import TyperCommand


class SmiCommand(TyperCommand):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar or param.name.upper()
            if param.nargs != 1 and not name.endswith("..."):
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


    def format_options(self, ctx: Any, formatter: Any) -> None:
        """Arguments, then one section per help panel (Model options, Run options, ...) in the
        order they first appear, then the remaining options."""
        arguments, sections = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        general = sections.pop("Options", [])
        for name, records in [*sections.items(), ("Options", general)]:
            if records:
                with formatter.section(name):
                    formatter.write_dl(records)


def new_app(**options: Any) -> typer.Typer:
    """A Typer app (or group) with smi's help conventions."""
    return typer.Typer(rich_markup_mode=None, no_args_is_help=True, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, **options)


def command(app: typer.Typer, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command(name)`` with smi's usage line."""
    return app.command(name, cls=SmiCommand)

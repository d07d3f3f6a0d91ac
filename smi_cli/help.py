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


def new_app(**options: Any) -> typer.Typer:
    """A Typer app (or group) with smi's help conventions."""
    return typer.Typer(rich_markup_mode=None, no_args_is_help=True, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, **options)


def command(app: typer.Typer, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command(name)`` with smi's usage line."""
    return app.command(name, cls=SmiCommand)

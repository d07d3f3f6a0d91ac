"""Where output goes: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """The one exit for user errors: a single red line on stderr."""
    stderr.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    raise SystemExit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()

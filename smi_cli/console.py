"""Where output goes: results on stdout, progress and messages on stderr.

In a terminal, rich formats to its width. Into a file or a pipe (nohup, SLURM, CI logs) every
line is written whole: never wrapped or padded to 80 columns, no escape codes.
"""

from __future__ import annotations

import errno
import json
import sys
from typing import Any, NoReturn

from rich.console import Console, RenderableType

from smi_engine.errors import plain  # noqa: F401 (re-exported: the CLI imports it from here)


def _console(to_stderr: bool) -> Console:
    console = Console(stderr=to_stderr, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=to_stderr, highlight=False, soft_wrap=True, width=10_000)


stderr = _console(True)
stdout = _console(False)


def markup_safe(text: Any) -> str:
    """``plain`` text to interpolate into Rich markup: brackets are never read as tags."""
    from rich.markup import escape

    return escape(plain(text))


def show(renderable: RenderableType, console: Console = stdout) -> None:
    """Print a table or text; off a terminal without the padding rich adds to fill columns."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().strip("\n").splitlines()))
    console.file.flush()


def fits(renderable: RenderableType, console: Console = stdout) -> bool:
    """Whether a table shows whole at the console's width (else callers print it as lines)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(max_width=10_000), renderable).maximum <= console.width


def fail(message: str, code: int = 2) -> NoReturn:
    """The one exit for user errors: a single red line on stderr."""
    stderr.print(f"[bold red]error:[/] {markup_safe(message)}", soft_wrap=True, markup=True)
    raise SystemExit(code)


def stopped(message: str) -> NoReturn:
    """The exit for a stop the user asked for (Ctrl-C, SIGTERM, ``x``, ``smi watch --stop``):
    not an error, one line saying where the work stands and how to go on, exit 130."""
    stderr.print(f"[bold yellow]stopped:[/] {markup_safe(message)}", soft_wrap=True, markup=True)
    raise SystemExit(130)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {markup_safe(message)}", soft_wrap=True, markup=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line (and an exit code) for an exception that is not an ``SmiError``: the file system's
    refusals are the user's to fix (exit 2); anything else is a bug to report (exit 1)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return ("the disk is full (No space left on device): free some space and run the command again; "
                "an inversion continues where it stopped with `smi invert --resume --out RUN_DIR`"), 2
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(
            sign in str(exc) for sign in ("out of memory", "can't allocate memory", "not enough memory")):
        return ("out of memory: lower --batch-size (or the model's image size); an inversion continues where it "
                "stopped with `smi invert --resume --out RUN_DIR`"), 2
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot use{where}: {exc.strerror or text}; check the path and its permissions", 2
    return f"unexpected {type(exc).__name__}: {text[:200]} (rerun with SMI_DEBUG=1 for the traceback, and please report it)", 1


def no_terminal_reason() -> str | None:
    """Why a full-screen app cannot run here (input or output is not a terminal: nohup, a
    redirect, a pipe, ``</dev/null``), or None where it can."""
    for name, stream in (("input", sys.stdin), ("output", sys.stdout)):
        if stream is None or not stream.isatty():
            return f"{name} is not a terminal"
    return None


#: How each status is coloured, in the dashboard header and in `smi runs`.
STATUS_STYLES = {"running": "green", "finished": "bold green", "failed": "bold red", "interrupted": "yellow",
                 "paused": "bold yellow", "stalled": "bold yellow", "dead": "bold red", "damaged": "bold red"}

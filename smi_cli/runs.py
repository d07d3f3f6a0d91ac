"""``smi runs [DIR...]``: one table of every run under some folders, newest first."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from smi_cli import options as o
from rich.text import Text

from smi_cli.console import STATUS_STYLES, fits, markup_safe, plain, print_json, show, stderr, stdout
from smi_engine.runs.state import RunState, finite_number, read_run
from smi_cli.help import command
from smi_cli.progress import duration
from smi_engine.errors import SmiError
from smi_engine.files import read_json
from smi_engine.runs.rundir import RunDir

SEARCH_DEPTH = 3  # folders below a given one searched for runs (a demo folder holds one run per mode)
COLUMNS = ("run", "kind", "status", "model", "schedule", "kept", "images", "active", "result")
SHORT_COLUMNS = ("kind", "kept", "images", "active")


def runs(
    folders: Annotated[Optional[list[Path]], typer.Argument(help="Run directories, or folders holding them (default: runs).", metavar="DIRS...", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the run directories, one per line.")] = False,
    json_output: o.Json = False,
) -> None:
    """List runs with their status and headline result.

    Invert, distill, teacher and quantize runs under the given folders, newest first.

    A run that is not finished shows as running, paused, stalled (no event for much longer than
    usual) or dead (its process is gone; known on the host that ran it).

    \b
    Examples:
      smi runs
      smi runs runs/kt-sweep --json
    """
    found = [row(path) for path in find_runs(folders or [Path("runs")])]
    found.sort(key=lambda r: r["started"] or 0.0, reverse=True)
    if json_output:
        print_json(found)
    elif quiet:
        typer.echo("\n".join(plain(r["run"]) for r in found) if found else "", nl=bool(found))
    elif not found:
        stderr.print(f"no runs under {markup_safe(', '.join(str(f) for f in folders or ['runs']))}", soft_wrap=True)
    else:
        show_runs(found)


def find_runs(folders: list[Path]) -> list[Path]:
    """Run directories among ``folders`` and below them (not inside a run)."""
    found: list[Path] = []
    for folder in folders:
        if not folder.exists():
            raise SmiError(f"{folder} does not exist: pass run directories or folders that hold them (default: runs)")
        if RunDir(folder).is_run:
            found.append(folder)
            continue
        base = len(folder.parts)
        for root, dirs, _ in os.walk(folder):
            here = Path(root)
            dirs.sort()
            if RunDir(here).is_run and here != folder:
                found.append(here)
                dirs.clear()
            elif len(here.parts) - base >= SEARCH_DEPTH:
                dirs.clear()
    return list(dict.fromkeys(found))


def row(path: Path) -> dict[str, Any]:
    """One run's line; a run whose files are damaged is listed as such, with the reason, and
    never hides the others."""
    try:
        return _row(path)
    except Exception as exc:  # whatever a damaged or foreign file makes the reading raise
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return dict.fromkeys(ROW_FIELDS) | {"run": str(path), "kind": "?", "status": "damaged", "reason": plain(reason)}


ROW_FIELDS = ("run", "kind", "status", "reason", "model", "schedule", "kept", "images", "active_seconds", "result",
              "started", "host", "pid", "summary")


def _row(path: Path) -> dict[str, Any]:
    state = read_run(path)
    liveness = state.liveness(path, time.time())
    summary = _summary(path) or state.summary
    # RunClock's active time; a run finished before summaries recorded it has its wall time.
    active = summary.get("active_seconds") or summary.get("wall_seconds") or summary.get("seconds") or state.clock.active
    images = _images(state, summary)
    if not finite_number(active) or not (images is None or finite_number(images)):
        raise ValueError(f"summary.json holds {active if not finite_number(active) else images!r} where a finite number belongs")
    return {
        "run": str(path), "kind": state.kind, "status": liveness.status, "reason": liveness.reason,
        "model": summary.get("model") or state.model, "schedule": _schedule(state, summary),
        "kept": _kept(state, summary), "images": images, "active_seconds": active,
        "result": _result(state.kind, summary), "started": state.started,
        "host": state.host, "pid": state.pid, "summary": summary or None,
    }


def _summary(path: Path) -> dict[str, Any]:
    try:
        summary = read_json(RunDir(path).summary) if RunDir(path).is_finished else {}
    except (OSError, ValueError, SmiError):
        return {}
    if not isinstance(summary, dict):
        raise ValueError("summary.json is not a JSON object")
    return summary


def _schedule(state: RunState, summary: dict) -> str | None:
    if state.kind == "invert":
        sparse = state.schedule not in ("", "dense")
        return f"{state.schedule} ({state.selection})" if sparse and state.selection else (state.schedule or None)
    if state.kind == "quantize" and summary:
        return _quantization(summary)
    return None


def _quantization(summary: dict) -> str:
    """e.g. ``repq(softmax=adaptive-log) W3A3 +block hybrid``: the scheme with the options it was
    given, the bits, whether blocks were reconstructed, and how a sparse pool was fed."""
    options = summary.get("scheme_options") or {}
    if not isinstance(options, dict):
        raise ValueError("summary.json's scheme_options is not a JSON object")
    given = ",".join(f"{key}={value}" for key, value in sorted(options.items()))
    parts = [f"{summary['scheme']}({given})" if given else str(summary["scheme"]), f"W{summary['w_bit']}A{summary['a_bit']}"]
    if summary.get("reconstruct") == "block":
        parts.append("+block")
    kept = summary.get("calib_kept_fraction", 1.0)
    if finite_number(kept) and kept < 1 and summary.get("sparse_calib"):
        parts.append(str(summary["sparse_calib"]))
    return " ".join(parts)


def _kept(state: RunState, summary: dict) -> str | None:
    if state.kind != "invert" or not state.num_patches:
        return None
    kept = summary.get("kept_patches", state.kept)
    return f"{kept}/{state.num_patches}"


def _images(state: RunState, summary: dict) -> int | None:
    if state.kind == "invert":
        return summary.get("images", state.images_made)
    return summary.get("synthetic_images") or summary.get("calib_images")


def _result(kind: str, summary: dict) -> dict[str, float] | None:
    """The headline number of a finished run, as {name: value in %}."""
    if not summary:
        return None
    if kind == "invert":
        return {"teacher_accuracy": 100 * _numbers({"a": summary["teacher_accuracy"]})["a"]}
    if kind == "distill":
        return _numbers({"top1": summary["best_top1"]})
    if kind == "teacher":
        return _numbers({"top1": summary["top1"]})
    if kind == "quantize":
        return _numbers({"top1": summary["top1"], "fp32_top1": summary["fp32_top1"]})
    return None


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    if not all(finite_number(v) for v in result.values()):
        raise ValueError("summary.json holds a result that is not a number")
    return result


RESULT_LABELS = {"teacher_accuracy": "teacher acc", "top1": "top-1", "fp32_top1": "fp32"}


def show_runs(rows: list[dict[str, Any]]) -> None:
    """The table, or where a terminal is too narrow for it, a block of three short lines per
    run: where and how it stands; what it made; what it ran (nothing cut, each line whole)."""
    grid = table(rows)
    if fits(grid):
        show(grid, stdout)
        return
    for r in rows:
        stdout.print(f"[bold]{markup_safe(r['run'])}[/]  [{STATUS_STYLES.get(r['status'], '')}]{markup_safe(_status(r))}[/]")
        made = [r["kind"], f"active {duration(r['active_seconds'])}", r["images"] is not None and f"{r['images']} images",
                _result_text(r) or "no result yet"]
        ran = [r["model"], r["schedule"], r["kept"] and f"kept {r['kept']}"]
        for parts, style in ((made, ""), (ran, "dim")):
            if any(parts):
                stdout.print(Text("    " + " · ".join(plain(d) for d in parts if d), style=style))


def _status(r: dict[str, Any]) -> str:
    return r["status"] + (f" ({r['reason']})" if r["reason"] else "")


def _result_text(r: dict[str, Any]) -> str:
    return " · ".join(f"{RESULT_LABELS[k]} {v:.1f}%" for k, v in (r["result"] or {}).items())


def table(rows: list[dict[str, Any]]):
    from rich import box
    from rich.table import Table

    grid = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for name in COLUMNS:  # short columns stay whole; in a narrow terminal the long ones wrap (never cut)
        grid.add_column(name, overflow="fold", no_wrap=name in SHORT_COLUMNS,
                        justify="right" if name in ("kept", "images", "active") else "left")
    for r in rows:  # cells are Text, never markup: names and messages come from the run's files
        cells = [r["run"], r["kind"], _status(r), r["model"] or "-", r["schedule"] or "-", r["kept"] or "-",
                 "-" if r["images"] is None else str(r["images"]), duration(r["active_seconds"]), _result_text(r) or "-"]
        grid.add_row(*(Text(plain(c), style=STATUS_STYLES.get(r["status"], "") if i == 2 else "")
                       for i, c in enumerate(cells)))
    return grid


def register(app: typer.Typer) -> None:
    command(app, "runs")(runs)

"""Crash-safe file writing: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces the target.

    Readers see the old file or the new one, never half of either; on error the old file stays.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; run directories are shared and copied
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, data: Any) -> None:
    write_bytes(target, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def check_writable(target: str | Path, flag: str, folder: bool = True) -> None:
    """Refuse, before any work, a ``target`` that could not be written: an existing file where a
    folder goes (or the reverse), or a nearest existing parent that is not a writable folder."""
    from smi_engine.errors import SmiError

    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise SmiError(f"{flag} {target} is {kind}: choose another path")
    parent = target if target.exists() else next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SmiError(f"{flag} {target} cannot be written ({parent} is not a writable folder): choose another path")


def unreadable_reason(exc: BaseException) -> str:
    """Why a checkpoint could not be read, in our words: torch's own message for a file with
    pickled objects suggests unsafe loading, which smi never does."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "pickle" in text.lower():
        return "it holds pickled Python objects, which smi never loads"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"damaged or not a checkpoint: {first[:120]}"

"""Files of a run: crash-safe writing (write beside the target, then rename over it), and
opening that never follows a symbolic link nor blocks on a special file.

Run folders are shared on multi-user machines, so whatever sits in one is untrusted: a
``.lock`` or ``events.jsonl`` that is a link to someone's file must not be written through, a
FIFO must not hang the reader, and what is read is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

#: Most bytes read from a small run file (config, summary, control request, lock, model card).
SMALL_FILE_LIMIT = 16 * 2**20


def _refuse(path: Path, what: str):
    from smi_engine.errors import SmiError

    return SmiError(f"{path} is {what}: smi only reads and writes regular files in a run folder; remove it")


def open_regular(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` for a run's own file: a symbolic link is never followed, and anything but a
    regular file (a FIFO, a device, a folder) is refused at once instead of blocking."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO with no reader; a folder
            raise _refuse(path, "not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, "not a regular file")
    return fd


def read_regular(path: str | Path, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a run's own file, refused past ``limit`` (never a link or a special file)."""
    fd = open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise _refuse(Path(path), f"larger than {limit // 2**20} MB")
    return data


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks (never through a link)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_folder(path: str | Path) -> Path:
    """A run's own sub-folder (``pool/``, ``previews/``), created if missing, never a link."""
    path = Path(path)
    if path.is_symlink():
        raise _refuse(path, "a symbolic link")
    path.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise _refuse(path, "not a folder")
    return path


def own_folder(path: str | Path) -> bool:
    """Whether a run's own sub-folder (``pool/``, ``previews/``) is there: False when nothing
    is, True for a real folder; a link (even to a folder) or another kind of file is refused."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise _refuse(path, "a symbolic link")
    if not stat.S_ISDIR(mode):
        raise _refuse(path, "not a folder")
    return True


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
    """A run's JSON file, read as ``read_regular`` does (bounded, no links, no special files)."""
    return json.loads(read_regular(path))


def check_writable(target: str | Path, flag: str, folder: bool = True) -> None:
    """Refuse, before any work, a ``target`` that could not be written: an existing file where a
    folder goes (or the reverse), or a nearest existing parent that is not a writable folder."""
    from smi_engine.errors import SmiError

    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise SmiError(f"{flag} {target} is {kind}: choose another path")
    # An existing file is replaced through its folder (temp file, then rename): that folder is what must be writable.
    parent = target if target.is_dir() else next((p for p in target.parents if p.exists()), Path("."))
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

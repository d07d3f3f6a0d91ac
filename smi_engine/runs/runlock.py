"""One live process per run directory: an OS lock (``flock`` on ``RUN_DIR/.lock``) held for the
life of the command that writes the run. The OS drops it when the process dies, however it
dies, so a stale lock never blocks; the file keeps the last holder's pid and host for messages
(and for telling a dead run from a live one)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from smi_engine.errors import SmiError
from smi_engine.files import open_regular, read_regular

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder), or raise SmiError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)  # never through a link, never a FIFO
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise in_use(self.path.parent) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(folder: str | Path) -> SmiError:
    holder = holder_of(folder) or {}
    return SmiError(f"run directory {folder} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')}: "
                    f"wait for it to finish, or stop it with `smi watch {folder} --stop`")


def holder_of(folder: str | Path) -> dict | None:
    """The pid and host recorded by the last process that held the folder's lock."""
    try:
        holder = json.loads(read_regular(Path(folder) / LOCK_NAME, limit=4096))
    except (OSError, ValueError, SmiError):
        return None
    return holder if isinstance(holder, dict) else None


def is_locked(folder: str | Path) -> bool:
    """Whether a live process holds the folder's lock now."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, SmiError):  # no lock, or one no process of ours could hold
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)

"""Whether a run that has not ended is still alive.

Its ``run_start`` event names the writing process (pid and host), and that process holds the
run directory's lock for as long as it lives. On the same host a reader can therefore tell a
dead writer (``kill -9``, out of memory, a node reboot) from a live one. Anywhere, even on a copy
of the directory, a run whose events stopped for much longer than its usual interval between
events is *stalled*.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from smi_engine.runs.runlock import LOCK_NAME, is_locked

STALL_FLOOR_SECONDS = 60.0  # never called stalled after less silence than this
STALL_FACTOR = 10.0  # ... or than this many times the run's recent interval between events
ENDED = ("finished", "failed", "interrupted")


@dataclass(frozen=True)
class Liveness:
    status: str  # running, paused, stalled, dead, or how the run ended (finished, failed, interrupted)
    reason: str = ""  # why a run is dead or stalled, for headers and tables

    @property
    def ended(self) -> bool:
        return self.status in ENDED or self.status == "dead"


def writer_alive(run_dir: str | Path, pid: int | None, host: str | None) -> bool | None:
    """True or False when this host can tell, None when the writer runs elsewhere (or is unknown)."""
    if pid is None or host != socket.gethostname():
        return None
    if is_locked(run_dir):
        return True
    if (Path(run_dir) / LOCK_NAME).exists():  # the writer let go of its lock without an end event: it died
        return False
    try:  # no lock file (copied without it): judge by the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stall_after(recent_interval: float | None) -> float:
    """Seconds of silence after which a run counts as stalled."""
    return max(STALL_FLOOR_SECONDS, STALL_FACTOR * (recent_interval or 0.0))


@dataclass(frozen=True)
class Evidence:
    """What a run's events say about it and its writer."""

    ended: str | None  # its final status, if an end event came
    pid: int | None
    host: str | None
    last_event: float | None  # the time of its latest event
    recent_interval: float | None  # its usual interval between events
    paused: bool


def assess(run_dir: str | Path, evidence: Evidence, now: float) -> Liveness:
    """How a run stands now, from its events and, on the writer's host, its lock."""
    if evidence.ended is not None:
        return Liveness(evidence.ended)
    if writer_alive(run_dir, evidence.pid, evidence.host) is False:
        return Liveness("dead", f"process {evidence.pid} on {evidence.host} is gone")
    if evidence.paused:
        return Liveness("paused")
    silence = None if evidence.last_event is None else now - evidence.last_event
    if silence is not None and silence > stall_after(evidence.recent_interval):
        return Liveness("stalled", f"last event {_ago(silence)} ago")
    return Liveness("running")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"

"""The run directory: the unit users keep, share, watch and resume.

``config.json``     fully resolved configuration (enough to re-run); written first
``events.jsonl``    append-only event log, one JSON object per line
``pool/``           synthetic data shards (``batch-00000-r0.safetensors``)
``previews/``       PNG grids, stopped patches greyed
``checkpoint.pt``   mid-batch state for ``--resume`` (tensors only, read with weights_only;
                    ``checkpoint-rN.pt`` for rank N of a torchrun job)
``summary.json``    written last: its presence marks a finished run
``control.json``    requests from outside (``{"action": "stop"}``), read by the running job
``.lock``           held (flock) by the one process writing the run; names its pid and host
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smi_engine.errors import SmiError
from smi_engine.files import atomic_path, open_regular, read_json, read_regular, unreadable_reason, write_json
from smi_engine.runs.runlock import LOCK_NAME, in_use, is_locked


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def pool(self) -> Path:
        return self.path / "pool"

    @property
    def previews(self) -> Path:
        return self.path / "previews"

    def checkpoint(self, rank: int = 0) -> Path:
        return self.path / ("checkpoint.pt" if rank == 0 else f"checkpoint-r{rank}.pt")

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def control(self) -> Path:
        return self.path / "control.json"

    @property
    def is_finished(self) -> bool:
        return self.summary.is_file()

    @property
    def is_run(self) -> bool:
        return self.config.is_file() and self.events.is_file()

    def read_config(self) -> dict[str, Any]:
        try:
            config = read_json(self.config)
        except (OSError, ValueError) as exc:
            raise SmiError(f"{self.config} is unreadable ({exc}): this run cannot be resumed; start a new one") from None
        if not isinstance(config, dict):
            raise SmiError(f"{self.config} is not a JSON object: this run cannot be resumed; start a new one")
        return config

    def create(self, config: dict[str, Any], kind: str, resumable: bool = False) -> None:
        """Claim a fresh directory; refuse anything that already holds files (its lock aside).
        The caller holds the run's lock, or no process does."""
        self._check_empty(kind, resumable)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, {"kind": kind, **config})
        os.close(open_regular(self.events, os.O_WRONLY | os.O_CREAT))

    def check_claimable(self, kind: str, resumable: bool = False) -> None:
        """Raise SmiError unless ``create`` could claim this directory (nothing is written)."""
        if self.path.exists() and not self.path.is_dir():
            raise SmiError(f"--out {self.path} is a file: choose a directory path")
        if is_locked(self.path):
            raise in_use(self.path)
        self._check_empty(kind, resumable)

    def _check_empty(self, kind: str, resumable: bool) -> None:
        if self.path.is_dir() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            if self.is_finished:
                raise SmiError(f"run directory {self.path} holds a finished run: choose another --out or delete it")
            if self.is_run and resumable:
                raise SmiError(f"run directory {self.path} holds an unfinished run: pass --resume to continue it, or choose another --out")
            if self.is_run:
                raise SmiError(f"run directory {self.path} holds an unfinished {self.read_config().get('kind', kind)} run, "
                               "which cannot be resumed: choose another --out, or delete it to start again")
            raise SmiError(f"--out {self.path} is a non-empty folder that is not a run: choose another --out")

    def open_existing(self, kind: str) -> dict[str, Any]:
        """The config of an unfinished run of this kind, for ``--resume``."""
        if not self.is_run:
            raise SmiError(f"{self.path} is not a run directory (no config.json/events.jsonl): drop --resume to start one")
        if self.is_finished:
            raise SmiError(f"run directory {self.path} is already finished: nothing to resume")
        config = self.read_config()
        if config.get("kind") != kind:
            raise SmiError(f"{self.path} is a {config.get('kind')!r} run, not {kind!r}: resume it with `smi {config.get('kind')}`")
        return config

    # -- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any], rank: int = 0) -> None:
        import torch  # here, not at the top: listing and watching runs must not wait for torch

        with atomic_path(self.checkpoint(rank)) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, rank: int = 0) -> dict[str, Any] | None:
        path = self.checkpoint(rank)
        if not path.is_file():
            return None
        import torch

        try:
            with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
        except SmiError:
            raise
        except Exception as exc:  # a torn or foreign file
            raise SmiError(f"resume checkpoint {path} is unreadable ({unreadable_reason(exc)}): delete it to restart "
                           "its batch from the beginning, then --resume") from None

    def clear_checkpoint(self, rank: int = 0) -> None:
        self.checkpoint(rank).unlink(missing_ok=True)

    # -- control ------------------------------------------------------------------------------
    def request(self, action: str) -> None:
        write_json(self.control, {"action": action})

    def pending_request(self) -> str | None:
        try:
            return json.loads(read_regular(self.control, limit=4096)).get("action")
        except (OSError, ValueError, AttributeError, SmiError):
            return None

    def clear_request(self) -> None:
        self.control.unlink(missing_ok=True)

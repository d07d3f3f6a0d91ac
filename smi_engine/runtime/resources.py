"""The running process's memory (and its GPU's state, through NVML), cheap enough to report
with every event."""

from __future__ import annotations

import os
import resource
import time

import torch

from smi_engine.runtime.gpu import monitor_for

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class MemoryProbe:
    """Resident set size and CUDA peak in MB, and the GPU's utilisation, memory and temperature
    (``gpu``, where NVML can read them), re-read at most once per ``every`` seconds."""

    def __init__(self, device: torch.device, every: float = 1.0):
        self.cuda = device.type == "cuda"
        self.gpu = monitor_for(str(device)) if self.cuda else None
        self.every, self.next_read = every, 0.0
        self.value: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        now = time.monotonic()
        if now >= self.next_read:
            self.next_read = now + self.every
            self.value = {"rss_mb": _rss_mb()}
            if self.cuda:
                self.value["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            reading = self.gpu.read() if self.gpu is not None else None
            if reading is not None:
                self.value["gpu"] = reading
        return self.value


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the peak is the best available figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

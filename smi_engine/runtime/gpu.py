"""Utilisation, memory and temperature of a run's CUDA device, read through NVML.

NVML comes from ``nvidia-ml-py`` (``pip install 'smi-toolkit[gpu]'``), an optional dependency:
without it, without a driver, or on CPU, there is no reading and nothing else changes.
"""

from __future__ import annotations

import functools
from typing import Any


class GpuMonitor:
    """Reads one device; ``nvml`` is the ``pynvml`` module (or anything with its functions)."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    def read(self) -> dict[str, float] | None:
        try:
            utilization = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            temperature = self.nvml.nvmlDeviceGetTemperature(self.handle, self.nvml.NVML_TEMPERATURE_GPU)
        except Exception:  # NVMLError and its many subclasses: a reading is never worth a failed run
            return None
        return {"utilization": float(utilization.gpu), "memory_used_mb": memory.used / 2**20,
                "memory_total_mb": memory.total / 2**20, "temperature_c": float(temperature)}


def open_monitor(device_type: str, index: int | None, uuid: str | None, nvml: Any = None) -> GpuMonitor | None:
    """A monitor of CUDA device ``index`` (found by its UUID, so CUDA_VISIBLE_DEVICES does not
    matter), or None where NVML cannot tell: not CUDA, no ``pynvml``, no driver."""
    if device_type != "cuda":
        return None
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}" if uuid and not uuid.startswith("GPU-") else uuid)
        except Exception:
            handle = nvml.nvmlDeviceGetHandleByIndex(index or 0)
    except Exception:
        return None
    return GpuMonitor(nvml, handle)


@functools.lru_cache(maxsize=None)
def monitor_for(device: str) -> GpuMonitor | None:
    """The process-wide monitor of a torch device (``"cuda:0"``), opened once."""
    import torch

    torch_device = torch.device(device)
    if torch_device.type != "cuda":
        return None
    index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "") or None
    return open_monitor("cuda", index, uuid)

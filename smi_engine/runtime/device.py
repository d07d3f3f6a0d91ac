"""``--device auto|cpu|cuda|cuda:N`` -> torch.device, with clear errors."""

from __future__ import annotations

import torch

from smi_engine.errors import SmiError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SmiError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SmiError(f"--device {name} asked for, but no CUDA GPU is visible: use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SmiError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise SmiError(f"--device {name} is not supported: use auto, cpu, cuda or cuda:N")
    return device

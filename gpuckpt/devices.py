"""Choosing the backend: ``device="cpu" | "cuda" | "cuda:N" | "auto"`` (or a Device object),
chosen once and visibly: "auto" returns what it chose, and a CUDA device that cannot be used
raises :class:`DeviceUnavailableError` instead of falling back to the host."""

from __future__ import annotations

import re
from typing import Any

_CUDA = re.compile(r"cuda(?::(\d+))?")

CPU = "cpu"


def is_device_object(device: object) -> bool:
    """A :class:`gpuckpt.device.Device` implementation (e.g. the host stand-in used by the tests)."""
    return hasattr(device, "copy_to_device") and hasattr(device, "new_stream")


def resolve_device(device: Any) -> Any:
    """ "cpu" for the host path, else the Device object that restores will use."""
    if is_device_object(device):
        return device
    if device == CPU:
        return CPU
    if device == "auto":
        from .cuda import cuda_available, cuda_device

        return cuda_device(0) if cuda_available() else CPU
    match = _CUDA.fullmatch(device) if isinstance(device, str) else None
    if match:
        from .cuda import cuda_device

        return cuda_device(int(match.group(1) or 0))
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'")


def device_name(device: Any) -> str:
    return device if isinstance(device, str) else str(device.name)

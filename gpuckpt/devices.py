"""Choosing the backend: ``device="cpu" | "cuda" | "cuda:N" | "auto"``, chosen once and visibly."""

from __future__ import annotations

import re

from .errors import DeviceUnavailableError

_CUDA = re.compile(r"cuda(:\d+)?")


def resolve_device(device: str) -> str:
    """The device a restore runs on; raises for devices that cannot be used.

    "auto" picks the best backend available; while the GPU path is not part of gpuckpt yet, that is
    "cpu" (returned, so callers can record the choice).
    """
    if device in ("cpu", "auto"):
        return "cpu"
    if isinstance(device, str) and _CUDA.fullmatch(device):
        raise DeviceUnavailableError(
            f"device {device!r}: the CUDA restore path is not available in this version of gpuckpt; "
            "use device='cpu' (or 'auto')"
        )
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'")

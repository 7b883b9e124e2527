"""cupy.cuda: devices, streams, events, memory (the part gpuckpt uses)."""

from __future__ import annotations

import threading
from typing import Any

from .. import _machine
from . import driver, memory, pinned_memory, runtime, stream  # noqa: F401
from .memory import MemoryPointer, OutOfMemoryError  # noqa: F401
from .pinned_memory import alloc_pinned_memory  # noqa: F401
from .stream import Event, Stream, get_current_stream  # noqa: F401

_tls = threading.local()


class Device:
    """cupy/cuda/device.pyx, Device: ``with Device(i)`` makes GPU i current for the calling
    thread (runtime.setDevice) and restores the previous one on exit (a per-thread stack)."""

    def __init__(self, device: Any = None) -> None:
        self.id = _machine.current_device() if device is None else int(device)

    def __int__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"

    def __enter__(self) -> Device:
        stack = getattr(_tls, "stack", None)
        if stack is None:
            stack = _tls.stack = []
        stack.append(_machine.current_device())
        if self.id != stack[-1]:
            runtime.setDevice(self.id)
        return self

    def __exit__(self, *exc: object) -> None:
        runtime.setDevice(_tls.stack.pop())

    def use(self) -> Device:
        runtime.setDevice(self.id)
        return self

    def synchronize(self) -> None:
        previous = _machine.current_device()
        try:
            runtime.setDevice(self.id)
            runtime.deviceSynchronize()
        finally:
            runtime.setDevice(previous)

    @property
    def mem_info(self) -> tuple[int, int]:
        """device.pyx, Device.mem_info: cudaMemGetInfo with this device current."""
        previous = _machine.current_device()
        try:
            runtime.setDevice(self.id)
            return runtime.memGetInfo()
        finally:
            runtime.setDevice(previous)


def get_device_id() -> int:
    return _machine.current_device()


def is_available() -> bool:
    return _machine.device_count > 0

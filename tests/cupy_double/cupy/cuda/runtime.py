"""cupy.cuda.runtime (cupy_backends/cuda/api/runtime.pyx): the CUDA runtime calls gpuckpt makes."""

from __future__ import annotations

import ctypes

from .. import _machine
from .._machine import (  # noqa: F401 - the runtime module exports them
    CUDARuntimeError,
    errorIllegalAddress,
    errorInvalidDevice,
    errorInvalidResourceHandle,
    errorInvalidValue,
    errorMemoryAllocation,
)

memcpyHostToHost = 0
memcpyHostToDevice = 1
memcpyDeviceToHost = 2
memcpyDeviceToDevice = 3
memcpyDefault = 4
streamDefault = 0
streamNonBlocking = 1
streamLegacy = 1
streamPerThread = 2


def getDeviceCount() -> int:
    return _machine.device_count


def getDevice() -> int:
    return _machine.current_device()


def setDevice(device: int) -> None:
    _machine.set_current_device(int(device))


def getDeviceProperties(device: int) -> dict[str, object]:
    """cudaGetDeviceProperties as CuPy returns it: a dict of the cudaDeviceProp fields, ``name``
    as bytes (runtime.pyx, getDeviceProperties: ``properties['name'] = props.name``, a char
    array), ``totalGlobalMem`` in bytes; an invalid ordinal is cudaErrorInvalidDevice. Only the
    fields the benchmarks read."""
    _machine.check_device(int(device))
    return {"name": b"CuPy double", "totalGlobalMem": _machine.heap(int(device)).size}


def memGetInfo() -> tuple[int, int]:
    """cudaMemGetInfo: free and total memory of the current device (what cudaMalloc has not
    handed out; a memory pool's cached blocks count as used, as on a GPU)."""
    heap = _machine.heap(_machine.current_device())
    return heap.size - heap.used(), heap.size


def deviceSynchronize() -> None:
    for worker in _machine.all_workers(_machine.current_device()):
        worker.drain()


def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    """cudaMemcpyAsync. CUDA runtime API, "API synchronization behavior", Memcpy/Asynchronous:
    a copy between device memory and page-locked host memory runs on the stream, later; "for
    transfers from pageable host memory to device memory, a stream sync is performed before the
    copy is initiated" and the source is staged at once; "for transfers from device memory to
    pageable host memory, the function will return only once the copy has completed". A copy
    may be queued on a stream of any device ("Stream and Event Behavior": a memory copy succeeds
    even if issued to a stream not associated to the current device)."""
    worker = _machine.worker(stream)
    if size == 0:
        return
    if kind == memcpyDefault:
        kind = {
            (True, True): memcpyDeviceToDevice,
            (True, False): memcpyDeviceToHost,
            (False, True): memcpyHostToDevice,
        }.get(
            (_machine.device_of_pointer(src) is not None, _machine.device_of_pointer(dst) is not None),
            memcpyHostToHost,
        )
    if kind == memcpyHostToDevice:
        _machine.device_bytes(dst, size)  # an invalid destination fails at the call
        if _machine.is_pinned(src, size):

            def h2d() -> None:  # the DMA reads the source when it runs
                ctypes.memmove(_machine.device_bytes(dst, size).ctypes.data, src, size)

            worker.submit(h2d)
        else:
            worker.drain()
            staged = ctypes.string_at(src, size)
            worker.submit(lambda: ctypes.memmove(_machine.device_bytes(dst, size).ctypes.data, staged, size))
    elif kind == memcpyDeviceToHost:
        _machine.device_bytes(src, size)

        def d2h() -> None:
            ctypes.memmove(dst, _machine.device_bytes(src, size).ctypes.data, size)

        worker.submit(d2h)
        if not _machine.is_pinned(dst, size):
            worker.drain()
    elif kind == memcpyDeviceToDevice:

        def d2d() -> None:
            ctypes.memmove(
                _machine.device_bytes(dst, size).ctypes.data, _machine.device_bytes(src, size).ctypes.data, size
            )

        worker.submit(d2d)
    else:
        raise CUDARuntimeError(errorInvalidValue, f"memcpy kind {kind}")

"""The simulated machine behind the double: device memory, the workers that run each stream's
queue, and the knobs the tests turn. Not part of CuPy's API.

Every rule kept here is CuPy's or CUDA's, cited where it is kept. Device memory is one host
buffer per device ("the heap"); device pointers are real addresses inside it, so a queued copy
or kernel holds only integers, as on a GPU, and never keeps a Python array alive: an array
whose last reference goes hands its memory back to the pool at once, whatever is still queued.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

# -- configuration (set by cupy_double.install) ------------------------------------------------
device_count = 2
memory_bytes = 512 << 20  # per device
#: Seconds each operation queued on a non-default stream waits before it runs: widens the window
#: in which a program that does not order its work correctly reads or writes the wrong bytes.
stream_delay_s = 0.0


class CUDARuntimeError(RuntimeError):
    """cupy_backends.cuda.api.runtime.CUDARuntimeError: ``status`` is the cudaError_t value."""

    _NAMES = {
        1: ("cudaErrorInvalidValue", "invalid argument"),
        2: ("cudaErrorMemoryAllocation", "out of memory"),
        101: ("cudaErrorInvalidDevice", "invalid device ordinal"),
        400: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
        700: ("cudaErrorIllegalAddress", "an illegal memory access was encountered"),
    }

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        name, text = self._NAMES.get(status, (f"cudaError{status}", "error"))
        super().__init__(f"{name}: {text}" + (f" ({detail})" if detail else ""))


errorInvalidValue = 1
errorMemoryAllocation = 2
errorInvalidDevice = 101
errorInvalidResourceHandle = 400
errorIllegalAddress = 700


# -- per-thread state ------------------------------------------------------------------------
# CUDA runtime API, cudaSetDevice: "Sets device as the current device for the calling host
# thread". Each thread starts on device 0.
_tls = threading.local()


def current_device() -> int:
    return getattr(_tls, "device", 0)


def set_current_device(index: int) -> None:
    check_device(index)
    _tls.device = index


def check_device(index: int) -> None:
    if not 0 <= index < device_count:
        raise CUDARuntimeError(errorInvalidDevice, f"device {index}, {device_count} present")


# -- device memory -----------------------------------------------------------------------------
class Heap:
    """One device's memory: what cudaMalloc hands out, in 512-byte units, first fit."""

    UNIT = 512

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size
        self.bytes = np.zeros(size, np.uint8)  # calloc: pages are only touched when used
        self.base = int(self.bytes.ctypes.data)
        self._free = [(0, size)]  # (offset, length), sorted by offset
        self._live: dict[int, int] = {}  # offset -> length of live cudaMalloc blocks
        self._lock = threading.Lock()

    def malloc(self, nbytes: int) -> int:
        nbytes = -(-nbytes // self.UNIT) * self.UNIT
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= nbytes:
                    if length == nbytes:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + nbytes, length - nbytes)
                    self._live[offset] = nbytes
                    return self.base + offset
        raise CUDARuntimeError(errorMemoryAllocation, f"cudaMalloc of {nbytes} bytes on device {self.index}")

    def free(self, ptr: int) -> None:
        offset = ptr - self.base
        with self._lock:
            length = self._live.pop(offset)
            self._free.append((offset, length))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for start, size in self._free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((start, size))
            self._free = merged

    def used(self) -> int:
        with self._lock:
            return sum(self._live.values())

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes [ptr, ptr + nbytes) as a host array; they must lie in one live block
        (anything else is an illegal address on a GPU)."""
        offset = ptr - self.base
        with self._lock:
            for start, length in self._live.items():
                if start <= offset and offset + nbytes <= start + length:
                    return self.bytes[offset : offset + nbytes]
        raise CUDARuntimeError(errorIllegalAddress, f"{nbytes} bytes at {ptr:#x} on device {self.index}")


_heaps: dict[int, Heap] = {}
_heaps_lock = threading.Lock()


def heap(index: int) -> Heap:
    check_device(index)
    with _heaps_lock:
        if index not in _heaps:
            _heaps[index] = Heap(index, memory_bytes)
        return _heaps[index]


def device_of_pointer(ptr: int) -> int | None:
    for index, h in list(_heaps.items()):
        if h.base <= ptr < h.base + h.size:
            return index
    return None


def device_bytes(ptr: int, nbytes: int) -> np.ndarray:
    index = device_of_pointer(ptr)
    if index is None:
        raise CUDARuntimeError(errorIllegalAddress, f"{ptr:#x} is not device memory")
    return heap(index).view(ptr, nbytes)


# -- pinned host memory --------------------------------------------------------------------------
_pinned: dict[int, int] = {}  # address -> length of page-locked blocks (cudaHostAlloc)
_pinned_lock = threading.RLock()  # re-entered when a collected block is freed under it


def host_alloc(nbytes: int) -> np.ndarray:
    block = np.zeros(max(nbytes, 1), np.uint8)
    with _pinned_lock:
        _pinned[int(block.ctypes.data)] = nbytes
    return block


def host_free(ptr: int) -> None:
    with _pinned_lock:
        _pinned.pop(ptr, None)


def is_pinned(ptr: int, nbytes: int) -> bool:
    with _pinned_lock:
        return any(start <= ptr and ptr + nbytes <= start + length for start, length in _pinned.items())


def host_bytes(ptr: int, nbytes: int) -> np.ndarray:
    """Host memory at an address (a numpy buffer the caller keeps alive), as a writable array."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr)) if nbytes else np.empty(0, np.uint8)


# -- streams ---------------------------------------------------------------------------------------
class Marker:
    """What an event records: the point of a stream's queue it has reached, and a fault of the
    work queued before it, reported where CUDA reports asynchronous errors (the next
    synchronization)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.error: BaseException | None = None


class Worker:
    """A stream's queue, run in order on its own thread: work runs later, not when queued."""

    def __init__(self, device: int, name: str, delay_s: float) -> None:
        self.device = device
        self.delay_s = delay_s
        self.error: BaseException | None = None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            if self.delay_s and not isinstance(work, _MarkerWork):
                time.sleep(self.delay_s)
            try:
                work()
            except BaseException as exc:  # a device fault: sticky for this stream
                self.error = self.error or exc

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def mark(self) -> Marker:
        marker = Marker()
        self._queue.put(_MarkerWork(self, marker))
        return marker

    def drain(self) -> None:
        """Wait until everything queued so far has run (cudaStreamSynchronize)."""
        marker = self.mark()
        marker.reached.wait()
        if marker.error is not None:
            raise marker.error

    def close(self) -> None:
        self._queue.put(None)  # queued work still runs first (cudaStreamDestroy returns at once)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


class _MarkerWork:
    def __init__(self, worker: Worker, marker: Marker) -> None:
        self.worker, self.marker = worker, marker

    def __call__(self) -> None:
        self.marker.error = self.worker.error
        self.marker.reached.set()


_streams: dict[int, Worker] = {}  # stream handle -> worker
_null: dict[int, Worker] = {}  # device -> its legacy default stream
_streams_lock = threading.RLock()  # re-entered when a collected Stream is destroyed under it
_next_handle = [0x5000]


def new_stream(device: int) -> int:
    with _streams_lock:
        _next_handle[0] += 0x10
        handle = _next_handle[0]
    worker = Worker(device, f"cupy-double-stream-{handle:#x}", stream_delay_s)
    with _streams_lock:
        _streams[handle] = worker
    return handle


def destroy_stream(handle: int) -> None:
    with _streams_lock:
        worker = _streams.pop(handle, None)
    if worker is not None:
        worker.close()


def worker(handle: int) -> Worker:
    """The queue a stream handle names. Handle 0 is the legacy default stream of the calling
    thread's current device (CUDA runtime API, "Stream synchronization behavior": the NULL stream
    is per device, shared by all host threads). Handle 1 is ``cudaStreamLegacy`` (driver_types.h:
    "((cudaStream_t)0x1)", the legacy default stream whatever the compilation mode), the same
    queue; DLPack consumers pass it for the default stream. cudaStreamPerThread (2) is not
    modelled."""
    if handle in (0, 1):
        device = current_device()
        with _streams_lock:
            if device not in _null:
                _null[device] = Worker(device, f"cupy-double-null-{device}", 0.0)
            return _null[device]
    with _streams_lock:
        found = _streams.get(handle)
    if found is None:
        raise CUDARuntimeError(errorInvalidResourceHandle, f"stream {handle:#x}")
    return found


def all_workers(device: int) -> list[Worker]:
    with _streams_lock:
        return [w for w in list(_streams.values()) + list(_null.values()) if w.device == device]


# -- kernels: which devices have loaded a module (cuModuleLoadData is per context) ------------------
modules_loaded: dict[int, int] = {}


def reset() -> None:
    """Forget everything (a fresh machine for the next test module)."""
    with _streams_lock:
        workers = list(_streams.values()) + list(_null.values())
        _streams.clear()
        _null.clear()
    for w in workers:
        w.close()
    for w in workers:  # gone before the next test counts threads
        w.join(10.0)
    with _heaps_lock:
        _heaps.clear()
    with _pinned_lock:
        _pinned.clear()
    modules_loaded.clear()
    _tls.__dict__.clear()

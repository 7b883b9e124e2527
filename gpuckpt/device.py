"""The small device interface the staged restore pipeline is written against, and a host
implementation of it that runs the same pipeline without a GPU.

A device provides arrays in its memory, pinned host buffers, streams (ordered queues of
asynchronous work), events recorded on streams, and the conversion kernels. ``HostDevice`` runs
the pipeline's ordering on the host: its "device memory" is numpy, each stream is a worker thread
running its queue in order, an event fires when its stream reaches it, and its copies read the
staging buffer when they run, not when they are queued, so a pipeline that reused a buffer too
early gets wrong bytes and the tests see it. It is also a device of its own (``device=HostDevice()``
restores into numpy through the pipeline). It does not stand for a GPU: it has no dtype rules, no
default stream, no memory pool and one device. The CUDA implementation is
``gpuckpt.cuda.CudaDevice``, which the tests run on a GPU or on the CuPy double (tests/cupy_double).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class Event(Protocol):
    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class Stream(Protocol):
    pass


class Device(Protocol):
    """What the pipeline needs of a device (all asynchronous work is ordered per stream)."""

    name: str

    def array_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype of the device array a tensor restored as ``dtype`` arrives in: ``dtype`` when
        the device's arrays can hold it, else the unsigned integer type of its width, holding
        exactly the bytes the host path's array holds (float8, int4, ... on CuPy)."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new array; ``dtype`` is one :meth:`array_dtype` returns (anything else is refused)."""
        ...

    def byte_view(self, array: Any) -> Any:
        """A flat uint8 view of a device array (its raw bytes)."""
        ...

    def holds(self, array: Any) -> bool:
        """Whether ``array`` lives in this device's memory (``out=`` arrays are checked with it)."""
        ...

    def carve(self, arena: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """An array of ``shape`` and ``dtype`` over the bytes of the uint8 array ``arena`` from
        ``offset`` (aligned to ``dtype``'s size), sharing its memory."""
        ...

    def pinned(self, nbytes: int) -> np.ndarray:
        """A host staging buffer (page-locked on a GPU), as a uint8 numpy array."""
        ...

    def release_pinned(self, buffer: np.ndarray) -> None: ...

    def new_stream(self) -> Stream: ...

    def close_stream(self, stream: Stream) -> None:
        """Release a stream once the work queued on it is no longer needed to be waited on."""
        ...

    def copy_to_device(self, dst: Any, dst_offset: int, src: np.ndarray, nbytes: int, stream: Stream) -> None:
        """Queue a copy of ``src[:nbytes]`` into the byte view ``dst`` at ``dst_offset``."""
        ...

    def copy_to_host(self, dst: np.ndarray, src: Any, src_offset: int, nbytes: int, stream: Stream) -> None:
        """Queue a copy of ``nbytes`` of the byte view ``src`` from ``src_offset`` into ``dst``."""
        ...

    def record(self, stream: Stream) -> Event: ...

    def record_current(self) -> Event | None:
        """An event recorded on the calling thread's current stream of this device, marking the
        work the caller has queued so far (None where the device has no such stream)."""
        ...

    def wait_event(self, stream: Stream, event: Event) -> None:
        """Make work queued on ``stream`` from now on wait until ``event`` (of any stream) fires."""
        ...

    def convert(self, kernel: str, src: Any, dst: Any, stream: Stream) -> None:
        """Queue conversion ``kernel`` (a name from kernels/conversions.def) from ``src`` to ``dst``."""
        ...

    def byteswap(self, width: int, array: Any, stream: Stream) -> None: ...

    def clear_high_bits(self, array: Any, bits: int, stream: Stream) -> None:
        """Queue ``array &= (1 << bits) - 1`` on the uint8 byte view ``array`` (the 4- and 2-bit
        types, stored one per byte: FORMAT.md 3.7)."""
        ...

    def place(
        self, full: Any, region: tuple[tuple[int, int], ...], part: Any, shape: tuple[int, ...], stream: Stream
    ) -> None:
        """Queue a device-side copy of ``part`` (raw bytes of ``full``'s dtype, of ``shape``) into
        the ``[start, stop)`` box ``region`` of the array ``full``."""
        ...

    def free_bytes(self) -> int: ...


class HostEvent:
    def __init__(self, stream: HostStream) -> None:
        self._fired = threading.Event()
        self._stream = stream

    def fire(self) -> None:
        self._fired.set()

    def synchronize(self) -> None:
        """Wait for the event; a fault in work queued before it is raised here, as CUDA reports
        an asynchronous error at the next synchronization."""
        self._fired.wait()
        if self._stream.errors:
            raise self._stream.errors[0]

    def query(self) -> bool:
        return self._fired.is_set()


class HostStream:
    """A worker thread running queued callables in order."""

    def __init__(self, name: str, delay_s: float) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._delay_s = delay_s
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            if self._delay_s:
                time.sleep(self._delay_s)
            try:
                work()
            except BaseException as exc:  # a device fault: kept, and reported by the pipeline
                self.errors.append(exc)

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def close(self) -> None:
        self._queue.put(None)


class HostDevice:
    """A stand-in GPU made of numpy arrays and threads (see the module docstring).

    ``copy_delay_s`` slows every queued operation, widening the window in which a pipeline that
    reused a staging buffer before its copy ran would corrupt data. ``memory_bytes`` bounds what
    :meth:`free_bytes` reports.
    """

    def __init__(self, name: str = "host-standin", copy_delay_s: float = 0.0, memory_bytes: int = 1 << 40) -> None:
        from .host.convert import reference_convert

        self.name = name
        self._delay_s = copy_delay_s
        self._memory_bytes = memory_bytes
        self._convert = reference_convert
        self.streams: list[HostStream] = []
        self.pinned_live = 0  # pinned buffers handed out and not released (leak checks)
        self.allocated_bytes = 0

    def array_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(dtype)  # numpy holds every type a tensor has

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        array = np.empty(shape, dtype)
        self.allocated_bytes += array.nbytes
        return array

    def holds(self, array: Any) -> bool:
        return isinstance(array, np.ndarray)

    def byte_view(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(-1).view(np.uint8)

    def carve(self, arena: np.ndarray, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return arena[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def pinned(self, nbytes: int) -> np.ndarray:
        self.pinned_live += 1
        return np.empty(nbytes, np.uint8)

    def release_pinned(self, buffer: np.ndarray) -> None:
        self.pinned_live -= 1

    def new_stream(self) -> HostStream:
        stream = HostStream(f"{self.name}-stream{len(self.streams)}", self._delay_s)
        self.streams.append(stream)
        return stream

    def close_stream(self, stream: HostStream) -> None:
        stream.close()  # its queued work still runs first
        self.streams.remove(stream)

    def copy_to_device(
        self, dst: np.ndarray, dst_offset: int, src: np.ndarray, nbytes: int, stream: HostStream
    ) -> None:
        def copy() -> None:  # reads ``src`` when it runs, like a DMA engine
            dst[dst_offset : dst_offset + nbytes] = src[:nbytes]

        stream.submit(copy)

    def copy_to_host(self, dst: np.ndarray, src: np.ndarray, src_offset: int, nbytes: int, stream: HostStream) -> None:
        def copy() -> None:  # writes ``dst`` when it runs, like a DMA engine
            dst[:nbytes] = src[src_offset : src_offset + nbytes]

        stream.submit(copy)

    def record(self, stream: HostStream) -> HostEvent:
        event = HostEvent(stream)
        stream.submit(event.fire)
        return event

    def record_current(self) -> None:
        return None  # the caller has no stream here: its numpy work is done when it returns

    def wait_event(self, stream: HostStream, event: HostEvent) -> None:
        stream.submit(event.synchronize)

    def convert(self, kernel: str, src: np.ndarray, dst: np.ndarray, stream: HostStream) -> None:
        def run() -> None:
            dst[...] = self._convert(kernel, src).reshape(dst.shape)

        stream.submit(run)

    def byteswap(self, width: int, array: np.ndarray, stream: HostStream) -> None:
        def run() -> None:  # not a lambda: numpy 1.26's stubs type byteswap(inplace=True) as returning the array
            array.view(f"u{width}").byteswap(inplace=True)

        stream.submit(run)

    def clear_high_bits(self, array: np.ndarray, bits: int, stream: HostStream) -> None:
        def run() -> None:
            array[...] &= (1 << bits) - 1

        stream.submit(run)

    def place(
        self,
        full: np.ndarray,
        region: tuple[tuple[int, int], ...],
        part: np.ndarray,
        shape: tuple[int, ...],
        stream: HostStream,
    ) -> None:
        def run() -> None:
            full[tuple(slice(a, b) for a, b in region)] = part.view(full.dtype).reshape(shape)

        stream.submit(run)

    def free_bytes(self) -> int:
        return self._memory_bytes - self.allocated_bytes

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

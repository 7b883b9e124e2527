"""Device arrays to the host in pinned chunks, for ``save``: host memory stays at two chunks
whatever the array's size, and the copy of the next chunk overlaps the file write of this one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .device import Device

CHUNK_BYTES = 16 << 20  # per pinned buffer; two are in use


def stream_to_host(device: Device, source: Any, nbytes: int, chunk_bytes: int | None = None) -> Iterator[memoryview]:
    """Yield the first ``nbytes`` of the device byte view ``source`` in order, as views of pinned
    buffers. Each view is valid only until the next one is asked for (the caller writes it out
    first), so the buffer behind it is refilled only after the caller is done with it."""
    if nbytes == 0:
        return
    chunk_bytes = min(chunk_bytes or CHUNK_BYTES, nbytes)
    buffers = [device.pinned(chunk_bytes) for _ in range(2)]
    callers_work = device.record_current()
    stream = device.new_stream()
    if callers_work is not None:  # the copies read the array after the work computing it
        device.wait_event(stream, callers_work)
    starts = range(0, nbytes, chunk_bytes)
    pending = []  # (buffer index, length, event of its copy), oldest first
    try:

        def queue_copy(number: int) -> None:
            start = starts[number]
            length = min(chunk_bytes, nbytes - start)
            device.copy_to_host(buffers[number % 2], source, start, length, stream)
            pending.append((number % 2, length, device.record(stream)))

        queue_copy(0)
        for number in range(len(starts)):
            if number + 1 < len(starts):
                # LIFETIME: buffer (number + 1) % 2 last held chunk number - 1, which the caller
                # finished writing before asking for chunk number; refilling it now is safe.
                queue_copy(number + 1)
            which, length, copied = pending.pop(0)
            copied.synchronize()  # the DMA into this buffer has landed
            yield buffers[which][:length].data
    finally:
        # LIFETIME: copies may still be writing into the buffers (the caller stopped early):
        # wait for them before the pinned memory goes back. A fault they report now is second to
        # whatever stopped the caller.
        for _, _, event in pending:
            with contextlib.suppress(Exception):
                event.synchronize()
        device.close_stream(stream)
        for buffer in buffers:
            device.release_pinned(buffer)


def contiguous_bytes(device: Device, array: Any) -> Any:
    """The raw bytes of a C-contiguous device array as a flat uint8 view (copied on the device
    first if the array is strided)."""
    flags = getattr(array, "flags", None)
    if flags is not None and not flags.c_contiguous:
        # On the array's own device (CuPy copies onto the current one), so the copy is queued on
        # the current stream that stream_to_host's streams wait for.
        home: Any = getattr(array, "device", None)  # a cupy.cuda.Device is a context manager
        with home if hasattr(home, "__enter__") else contextlib.nullcontext():
            array = array.copy(order="C")
    return device.byte_view(array)

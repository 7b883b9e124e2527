"""cupy.cuda.stream (cupy/cuda/stream.pyx): streams, events, the per-thread current stream."""

from __future__ import annotations

import threading
from typing import Any

from .. import _machine
from .._machine import CUDARuntimeError, errorInvalidResourceHandle

# stream.pyx, _ThreadLocal: the current stream is kept per thread and per device (a stack per
# device for ``with`` blocks); a thread starts with the null stream current on every device.
_tls = threading.local()


def _stacks() -> list[list[Any]]:
    stacks = getattr(_tls, "stacks", None)
    if stacks is None:
        stacks = _tls.stacks = [[Stream.null] for _ in range(_machine.device_count)]
    return stacks


def get_current_stream(device_id: int = -1) -> Any:
    """stream.pyx, get_current_stream: the calling thread's current stream on ``device_id``
    (default: the current device)."""
    if device_id == -1:
        device_id = _machine.current_device()
    return _stacks()[device_id][-1]


def get_current_stream_ptr() -> int:
    return int(get_current_stream().ptr)


def _check_stream_device_match(device_id: int) -> int:
    """stream.pyx, check_stream_device_match: a stream is entered or used only on its device."""
    current = _machine.current_device()
    if device_id == -1:
        device_id = current
    if device_id != current:
        raise RuntimeError(
            f"The device that the stream is created on ({device_id}) does not match with the current device ({current})"
        )
    return device_id


class Event:
    """stream.pyx, Event: ``cudaEventCreateWithFlags`` creates it on the calling thread's current
    device, and it belongs to that device for good."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self.device_id = _machine.current_device()
        self._marker: _machine.Marker | None = None
        self.ptr = id(self)

    def record(self, stream: Any = None) -> None:
        """stream.pyx, Event.record: on ``stream``, else on the current stream."""
        _event_record(self, get_current_stream_ptr() if stream is None else int(stream.ptr))

    @property
    def done(self) -> bool:
        """cudaEventQuery: True before any record (an event then "represents an empty set of work")."""
        marker = self._marker
        return marker is None or marker.reached.is_set()

    def synchronize(self) -> None:
        """cudaEventSynchronize: waits for the work the last record captured; a fault in it is
        reported here (it succeeds whatever the current device: "Stream and Event Behavior")."""
        marker = self._marker
        if marker is None:
            return
        marker.reached.wait()
        if marker.error is not None:
            raise CUDARuntimeError(_machine.errorIllegalAddress, f"a queued operation failed: {marker.error!r}")


def _event_record(event: Event, stream_ptr: int) -> None:
    """cudaEventRecord: "event and stream must be on the same device" (CUDA runtime API, Event
    Management; returns cudaErrorInvalidResourceHandle), and the CUDA C++ Programming Guide,
    Multi-Device System, "Stream and Event Behavior": "cudaEventRecord() will fail if the input
    event and input stream are associated to different devices"."""
    worker = _machine.worker(stream_ptr)
    if worker.device != event.device_id:
        raise CUDARuntimeError(
            errorInvalidResourceHandle,
            f"event of device {event.device_id} recorded on a stream of device {worker.device}",
        )
    event._marker = worker.mark()


class _BaseStream:
    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr = ptr
        self.device_id = device_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BaseStream) and self.ptr == other.ptr

    def __hash__(self) -> int:
        return self.ptr

    def __enter__(self) -> _BaseStream:
        """stream.pyx, _BaseStream.__enter__: checks the device, then pushes the stream as the
        current stream of this thread on that device."""
        device_id = _check_stream_device_match(self.device_id)
        _stacks()[device_id].append(self)
        _enter_order().append(device_id)
        return self

    def __exit__(self, *exc: object) -> None:
        device_id = _enter_order().pop()
        _stacks()[device_id].pop()

    def use(self) -> _BaseStream:
        device_id = _check_stream_device_match(self.device_id)
        _stacks()[device_id][-1] = self
        return self

    def record(self, event: Event | None = None) -> Event:
        """stream.pyx, _BaseStream.record: a new Event (of the *current* device) unless one is
        given, then cudaEventRecord on this stream."""
        if event is None:
            event = Event()
        _event_record(event, self.ptr)
        return event

    def wait_event(self, event: Event) -> None:
        """cudaStreamWaitEvent: later work on this stream waits for the work the event's last
        record captured ("use the most recently captured state at the time of the API call");
        it "will succeed even if the input stream and input event are associated to different
        devices" (Programming Guide, "Stream and Event Behavior")."""
        marker = event._marker
        if marker is not None:
            _machine.worker(self.ptr).submit(marker.reached.wait)

    @property
    def done(self) -> bool:
        return self.record().done

    def synchronize(self) -> None:
        _machine.worker(self.ptr).drain()


def _enter_order() -> list[int]:
    order = getattr(_tls, "order", None)
    if order is None:
        order = _tls.order = []
    return order


class Stream(_BaseStream):
    """stream.pyx, Stream. ``Stream(non_blocking=True)`` is a cudaStreamNonBlocking stream of the
    current device: its work "may run concurrently with work in stream 0 (the NULL stream)" and
    it "should perform no implicit synchronization with stream 0" (CUDA runtime API,
    cudaStreamCreateWithFlags). ``Stream.null`` (handle 0, device -1) is the legacy default
    stream of whichever device is current. Blocking streams are not modelled: gpuckpt makes none."""

    null: Stream

    def __init__(
        self, null: bool = False, non_blocking: bool = False, ptds: bool = False, priority: Any = None
    ) -> None:
        if null:
            super().__init__(0, -1)
            return
        if not non_blocking or ptds:
            raise NotImplementedError("the CuPy double models non-blocking streams and the null stream only")
        device = _machine.current_device()
        super().__init__(_machine.new_stream(device), device)

    def __del__(self) -> None:
        # stream.pyx, Stream.__del__: cudaStreamDestroy; work already queued still runs.
        if getattr(self, "ptr", 0):
            _machine.destroy_stream(self.ptr)

    def __repr__(self) -> str:
        return f"<Stream {self.ptr:#x} (device {self.device_id})>"


Stream.null = Stream(null=True)

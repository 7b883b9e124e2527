"""The staged restore: checkpoint bytes into device arrays through a ring of pinned host buffers.

Reader threads take read groups from the plan (small tensors coalesced, large ones cut to the slot
size), ``preadv`` each piece into a free staging slot, checksum it there, and queue an asynchronous
copy from the slot into the tensor's final device memory on the thread's stream, then record an
event. A slot goes back to the free ring with that event and is refilled only after the event has
fired. Once a tensor's last byte is queued, its conversion kernel (dtype cast or byte swap) is
queued on the same stream, so it runs after the copies, and a per-tensor event marks it ready.
Reading, checksumming, copying and converting overlap; nothing synchronizes the whole device.

Written against :class:`gpuckpt.device.Device`, so the same code runs on a GPU
(``gpuckpt.cuda.CudaDevice``, tested on the CuPy double where no GPU is present) and on the host
device ``HostDevice``. Buffer lifetimes: a staging slot is guarded by the event after its last copy
(``_Slot``); the device buffers a restore allocates for itself by the event after their tensor's
last reader (``_Scratch``); the caller's arrays by the ordering with the caller's stream (``_start``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .casting import DtypeChooser
from .device import Device, Event
from .dtypes import DTYPES
from .errors import CheckpointError, InvalidArgumentError, UnsupportedError, describe
from .format.bundle import TensorEntry
from .format.crc import PartChecksums, crc32c
from .host.convert import kernel_for
from .host.lazy_slice import new_scratch, read_selection
from .host.reader import HostReader, check_readable
from .options import RestoreOptions
from .plan import PlanOptions, ReadGroup, pieces_of, plan_reads
from .regions import REGION_GAP_BYTES, Region, intersect, is_full, sub_selections


def check_out_array(
    given: Any,
    entry: TensorEntry,
    dtype: np.dtype,
    path: str,
    *,
    contiguous: bool = False,
    shape: tuple[int, ...] | None = None,
) -> None:
    """An ``out=`` array must have the tensor's shape (``shape``: a region's) and restored dtype,
    and for a device restore be C-contiguous (the copies write its bytes in order); checked
    before any write."""
    expected = entry.shape if shape is None else shape
    if tuple(given.shape) != expected or np.dtype(given.dtype) != dtype:
        what = "the tensor restores as" if shape is None else "the region restores as"
        raise InvalidArgumentError(
            f"out[{entry.name!r}] is {given.dtype}{list(given.shape)}, {what} "
            f"{dtype}{list(expected)}: nothing was written: " + describe(path, entry.name)
        )
    flags = getattr(given, "flags", None)
    if contiguous and flags is not None and not flags.c_contiguous:
        raise InvalidArgumentError(
            f"out[{entry.name!r}] is not C-contiguous: a device restore copies the stored bytes into "
            "it in order; pass a contiguous array (then copy it where it must go): nothing was written: "
            + describe(path, entry.name)
        )


PART_SLOTS = 4  # tensors over two parts of this many slots are staged by several threads at once
ARENA_ALIGNMENT = 256  # bytes; what cudaMalloc guarantees, so carved tensors are aligned the same


class DeviceMemoryError(CheckpointError, MemoryError):
    """The device has too little free memory for the restore (raised before anything is copied)."""


@dataclasses.dataclass
class _Target:
    """Where one tensor goes: ``raw`` receives the stored bytes; ``array`` is what the caller gets
    (the same memory unless a conversion kernel turns ``raw`` into it)."""

    entry: TensorEntry
    array: Any
    raw: Any  # flat uint8 device view the copies write into
    kernel: str | None  # conversion from the stored type, or None
    swap_width: int  # byte swap width for big-endian bundles, 0 for none
    narrow_bits: int  # the 4- and 2-bit types: their bytes' meaningful low bits (0: all)
    crc: int = 0
    ready: Event | None = None
    full: Any = None  # partitioned tensors: the stored-dtype array the slices are placed into


class _Scratch:
    """LIFETIME: the one owner of the device buffers a restore allocates for its own use: the
    stored bytes of a converted tensor, each saved slice of a partitioned one, the stored-type
    whole a converted partitioned tensor is assembled in.

    No queued copy or kernel keeps a buffer alive, and CuPy's pool hands a freed block to the
    next allocation on the same stream at once; so each buffer is held here until the event
    recorded after its tensor's last reader (the tensor's ``ready`` event, recorded after its
    conversion or last placement) has fired. ``release`` waits for those events and runs before
    the restore reports that it is done. After an error the streams are drained first, so it
    then has nothing left to wait for.
    """

    def __init__(self, device: Device) -> None:
        self._device = device
        self._held: dict[int, tuple[_Target, list[Any]]] = {}  # id(target) -> its buffers
        self._lock = threading.Lock()

    def new(self, target: _Target, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        buffer = self._device.empty(shape, dtype)
        with self._lock:
            self._held.setdefault(id(target), (target, []))[1].append(buffer)
        return buffer

    def release(self) -> BaseException | None:
        """Drop every buffer once its tensor's ready event has fired; a fault the wait reports is
        returned, not raised."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        fault: BaseException | None = None
        for target, buffers in held:
            if target.ready is not None:
                fault = _quietly(target.ready.synchronize) or fault
            target.raw = target.full = None  # views of these buffers
            buffers.clear()
        return fault


class _Parts:
    """A large tensor cut into parts that several reader threads stage at once: each part's CRC
    and the event after its last copy, joined by whoever finishes the last part."""

    def __init__(self, target: _Target, bounds: list[tuple[int, int]]) -> None:
        self.target = target
        self.bounds = bounds
        self.checksums = PartChecksums(bounds)
        self.events: list[Event | None] = [None] * len(bounds)

    def done(self, part: int, crc: int, event: Event) -> bool:
        """Record a finished part; True for the caller that finished the last one."""
        self.events[part] = event  # before recording: the last recorder then sees every event
        return self.checksums.record(part, crc)


@dataclasses.dataclass(frozen=True)
class _RegionItem:
    """Work item: the region (not the whole) of one tensor, staged on one stream."""

    target: _Target
    region: Region


# A sub-region of a region, a contiguous stretch of its result: (first element, selection, elements)
_Piece = tuple[int, tuple[range, ...], int]


@dataclasses.dataclass(frozen=True)
class _RegionPart:
    """Work item: bytes ``parts.bounds[index]`` of a large region of an unpartitioned tensor,
    the result of the sub-regions ``pieces``."""

    parts: _Parts
    index: int
    pieces: tuple[_Piece, ...]


@dataclasses.dataclass(frozen=True)
class _Part:
    """Work item: bytes [start, end) of a large tensor, one part of ``parts``."""

    parts: _Parts
    index: int


class _Slot:
    """One pinned staging buffer and the event of the last copy that read it."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)  # type: ignore[arg-type]
        self.last_copy: Event | None = None

    def wait_until_free(self) -> None:
        # LIFETIME: the slot is refilled only after the event of its last copy has fired.
        if self.last_copy is not None:
            self.last_copy.synchronize()
            self.last_copy = None


class RestoreFuture:
    """An asynchronous restore. ``result()`` waits for every tensor; ``ready(name)`` says whether
    one has arrived and ``wait(name)`` waits for just that one, so a server can start early.

    A tensor arrives when its last copy and conversion are queued; it is ready when the event
    recorded after them has fired (on the host path, when it is read).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._names = list(dict.fromkeys(names))
        self._arrays: dict[str, Any] = {}
        self._events: dict[str, Event | None] = {}
        self._error: BaseException | None = None
        self._finished = False
        # One condition for all tensors: a restore of 100,000 tensors must not build 100,000 Events.
        self._changed = threading.Condition()

    def _arrive(self, name: str, array: Any, event: Event | None) -> None:
        with self._changed:
            self._arrays[name], self._events[name] = array, event
            self._changed.notify_all()

    def _arrive_all(self, arrays: dict[str, Any]) -> None:
        """Many tensors at once, already complete (the host path)."""
        with self._changed:
            self._arrays.update(arrays)
            self._events.update(dict.fromkeys(arrays))
            self._changed.notify_all()

    def _finish(self, error: BaseException | None) -> None:
        with self._changed:
            self._error = error
            if error is not None:
                self._arrays.clear()  # a failed restore hands nothing out (and frees its memory)
                self._events.clear()
            self._finished = True
            self._changed.notify_all()

    def done(self) -> bool:
        return self._finished

    def ready(self, name: str) -> bool:
        """True once ``name`` is fully in memory (converted)."""
        if name not in self._arrays:
            return False
        event = self._events.get(name)
        return event is None or event.query()

    def wait(self, name: str) -> Any:
        """The array of one tensor, as soon as it is complete."""
        with self._changed:
            self._changed.wait_for(lambda: name in self._arrays or self._finished)
            if self._error is not None:
                raise self._error
            array, event = self._arrays[name], self._events[name]
        if event is not None:
            event.synchronize()
        return array

    def result(self) -> dict[str, Any]:
        with self._changed:
            self._changed.wait_for(lambda: self._finished)
        if self._error is not None:
            raise self._error
        for event in self._events.values():
            if event is not None:
                event.synchronize()
        return {name: self._arrays[name] for name in self._names}


class SpreadFuture(RestoreFuture):
    """Restores running on several devices at once, as one future: each tensor is ready as soon
    as the restore on its device has it; ``result()`` waits for all of them (so nothing is left
    running) and raises the first error any of them met."""

    def __init__(self, names: Sequence[str], parts: Sequence[tuple[RestoreFuture, Sequence[str]]]) -> None:
        super().__init__(names)
        self._parts = [part for part, _ in parts]
        self._owner = {name: part for part, group in parts for name in group}

    def done(self) -> bool:
        return all(part.done() for part in self._parts)

    def ready(self, name: str) -> bool:
        part = self._owner.get(name)
        return part is not None and part.ready(name)

    def wait(self, name: str) -> Any:
        if name not in self._owner:
            raise KeyError(name)
        return self._owner[name].wait(name)

    def result(self) -> dict[str, Any]:
        arrays: dict[str, Any] = {}
        error: BaseException | None = None
        for part in self._parts:
            try:
                arrays.update(part.result())
            except BaseException as exc:  # noqa: B036 - the others are still waited for, then it is raised
                error = error or exc
        if error is not None:
            raise error
        return {name: arrays[name] for name in self._names}


class StagedRestore:
    """One restore of some tensors of a bundle onto one device (see the module docstring)."""

    def __init__(
        self,
        reader: HostReader,
        device: Device,
        options: RestoreOptions,
        *,
        verify: bool,
        dtype_for: DtypeChooser | None = None,
        out: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        regions: Mapping[str, Region] | None = None,
    ) -> None:
        self.reader = reader
        self.regions = dict(regions or {})
        self.device = device
        self.options = options
        self.verify = verify
        self.dtype_for = dtype_for
        self.out = out or {}
        self.progress = progress
        self._abort = threading.Event()
        self._stretch_buffers = threading.local()  # read_selection's buffer, per reader thread
        self._progress_lock = threading.Lock()
        self._bytes_done = 0
        self._bytes_total = 0
        self._scratch = _Scratch(device)
        self._targets: dict[str, _Target] = {}
        self._pinned: list[np.ndarray] = []
        self._slots: list[_Slot] = []
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._streams: list[Any] = []
        self._work: queue.Queue[ReadGroup | TensorEntry | _Part | _RegionItem | _RegionPart] = queue.Queue()

    # -- planning, before anything is allocated ---------------------------------------------------
    def _target_dtype(self, entry: TensorEntry) -> tuple[np.dtype, str | None]:
        info = DTYPES[entry.dtype]
        stored = info.numpy
        assert stored is not None
        wanted = self.dtype_for(entry.name, stored) if self.dtype_for is not None else stored
        wanted = np.dtype(wanted)
        if wanted == stored:
            return stored, None
        try:
            return wanted, kernel_for(stored, wanted)
        except KeyError:
            raise UnsupportedError(
                f"no device conversion from {stored} to {wanted}: " + describe(self.reader.index.path, entry.name)
            ) from None

    def _check(self, entries: Sequence[TensorEntry]) -> dict[str, tuple[np.dtype, str | None]]:
        plans = {}
        path = self.reader.index.path
        for entry in entries:
            check_readable(self.reader.index, entry)
            info = DTYPES[entry.dtype]
            if info.is_string:
                raise UnsupportedError(
                    "string tensors cannot be held in device memory; restore them with device='cpu': "
                    + describe(path, entry.name)
                )
            dtype, kernel = self._target_dtype(entry)
            dtype = self.device.array_dtype(dtype)  # e.g. float8 arrives as uint8 bytes on CuPy
            if entry.name in self.out:
                given = self.out[entry.name]
                if not self.device.holds(given):
                    raise InvalidArgumentError(
                        f"out[{entry.name!r}] is not an array on {self.device.name}, where this restore puts the "
                        f"tensor ({type(given).__name__}): nothing was written: " + describe(path, entry.name)
                    )
                check_out_array(given, entry, dtype, path, contiguous=True, shape=self._shape(entry))
            plans[entry.name] = (dtype, kernel)
        needed = sum(
            (self._elements(e) * plans[e.name][0].itemsize if e.name not in self.out else 0)
            + (self._stored_bytes(e) if plans[e.name][1] else 0)  # the stored bytes a kernel converts
            + (self._stored_bytes(e) if e.slices else 0)  # the saved slices, held until the restore ends
            for e in entries
        )
        if self.options.single_allocation:
            needed += ARENA_ALIGNMENT * len(entries)  # at most this much padding between pieces
        if self.options.check_free_memory:
            free = self.device.free_bytes()
            if needed > free:
                raise DeviceMemoryError(
                    f"restore needs {needed} bytes of device memory on {self.device.name}, {free} are free: "
                    + describe(path)
                )
        return plans

    # -- regions: a partial one is a work item of its own; a whole one restores as the tensor does,
    # into an array of the region's shape (the copies and kernels see flat bytes) ---------------
    def _shape(self, entry: TensorEntry) -> tuple[int, ...]:
        region = self.regions.get(entry.name)
        return entry.shape if region is None else region.shape

    def _elements(self, entry: TensorEntry) -> int:
        region = self.regions.get(entry.name)
        return entry.num_elements if region is None else region.num_elements

    def _stored_bytes(self, entry: TensorEntry) -> int:
        region = self.regions.get(entry.name)
        return entry.stored_bytes if region is None else region.num_elements * DTYPES[entry.dtype].itemsize

    def _partial(self, entry: TensorEntry) -> Region | None:
        region = self.regions.get(entry.name)
        return None if region is None or region.whole else region

    def _allocate(
        self, entries: Sequence[TensorEntry], plans: dict[str, tuple[np.dtype, str | None]]
    ) -> dict[str, _Target]:
        targets = {}
        swap = self.reader.index.header.big_endian
        arrays = self._new_arrays([e for e in entries if e.name not in self.out], plans)
        for entry in entries:
            dtype, kernel = plans[entry.name]
            info = DTYPES[entry.dtype]
            array = self.out[entry.name] if entry.name in self.out else arrays[entry.name]
            width = info.swap_bytes if swap else 0
            target = targets[entry.name] = _Target(entry, array, None, kernel, width, info.narrow_bits)
            partial = self._partial(entry)
            if entry.slices:  # slices are placed into a whole array (the region's box) of the stored type
                assert info.numpy is not None  # strings were refused in _check
                stored = self.device.array_dtype(info.numpy)
                shape = entry.shape if partial is None else partial.box_shape
                target.full = array.reshape(shape) if kernel is None else self._scratch.new(target, shape, stored)
                target.raw = self.device.byte_view(target.full)
            elif kernel is None:
                target.raw = self.device.byte_view(array)  # the bytes land in their final place
            else:
                target.raw = self._scratch.new(target, (self._stored_bytes(entry),), np.dtype(np.uint8))
        return targets

    def _new_arrays(
        self, entries: Sequence[TensorEntry], plans: dict[str, tuple[np.dtype, str | None]]
    ) -> dict[str, Any]:
        """The destination arrays of ``entries``: one allocation each, or (single_allocation) all
        carved from one, each piece aligned to ARENA_ALIGNMENT bytes."""
        empty, carve = self.device.empty, self.device.carve
        if not self.options.single_allocation:
            return {e.name: self._allocating(e.name, empty, self._shape(e), plans[e.name][0]) for e in entries}
        offsets, total = {}, 0
        for entry in entries:
            offsets[entry.name] = total
            total += -(-self._elements(entry) * plans[entry.name][0].itemsize // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        arena = self._allocating(None, empty, (total,), np.dtype(np.uint8))
        return {
            e.name: self._allocating(e.name, carve, arena, offsets[e.name], self._shape(e), plans[e.name][0])
            for e in entries
        }

    def _allocating(self, name: str | None, allocate: Callable[..., Any], *args: Any) -> Any:
        """``allocate(*args)``, its failures named: the tensor (or the restore's one allocation)."""
        try:
            return allocate(*args)
        except UnsupportedError as exc:  # e.g. a float8 type the device arrays cannot hold
            raise UnsupportedError(f"{exc}: " + describe(self.reader.index.path, name)) from None
        except MemoryError as exc:  # the allocator ran out despite the free-memory check
            what = f"tensor {name!r}" if name is not None else "the single allocation of this restore"
            raise DeviceMemoryError(
                f"out of device memory on {self.device.name} allocating {what} ({exc}): "
                + describe(self.reader.index.path, name)
            ) from None

    # -- the copy loop -----------------------------------------------------------------------------
    def _add_progress(self, nbytes: int) -> None:
        if self.progress is not None:
            with self._progress_lock:
                self._bytes_done += nbytes
                self.progress(self._bytes_done, self._bytes_total)

    def _stage(self, group: ReadGroup, targets: dict[str, _Target], free: queue.Queue[_Slot], stream: Any) -> None:
        """Read one group through staging slots and queue its copies (and, for tensors it completes,
        their conversions) on ``stream``."""
        slot_bytes = self.options.staging_slot_bytes
        byte_range = group.byte_range
        for chunk_start in range(0, max(byte_range.length, 1), slot_bytes):
            if self._abort.is_set():
                return
            chunk_end = min(byte_range.length, chunk_start + slot_bytes)
            slot = free.get()
            try:
                slot.wait_until_free()
                length = chunk_end - chunk_start
                self.reader.shards.read_into(
                    byte_range.shard_id,
                    byte_range.offset + chunk_start,
                    slot.view[:length],
                    group.pieces[0].tensor.name,
                )
                try:
                    for piece in group.pieces:
                        self._copy_piece_part(
                            piece.stored,
                            byte_range.offset + chunk_start,
                            length,
                            slot,
                            targets[piece.tensor.name],
                            stream,
                        )
                finally:
                    # LIFETIME: this event guards the slot until every copy queued from it has run,
                    # recorded even when a checksum fails after some copies were queued.
                    slot.last_copy = self.device.record(stream)
            finally:
                free.put(slot)
            self._add_progress(length)

    def _copy_piece_part(
        self, stored: TensorEntry, chunk_offset: int, length: int, slot: _Slot, target: _Target, stream: Any
    ) -> None:
        """Queue the copy of the part of ``stored`` in this chunk; finish the tensor after its last byte.

        One reader thread handles a whole group in file order, so each tensor's chunks arrive in
        order: the running crc32c is over its bytes in sequence, and its conversion is queued on
        the same stream after its last copy.
        """
        start = max(stored.offset, chunk_offset)
        end = min(stored.offset + stored.size, chunk_offset + length)
        if end > start:
            in_slot = start - chunk_offset
            if self.verify:
                target.crc = crc32c(slot.view[in_slot : in_slot + end - start], target.crc)
            self.device.copy_to_device(target.raw, start - stored.offset, slot.buffer[in_slot:], end - start, stream)
        if end >= stored.offset + stored.size and target.ready is None:
            self._complete(target, stream)

    def _stage_bytes(
        self, stored: TensorEntry, first: int, last: int, dst: Any, free: queue.Queue[_Slot], stream: Any
    ) -> int | None:
        """Bytes [first, last) of one entry through the staging slots into the device buffer ``dst``
        at the same offsets; returns their crc32c (0 without verification), or None if aborted."""
        slot_bytes = self.options.staging_slot_bytes
        crc = 0
        for start in range(first, last, slot_bytes):
            if self._abort.is_set():
                return None
            length = min(slot_bytes, last - start)
            slot = free.get()
            try:
                slot.wait_until_free()
                self.reader.shards.read_into(stored.shard_id, stored.offset + start, slot.view[:length], stored.name)
                if self.verify:
                    crc = crc32c(slot.view[:length], crc)
                self.device.copy_to_device(dst, start, slot.buffer, length, stream)
            finally:
                slot.last_copy = self.device.record(stream)  # LIFETIME: guards the slot's bytes
                free.put(slot)
            self._add_progress(length)
        return crc

    def _stage_part(self, item: _Part, free: queue.Queue[_Slot], stream: Any) -> bool:
        """Stage one part of a large tensor; True when this finished the tensor.

        The thread finishing the last part makes its stream wait for the events recorded after
        the other parts' copies, so the conversion it queues runs after every byte has landed.
        """
        parts, target = item.parts, item.parts.target
        entry = target.entry
        first, last = parts.bounds[item.index]
        crc = self._stage_bytes(entry, first, last, target.raw, free, stream)
        if crc is None or not parts.done(item.index, crc, self.device.record(stream)):
            return False
        for event in parts.events:
            if event is not None:
                self.device.wait_event(stream, event)
        target.crc = parts.checksums.combined()
        self._complete(target, stream)
        return True

    def _complete(self, target: _Target, stream: Any) -> None:
        if self.verify and not target.entry.slices:
            self.reader.verify_crc(target.crc, target.entry, target.entry)
        self._fix_bytes(target, target.raw, stream)
        if target.kernel is not None:
            self.device.convert(target.kernel, target.raw, target.array, stream)
        target.ready = self.device.record(stream)

    def _fix_bytes(self, target: _Target, raw: Any, stream: Any) -> None:
        """Queue what makes stored bytes the host path's bytes (``fix_in_place`` on the device):
        the byte swap of a big-endian bundle, the clearing of the 4- and 2-bit types' high bits."""
        if target.swap_width:
            self.device.byteswap(target.swap_width, raw, stream)
        if target.narrow_bits:
            self.device.clear_high_bits(raw, target.narrow_bits, stream)

    def run(self, entries: Sequence[TensorEntry], future: RestoreFuture, *, background: bool = False) -> None:
        """Restore ``entries``: the checks, every allocation and the streams on the calling
        thread, then the copy loop (on a thread of its own when ``background``); every error is
        reported through ``future``."""
        try:
            self._start(entries)
        except BaseException as exc:  # noqa: B036 - reported through the future, re-raised by result()
            self._finish(future, exc)
            return
        if background:
            threading.Thread(target=self._copy_all, args=(future,), name="gpuckpt-restore", daemon=True).start()
        else:
            self._copy_all(future)

    def _start(self, entries: Sequence[TensorEntry]) -> None:
        """On the caller's thread, so that the device memory comes from the pool arena of the
        caller's current stream, and the copy streams are ordered after the work the caller
        queued on that stream (a ``cupy.zeros`` filling an ``out=`` array, the last use of a block
        the pool hands out again): they wait for an event recorded on it."""
        plans = self._check(entries)
        self._targets = self._allocate(entries, plans)
        regioned = [e for e in entries if self._partial(e) is not None]
        partitioned = [e for e in entries if e.slices and self._partial(e) is None]
        plain = [e for e in entries if not e.slices and self._partial(e) is None]
        slot_bytes = self.options.staging_slot_bytes
        groups = plan_reads(
            [p for e in plain for p in pieces_of(self.reader.index, e)],
            PlanOptions(coalesce_below_bytes=slot_bytes // 4, max_gap_bytes=64 << 10, max_group_bytes=slot_bytes),
        )
        self._bytes_total = sum(g.byte_range.length for g in groups)
        self._bytes_total += sum(self.reader.index.slice_entry(e, s).size for e in partitioned for s in e.slices)
        self._bytes_total += sum(self._stored_bytes(e) for e in regioned)
        for _ in range(self.options.staging_slots):
            self._pinned.append(self.device.pinned(slot_bytes))
            self._slots.append(_Slot(self._pinned[-1]))
            self._free.put(self._slots[-1])
        callers_work = self.device.record_current()
        for _ in range(self.options.copy_streams):
            self._streams.append(self.device.new_stream())
            if callers_work is not None:
                self.device.wait_event(self._streams[-1], callers_work)
        for entry in partitioned:  # each partitioned tensor is one work item, on one stream
            self._work.put(entry)
        split = self.options.staging_slot_bytes * PART_SLOTS
        for entry in regioned:  # each partial region one work item; a large one, parts for several threads
            region = self.regions[entry.name]
            itemsize = DTYPES[entry.dtype].itemsize
            if entry.slices or self._stored_bytes(entry) <= 2 * split:
                self._work.put(_RegionItem(self._targets[entry.name], region))
                continue
            cuts: list[list[_Piece]] = [[]]
            for piece in sub_selections(region.selection, itemsize, slot_bytes):
                if cuts[-1] and (piece[0] + piece[2] - cuts[-1][0][0]) * itemsize > split:
                    cuts.append([])
                cuts[-1].append(piece)
            bounds = [(c[0][0] * itemsize, (c[-1][0] + c[-1][2]) * itemsize) for c in cuts]
            parts = _Parts(self._targets[entry.name], bounds)
            for index, pieces in enumerate(cuts):
                self._work.put(_RegionPart(parts, index, tuple(pieces)))
        for group in groups:
            size = group.byte_range.length
            if len(group.pieces) == 1 and size > 2 * split:  # a large tensor: parts for several threads
                bounds = [(start, min(size, start + split)) for start in range(0, size, split)]
                parts = _Parts(self._targets[group.pieces[0].tensor.name], bounds)
                for index in range(len(bounds)):
                    self._work.put(_Part(parts, index))
            else:
                self._work.put(group)

    def _copy_all(self, future: RestoreFuture) -> None:
        """The reader threads, each taking work items until none is left; then :meth:`_finish`."""
        targets, free, work = self._targets, self._free, self._work

        def reader_thread(index: int) -> None:
            stream = self._streams[index % len(self._streams)]
            while not self._abort.is_set():
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                if isinstance(item, TensorEntry):
                    target = targets[item.name]
                    self._stage_partitioned(target, free, stream)
                    future._arrive(item.name, target.array, target.ready)
                    continue
                if isinstance(item, _RegionItem):
                    self._stage_region(item.target, item.region, free, stream)
                    future._arrive(item.target.entry.name, item.target.array, item.target.ready)
                    continue
                if isinstance(item, _RegionPart):
                    if self._stage_region_part(item, free, stream):
                        target = item.parts.target
                        future._arrive(target.entry.name, target.array, target.ready)
                    continue
                if isinstance(item, _Part):
                    if self._stage_part(item, free, stream):
                        target = item.parts.target
                        future._arrive(target.entry.name, target.array, target.ready)
                    continue
                self._stage(item, targets, free, stream)
                for piece in item.pieces:
                    target = targets[piece.tensor.name]
                    if target.ready is not None:
                        future._arrive(piece.tensor.name, target.array, target.ready)

        error: BaseException | None = None
        try:
            with concurrent.futures.ThreadPoolExecutor(
                self.options.io_threads, thread_name_prefix="gpuckpt-stage"
            ) as pool:
                running = [pool.submit(reader_thread, i) for i in range(self.options.io_threads)]
                try:
                    for f in concurrent.futures.as_completed(running):
                        f.result()
                except BaseException:
                    self._abort.set()
                    raise
        except BaseException as exc:  # noqa: B036 - reported through the future, re-raised by result()
            error = exc
        self._finish(future, error)

    def _finish(self, future: RestoreFuture, error: BaseException | None) -> None:
        """Release what the restore holds, in an order that frees nothing a queued copy or kernel
        still uses, then finish ``future``."""
        fault: BaseException | None = None
        try:
            if error is not None:
                self._abort.set()
                for stream in self._streams:  # let queued work finish before its memory is let go
                    _quietly(functools.partial(self._drain, stream))
            fault = self._scratch.release()
            # The future holds the arrays of a restore that succeeded; those of a failed one go
            # back to the allocator here.
            self._targets.clear()
            for slot in self._slots:  # no copy may still be reading a buffer about to be released
                fault = _quietly(slot.wait_until_free) or fault
                slot.last_copy = None
            for buffer in self._pinned:
                self.device.release_pinned(buffer)
            for stream in self._streams:
                self.device.close_stream(stream)
        except BaseException as exc:  # noqa: B036 - the future must finish whatever happens here
            fault = fault or exc
        # Finished only now, so whoever waits on the future finds every buffer released; a
        # device fault in queued work means the results cannot be trusted.
        future._finish(error if error is not None else fault)

    def _drain(self, stream: Any) -> None:
        """Wait for everything queued on ``stream`` so far."""
        self.device.record(stream).synchronize()

    def _stage_partitioned(self, target: _Target, free: queue.Queue[_Slot], stream: Any) -> None:
        """Each saved slice through the staging slots into a device buffer of its own, checked,
        byte-swapped if need be, then placed into its region of the whole tensor on the device.
        All on one stream, so the conversion queued last runs after every placement."""
        entry = target.entry
        for tensor_slice in entry.slices:
            part = self.reader.index.slice_entry(entry, tensor_slice)
            buffer = self._scratch.new(target, (part.size,), np.dtype(np.uint8))
            crc = self._stage_bytes(part, 0, part.size, buffer, free, stream)
            if crc is None:
                return
            if self.verify:
                self.reader.verify_crc(crc, part, entry)
            self._fix_bytes(target, buffer, stream)
            region = tuple(e.bounds(d) for e, d in zip(tensor_slice, entry.shape, strict=True))
            self.device.place(target.full, region, buffer, part.shape, stream)
        if target.kernel is not None:
            self.device.convert(target.kernel, target.raw, target.array, stream)
        target.ready = self.device.record(stream)

    def _stage_pieces(
        self,
        stored: TensorEntry,
        itemsize: int,
        pieces: Iterable[_Piece],
        dst: Any,
        free: queue.Queue[_Slot],
        stream: Any,
    ) -> bool:
        """Sub-regions of one stored entry (each at most a slot's worth of the region's result)
        through the staging slots into the device buffer ``dst``, in their places of the result:
        each read into a slot by the host's region reader (:func:`gpuckpt.host.lazy_slice.read_selection`:
        at most a page beyond the region between two of its runs), then one copy. Unchecked: no
        crc32c covers part of an entry. False if aborted."""
        word = np.dtype(f"V{itemsize}")  # the stored bytes of one element, whatever its type
        scratch = getattr(self._stretch_buffers, "buffer", None)
        if scratch is None:  # one host buffer per reader thread for the stretches it reads
            scratch = self._stretch_buffers.buffer = new_scratch()
        for first, selection, count in pieces:
            if self._abort.is_set():
                return False
            length = count * itemsize
            slot = free.get()
            try:
                slot.wait_until_free()
                box = slot.buffer[:length].view(word).reshape([len(s) for s in selection])
                read_selection(self.reader.shards, stored, selection, box, REGION_GAP_BYTES, scratch)
                self.device.copy_to_device(dst, first * itemsize, slot.buffer, length, stream)
            finally:
                slot.last_copy = self.device.record(stream)  # LIFETIME: guards the slot's bytes
                free.put(slot)
            self._add_progress(length)
        self.reader.shards.check_not_shrunk(stored.shard_id, stored.name)  # a truncation racing the reads
        return True

    def _stage_selection(
        self,
        stored: TensorEntry,
        itemsize: int,
        selection: tuple[range, ...],
        dst: Any,
        free: queue.Queue[_Slot],
        stream: Any,
    ) -> bool:
        """The region ``selection`` of one stored entry into the device buffer ``dst``, a slot's
        worth of its result at a time (:meth:`_stage_pieces`)."""
        pieces = sub_selections(selection, itemsize, self.options.staging_slot_bytes)
        return self._stage_pieces(stored, itemsize, pieces, dst, free, stream)

    def _stage_region_part(self, item: _RegionPart, free: queue.Queue[_Slot], stream: Any) -> bool:
        """Stage one part of a large region of an unpartitioned tensor; True when this finished
        it (then, after every part's copies, the fix-ups and conversion, as :meth:`_stage_part`)."""
        parts, target = item.parts, item.parts.target
        itemsize = DTYPES[target.entry.dtype].itemsize
        if not self._stage_pieces(target.entry, itemsize, item.pieces, target.raw, free, stream):
            return False
        if not parts.done(item.index, 0, self.device.record(stream)):
            return False
        for event in parts.events:
            if event is not None:
                self.device.wait_event(stream, event)
        self._fix_bytes(target, target.raw, stream)
        if target.kernel is not None:
            self.device.convert(target.kernel, target.raw, target.array, stream)
        target.ready = self.device.record(stream)
        return True

    def _stage_region(self, target: _Target, region: Region, free: queue.Queue[_Slot], stream: Any) -> None:
        """A region of one tensor onto the device: an unpartitioned tensor's runs packed into
        ``raw``; for a partitioned one, each saved slice it meets: one it holds whole is staged
        whole and checked (straight into ``raw`` when the region is exactly that slice), of the
        others only the runs, each part placed into its box of ``full``. Then the fix-ups and the
        conversion on the device, as for a whole tensor."""
        entry = target.entry
        itemsize = DTYPES[entry.dtype].itemsize
        if region.num_elements == 0:
            target.ready = self.device.record(stream)
            return
        if not entry.slices:
            if not self._stage_selection(entry, itemsize, region.selection, target.raw, free, stream):
                return
            self._fix_bytes(target, target.raw, stream)
        for tensor_slice in entry.slices:
            bounds = tuple(e.bounds(d) for e, d in zip(tensor_slice, entry.shape, strict=True))
            meet = intersect(region.selection, bounds)
            if meet is None:
                continue
            positions, within = meet
            part = self.reader.index.slice_entry(entry, tensor_slice)
            shape = tuple(len(w) for w in within)
            whole = all(is_full(w, stop - start) for w, (start, stop) in zip(within, bounds, strict=True))
            exact = whole and shape == region.box_shape
            buffer = (
                target.raw if exact else self._scratch.new(target, (math.prod(shape) * itemsize,), np.dtype(np.uint8))
            )
            if whole:  # the saved slice read whole, and checked
                crc = self._stage_bytes(part, 0, part.size, buffer, free, stream)
                if crc is None:
                    return
                if self.verify:
                    self.reader.verify_crc(crc, part, entry)
            elif not self._stage_selection(part._replace(name=entry.name), itemsize, within, buffer, free, stream):
                return
            self._fix_bytes(target, buffer, stream)
            if not exact:
                box = tuple((p.start, p.stop) for p in positions)
                self.device.place(target.full, box, buffer, shape, stream)
        if target.kernel is not None:
            self.device.convert(target.kernel, target.raw, target.array, stream)
        target.ready = self.device.record(stream)


def _quietly(step: Callable[[], None]) -> BaseException | None:
    """Run a cleanup step, returning (not raising) its error, so every later step still runs."""
    try:
        step()
    except BaseException as exc:  # noqa: B036 - collected and reported by the caller
        return exc
    return None


def restore_to_device(
    reader: HostReader,
    device: Device,
    entries: Sequence[TensorEntry],
    options: RestoreOptions,
    *,
    verify: bool = True,
    dtype_for: DtypeChooser | None = None,
    out: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    wait: bool = True,
    regions: Mapping[str, Region] | None = None,
) -> RestoreFuture:
    """Start (and by default finish) restoring ``entries`` (or the ``regions`` of some of them)
    onto ``device``; returns the future."""
    future = RestoreFuture([e.name for e in entries])
    restore = StagedRestore(
        reader, device, options, verify=verify, dtype_for=dtype_for, out=out, progress=progress, regions=regions
    )
    restore.run(entries, future, background=not wait)
    return future

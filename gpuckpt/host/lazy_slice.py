"""Reading regions of stored tensors on the host: ``get_slice(name)[...]`` and ``restore(regions=)``.

One reader serves both (:func:`read_selection`): a region is read as stretches of stored bytes
(:func:`gpuckpt.regions.plan_stretches`), either its contiguous runs straight into place or,
where runs would be many and short, longer stretches along an outer axis read through one reused
buffer and the region picked out with basic slicing; a cost model chooses the axis. The two
callers differ only in what a stretch may read beyond the region: ``get_slice`` anything
(fastest from a warm page cache), ``restore(regions=)`` at most a page between two runs (a
sharded restore reads only its share). Everything is read with ``preadv``, never through a
mapping: a data file that shrinks underneath gives a short read (a :class:`FormatError`) instead
of a SIGBUS that would kill the process. Partitioned tensors gather from each saved slice that
meets the region; a saved slice the region holds whole is read whole and checked. Partial reads
cannot be checked against the tensor's crc32c (it covers the whole tensor).

The device pipeline stages a region through its pinned slots with the same reader, a slot's worth
of the result at a time (:func:`gpuckpt.regions.sub_selections`).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry
from ..format.crc import crc32c
from ..format.slices import TensorSlice
from ..regions import (
    REGION_GAP_BYTES,
    Region,
    cover_problem,
    intersect,
    is_full,
    plan_stretches,
    region_of,
    stretch_offsets,
    sub_selections,
)
from .convert import check_conversion, fix_in_place, reference_convert
from .reader import CHUNK_BYTES, HostReader, check_dtype, check_readable
from .shards import ShardFiles

# One more read call costs about as much as reading this many more bytes from the page cache
# (~1.5 us per preadv against ~10 GB/s): the break-even between many small runs and one span.
READ_CALL_COST_BYTES = 16 << 10
SPAN_READ_BYTES = 4 << 20  # a span is read in pieces this big, through one buffer
_OFFSETS_AT_ONCE = 1 << 16


def new_scratch() -> np.ndarray:
    """A buffer :func:`read_selection` can read stretches into, to reuse across calls."""
    return np.empty(SPAN_READ_BYTES, np.uint8)


def read_selection(
    shards: ShardFiles,
    entry: TensorEntry,
    selection: tuple[range, ...],
    box: np.ndarray,
    gap_bytes: int | None,
    scratch: np.ndarray | None = None,
) -> None:
    """The stored values of the region ``selection`` of one entry into ``box`` (C-contiguous, the
    region's box shape, the stored dtype), as :func:`gpuckpt.regions.plan_stretches` plans with
    ``gap_bytes``: the runs straight into place, or stretches read a buffer at a time (pieces of
    whole indices where one stretch is longer than the buffer) and the region picked out. The
    buffer is ``scratch`` (:func:`new_scratch`) where given, so a caller reading many regions
    faults one in once."""
    if box.size == 0:
        return
    shape, itemsize = entry.shape, box.dtype.itemsize
    plan = plan_stretches(
        shape,
        itemsize,
        selection,
        call_cost_bytes=READ_CALL_COST_BYTES,
        gap_bytes=gap_bytes,
        buffer_bytes=SPAN_READ_BYTES,
    )
    starts = stretch_offsets(shape, itemsize, selection, plan) + entry.offset
    if plan.direct:
        flat = memoryview(box.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for first in range(0, plan.count, _OFFSETS_AT_ONCE):  # not a Python int per run all at once
            where = starts[first : first + _OFFSETS_AT_ONCE].tolist()
            shards.read_runs(entry.shard_id, where, plan.length, flat[first * plan.length :], entry.name)
        return
    axis, rows = plan.axis, plan.rows
    row_bytes = plan.row_bytes(shape, itemsize)
    trailing = shape[axis + 1 :]
    by_stretch = box.reshape(plan.count, *box.shape[axis:])  # a view: box is C-contiguous
    picked = selection[axis]
    if len(rows) * row_bytes <= SPAN_READ_BYTES:  # whole stretches, as many as fit the buffer
        per_read = max(1, min(_OFFSETS_AT_ONCE, SPAN_READ_BYTES // (len(rows) * row_bytes)))
        buffer = _buffer(scratch, (min(per_read, plan.count), len(rows), *trailing), box.dtype)
        flat = memoryview(buffer.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        place = len(rows) * row_bytes
        for first in range(0, plan.count, per_read):
            stop = min(plan.count, first + per_read)
            where = starts[first:stop].tolist()
            shards.read_runs(entry.shard_id, where, plan.length, flat[plan.head :], entry.name, place)
            by_stretch[first:stop] = buffer[: stop - first][(slice(None),) + plan.pick]
        return
    # one stretch in pieces: runs of consecutive picks whose rows fit the buffer
    ascending = picked if picked.step > 0 else picked[::-1]
    per_piece = (SPAN_READ_BYTES // row_bytes - 1) // abs(ascending.step) + 1
    buffer = _buffer(scratch, (min(len(rows), (per_piece - 1) * abs(ascending.step) + 1), *trailing), box.dtype)
    flat = memoryview(buffer.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    under = plan.length - (len(rows) - 1) * row_bytes  # the bytes wanted under one index of the axis
    within = (slice(None, None, abs(ascending.step)), *plan.pick[1:])
    for number in range(plan.count):
        offset = int(starts[number])
        for first in range(0, len(ascending), per_piece):
            picks = ascending[first : first + per_piece]
            span = picks[-1] - picks[0] + 1
            start = offset + (picks[0] - rows[0]) * row_bytes
            length = (span - 1) * row_bytes + under
            shards.read_into(entry.shard_id, start, flat[plan.head : plan.head + length], entry.name)
            values = buffer[:span][within]
            if picked.step > 0 or len(picked) == 1:
                by_stretch[number, first : first + len(picks)] = values
            else:  # the result holds the picks descending
                end = len(picked) - first
                by_stretch[number, end - len(picks) : end] = values[::-1]


def _buffer(scratch: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array of ``shape`` over ``scratch`` where it is big enough, else a new one."""
    size = math.prod(shape) * dtype.itemsize
    if scratch is None or len(scratch) < size:
        return np.empty(shape, dtype)
    return scratch[:size].view(dtype).reshape(shape)


class LazyTensor:
    """A tensor not read yet: ``shape``, ``dtype``, and ``[...]`` to read part of it."""

    def __init__(self, reader: HostReader, tensor: TensorEntry) -> None:
        check_dtype(reader.index, tensor)
        self._reader = reader
        self._tensor = tensor
        info = tensor.dtype_info
        assert info is not None
        self._info = info
        self.shape = tensor.shape
        self.dtype = np.dtype(object) if info.is_string else info.numpy

    def __repr__(self) -> str:
        return f"LazyTensor({self._tensor.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a scalar tensor")
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        index: BundleIndex = self._reader.index
        tensor = self._tensor
        region = region_of(key, tensor.shape)  # the same keys, and errors, for every dtype
        if self._info.is_string:
            # Strings have variable-length elements: locating one means decoding the lengths anyway.
            picked = self._reader.read([tensor])[tensor.name][key]
            if not isinstance(picked, np.ndarray):  # an element: a 0-d object array of it, as for numbers
                single = np.empty((), dtype=object)
                single[()] = picked
                return single
            return picked.copy()  # owns its memory: not a view of the whole tensor
        if tensor.slices:
            # TF refuses regions the saved slices leave uncovered; checked before allocating the
            # region, whose declared shape the saved data may be far too small to fill
            meets = [
                meet[0]
                for tensor_slice in tensor.slices
                if (meet := intersect(region.selection, _bounds(tensor_slice, tensor.shape))) is not None
            ]
            problem = cover_problem(region.box_shape, meets)
            if problem:
                raise FormatError(
                    f"does not have sufficient slices for the requested region of partitioned tensor ({problem}): "
                    + describe(index.path, tensor.name)
                )
        out = np.empty(region.shape, self._info.numpy)
        read_region_into(self._reader, tensor, region, out, verify=True, gap_bytes=None)
        return out


def _bounds(tensor_slice: TensorSlice, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(e.bounds(d) for e, d in zip(tensor_slice, shape, strict=True))


def read_region_into(
    reader: HostReader,
    tensor: TensorEntry,
    region: Region,
    destination: np.ndarray,
    *,
    verify: bool,
    gap_bytes: int | None = REGION_GAP_BYTES,
) -> bool:
    """The stored values of ``region`` of a fixed-size tensor into ``destination`` (C-contiguous,
    the region's elements in the stored dtype), fixed up (byte order, narrow ints) as a whole read
    is, reading at most ``gap_bytes`` beyond the region between two of its runs (None: whatever
    reads fastest; :func:`read_selection`). Returns whether every byte read was checked against a
    crc32c (a saved slice the region holds whole is read whole and checked; other reads cannot be)."""
    index = reader.index
    info = tensor.dtype_info
    assert info is not None and info.numpy is not None and not info.is_string
    if region.num_elements == 0:
        return True
    shards = reader.shards
    box = destination.reshape(region.box_shape)
    checked = True
    if not tensor.slices:
        read_selection(shards, tensor, region.selection, box, gap_bytes)
        shards.check_not_shrunk(tensor.shard_id, tensor.name)  # no checksum covers a partial read
        checked = False
    else:
        for tensor_slice in tensor.slices:
            bounds = _bounds(tensor_slice, tensor.shape)
            meet = intersect(region.selection, bounds)
            if meet is None:
                continue
            positions, within = meet
            entry = index.slice_entry(tensor, tensor_slice)
            whole = all(is_full(w, stop - start) for w, (start, stop) in zip(within, bounds, strict=True))
            part = box[positions]
            values = part if part.flags.c_contiguous else np.empty(part.shape, info.numpy)
            if whole:  # the saved slice is read whole, and checked
                _read_checked(reader, entry, tensor, memoryview(values.reshape(-1).view(np.uint8)), verify)  # type: ignore[arg-type]
            else:
                checked = False
                named = entry._replace(name=tensor.name)  # errors name the tensor, not the slice's key
                read_selection(shards, named, within, values, gap_bytes)
                shards.check_not_shrunk(entry.shard_id, tensor.name)
            if values is not part:
                part[...] = values
    fix_in_place(destination, info, index.header.big_endian)
    return checked


def restore_region(
    reader: HostReader,
    tensor: TensorEntry,
    region: Region,
    *,
    verify: bool,
    dtype: np.dtype | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``restore(regions=)`` on the host for a region that is not the whole tensor: a new array
    of ``region.shape`` (or ``out``, C-contiguous, of that shape and the restored dtype), in
    ``dtype`` when given. Strings are read whole (their lengths vary) and the region picked out."""
    check_readable(reader.index, tensor)
    info = tensor.dtype_info
    assert info is not None
    if info.is_string:
        whole = reader.read([tensor], verify=verify)[tensor.name]
        picked = whole[region.numpy_index()].reshape(region.shape)
        if out is None:
            return picked.copy()  # owns its memory: not a view of the whole tensor
        out[...] = picked
        return out
    stored = info.numpy
    assert stored is not None
    wanted = stored if dtype is None else np.dtype(dtype)
    kernel = check_conversion(stored, wanted, describe(reader.index.path, tensor.name))
    if kernel is None:
        destination = out if out is not None else np.empty(region.shape, stored)
        read_region_into(reader, tensor, region, destination, verify=verify)
        return destination
    if not tensor.slices:  # converted 1 MiB at a time: no temporary the size of the region
        destination = out if out is not None else np.empty(region.shape, wanted)
        elements = destination.reshape(-1)  # a view: out= arrays are C-contiguous
        stage = np.empty(CHUNK_BYTES // info.itemsize, stored)
        scratch = new_scratch()
        for first, selection, count in sub_selections(region.selection, info.itemsize, CHUNK_BYTES):
            values = stage[:count] if count <= len(stage) else np.empty(count, stored)
            box = values.reshape([len(s) for s in selection])
            read_selection(reader.shards, tensor, selection, box, REGION_GAP_BYTES, scratch)
            fix_in_place(values, info, reader.index.header.big_endian)
            elements[first : first + count] = reference_convert(kernel, values)
        reader.shards.check_not_shrunk(tensor.shard_id, tensor.name)
        return destination
    values = np.empty(region.shape, stored)
    read_region_into(reader, tensor, region, values, verify=verify)
    converted = reference_convert(kernel, values).reshape(region.shape)
    if out is None:
        return converted
    out[...] = converted
    return out


def restore_regions(
    reader: HostReader,
    regions: Sequence[tuple[TensorEntry, Region]],
    *,
    verify: bool,
    threads: int = 1,
    dtypes: Mapping[str, np.dtype] | None = None,
    out: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`restore_region` of each ``(tensor, region)``, by up to ``threads`` threads (the reads
    and copies release the GIL), largest first; ``{name: array}``, or the first error."""
    dtypes, out = dtypes or {}, out or {}

    def one(item: tuple[TensorEntry, Region]) -> np.ndarray:
        tensor, region = item
        return restore_region(
            reader, tensor, region, verify=verify, dtype=dtypes.get(tensor.name), out=out.get(tensor.name)
        )

    if threads <= 1 or len(regions) <= 1:
        return {tensor.name: one((tensor, region)) for tensor, region in regions}
    order = sorted(regions, key=lambda item: item[1].num_elements * _itemsize(item[0]), reverse=True)
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(regions)), thread_name_prefix="gpuckpt-region") as pool:
        futures = {item[0].name: pool.submit(one, item) for item in order}
        try:
            return {tensor.name: futures[tensor.name].result() for tensor, _ in regions}
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


def _itemsize(tensor: TensorEntry) -> int:
    info = tensor.dtype_info
    return info.itemsize if info is not None else 0


def _read_checked(reader: HostReader, entry: TensorEntry, tensor: TensorEntry, dst: memoryview, verify: bool) -> None:
    """One stored entry whole into ``dst``, its crc32c checked chunk by chunk when ``verify``."""
    crc = 0
    for start in range(0, entry.size, CHUNK_BYTES):
        chunk = dst[start : min(entry.size, start + CHUNK_BYTES)]
        reader.shards.read_into(entry.shard_id, entry.offset + start, chunk, tensor.name)
        if verify:
            crc = crc32c(chunk, crc)
    if verify:
        reader.verify_crc(crc, entry, tensor)
    else:
        reader.shards.check_not_shrunk(entry.shard_id, tensor.name)


def zero_copy_view(reader: HostReader, tensor: TensorEntry) -> np.ndarray:
    """A read-only array over the mapped file bytes, for tensors whose bytes are their value."""
    check_readable(reader.index, tensor)
    info = tensor.dtype_info
    assert info is not None
    needs_fix = info.narrow_bits or (reader.index.header.big_endian and info.swap_bytes)
    if info.is_string or tensor.slices or needs_fix:
        why = "strings" if info.is_string else "partitioned" if tensor.slices else "needs conversion"
        raise UnsupportedError(
            f"a zero-copy view is impossible for this tensor ({why}); read it with copy=True: "
            + describe(reader.index.path, tensor.name)
        )
    mapping = reader.shards.mapping(tensor.shard_id)
    view = np.frombuffer(mapping[tensor.offset : tensor.offset + tensor.size], dtype=info.numpy)
    return view.reshape(tensor.shape)

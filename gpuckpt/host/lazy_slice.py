"""``Checkpoint.get_slice(name)[...]``: index a stored tensor, touching only the bytes needed.

The selected region is read with ``preadv``, never through a mapping: a data file that shrinks
underneath gives a short read (a :class:`FormatError`) instead of a SIGBUS that would kill the process.
Either as contiguous runs (one read each) or, where runs would be many and small, as the span of
whole rows between the first and last selected ones, read in pieces through one buffer and picked
with basic slicing; a rough cost model chooses. Partitioned tensors gather from each
saved slice that intersects the selection. Partial reads cannot be checked against the tensor's
crc32c (it covers the whole tensor); ``get_tensor`` verifies.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry
from ..format.crc import crc32c
from ..format.slices import TensorSlice
from ..regions import (
    GROUP_READ_BYTES,
    Region,
    Widened,
    as_slice,
    cover_problem,
    intersect,
    is_full,
    read_groups,
    region_of,
    run_layout,
    run_offsets,
    widened_pieces,
)
from .convert import check_conversion, fix_in_place, reference_convert
from .reader import CHUNK_BYTES, HostReader, check_dtype, check_readable
from .shards import ShardFiles

# One more read call costs about as much as reading this many more bytes from the page cache
# (~1.5 us per preadv against ~10 GB/s): the break-even between many small runs and one span.
READ_CALL_COST_BYTES = 16 << 10
SPAN_READ_BYTES = 4 << 20  # a span is read in pieces this big, through one buffer
PICK_LOOP_BYTES = 512  # runs this long are copied out of a shared read one by one, shorter ones gathered


def read_region(
    shards: ShardFiles, entry: TensorEntry, dtype: np.dtype, selection: list[range] | tuple[range, ...]
) -> np.ndarray:
    """The elements ``entry[np.ix_(*selection)]`` as raw stored values, read from the shard.

    The trailing axes selected whole, plus the axis before them where it is an ascending run, are
    contiguous in the file and in the result: one read per combination of the leading indices.
    """
    shape = entry.shape
    out = np.empty(tuple(len(s) for s in selection), dtype)
    if out.size == 0:
        return out
    itemsize = dtype.itemsize
    row_bytes = math.prod(shape[1:]) * itemsize
    block_from, _ = run_layout(shape, selection)
    num_blocks = math.prod(out.shape[:block_from])
    block_bytes = math.prod(out.shape[block_from:]) * itemsize
    read_runs = True
    if shape:  # else a scalar: one run
        rows = selection[0]
        first_row, last_row = min(rows[0], rows[-1]), max(rows[0], rows[-1])
        span_bytes = (last_row - first_row + 1) * row_bytes
        read_runs = num_blocks * (READ_CALL_COST_BYTES + block_bytes) <= READ_CALL_COST_BYTES + span_bytes
    if read_runs:
        offsets, run_bytes = run_offsets(shape, itemsize, selection)
        flat = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        shards.read_runs(entry.shard_id, (offsets + entry.offset).tolist(), run_bytes, flat, entry.name)
        shards.check_not_shrunk(entry.shard_id, entry.name)  # no checksum covers a partial read
        return out
    _read_span(shards, entry, out, selection, row_bytes)
    return out


def _read_span(
    shards: ShardFiles, entry: TensorEntry, out: np.ndarray, selection: list[range] | tuple[range, ...], row_bytes: int
) -> None:
    """Fill ``out`` by reading every row between the first and last selected ones, a few MiB at a
    time into one reused buffer (no page faults on a fresh span-sized one), picking the selection
    out of each piece with basic slicing."""
    rows = selection[0]
    ascending, target = (rows, out) if rows.step > 0 else (rows[::-1], out[::-1])
    rows_per_read = max(1, SPAN_READ_BYTES // row_bytes)
    buffer = np.empty((min(rows_per_read, ascending[-1] - ascending[0] + 1), *entry.shape[1:]), out.dtype)
    flat = memoryview(buffer.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    picks = (slice(None),) + tuple(as_slice(r, 0) for r in selection[1:])  # within a row
    done = 0  # output rows filled
    while done < len(ascending):
        first = ascending[done]
        stop = min(first + len(buffer), ascending[-1] + 1)
        count = -(-(stop - first) // ascending.step)  # selected rows in [first, stop)
        piece = flat[: (stop - first) * row_bytes]
        shards.read_into(entry.shard_id, entry.offset + first * row_bytes, piece, entry.name)
        target[done : done + count] = buffer[0 : stop - first : ascending.step][picks]
        done += count
    shards.check_not_shrunk(entry.shard_id, entry.name)


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

    def _read(self, entry: TensorEntry, selection: tuple[range, ...]) -> np.ndarray:
        assert self._info.numpy is not None  # strings are read whole
        return read_region(self._reader.shards, entry, self._info.numpy, selection)

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
        out: np.ndarray
        if not tensor.slices:
            out = self._read(tensor, region.selection).reshape(region.shape)
        else:
            meets = [
                (tensor_slice, meet)
                for tensor_slice in tensor.slices
                if (meet := intersect(region.selection, _bounds(tensor_slice, tensor.shape))) is not None
            ]
            # TF refuses regions the saved slices leave uncovered; checked before allocating the
            # region, whose declared shape the saved data may be far too small to fill
            problem = cover_problem(region.box_shape, [meet[0] for _, meet in meets])
            if problem:
                raise FormatError(
                    f"does not have sufficient slices for the requested region of partitioned tensor ({problem}): "
                    + describe(index.path, tensor.name)
                )
            out = np.empty(region.shape, self._info.numpy)
            box = out.reshape(region.box_shape)  # a view with the integer axes kept
            for tensor_slice, (target, within) in meets:
                box[target] = self._read(index.slice_entry(tensor, tensor_slice), within)
        fix_in_place(out, self._info, index.header.big_endian)
        return out


def _bounds(tensor_slice: TensorSlice, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(e.bounds(d) for e, d in zip(tensor_slice, shape, strict=True))


def read_window(
    shards: ShardFiles, entry: TensorEntry, offsets: np.ndarray, run_bytes: int, lo: int, hi: int, dst: memoryview
) -> None:
    """Bytes ``[lo, hi)`` of a region's result (runs of ``run_bytes`` at ``offsets`` from the
    entry's first byte, in order: :func:`gpuckpt.regions.run_offsets`) into ``dst``, reading only
    the runs (neighbours close together in one read, :func:`gpuckpt.regions.read_groups`)."""
    base, shard, name = entry.offset, entry.shard_id, entry.name
    pos = lo
    if pos < hi and pos % run_bytes:  # the window starts inside a run
        run, within = divmod(pos, run_bytes)
        count = min(run_bytes - within, hi - pos)
        shards.read_into(shard, base + int(offsets[run]) + within, dst[:count], name)
        pos += count
    first, stop = pos // run_bytes, hi // run_bytes
    if stop > first:
        _read_runs(shards, entry, offsets[first:stop], run_bytes, dst[pos - lo : pos - lo + (stop - first) * run_bytes])
        pos = stop * run_bytes
    if pos < hi:  # and ends inside one
        shards.read_into(shard, base + int(offsets[pos // run_bytes]), dst[pos - lo : hi - lo], name)


def fill_region(
    shards: ShardFiles, entry: TensorEntry, itemsize: int, selection: tuple[range, ...], out: np.ndarray
) -> None:
    """The stored bytes of the region ``selection`` of one entry into ``out`` (uint8, in the
    region's order): its runs; or, where the last axis not taken whole is stepped with picks close
    together, whole stretches of that axis (:func:`gpuckpt.regions.widened_pieces`: at most 1 MiB
    each, a longer one cut in pieces) read 1 MiB at a time through one buffer and picked with a
    strided copy, rather than one run per element."""
    pieces = widened_pieces(entry.shape, itemsize, selection)
    if pieces is None:
        offsets, run_bytes = run_offsets(entry.shape, itemsize, selection)
        read_window(shards, entry, offsets, run_bytes, 0, len(out), memoryview(out))  # type: ignore[arg-type]
        return
    picks = len(selection[pieces[0][1].axis])
    for start, wide in pieces:
        for first, stop, picked in widened_chunks(shards, entry, itemsize, wide, CHUNK_BYTES):
            # the region as (one index of the leading axes, picks, words per pick)
            words = out.view(picked.dtype).reshape(-1, picks, picked.shape[2])
            words[first:stop, start : start + picked.shape[1]] = picked


def widened_chunks(
    shards: ShardFiles, entry: TensorEntry, itemsize: int, wide: Widened, chunk_bytes: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Read a widened region (:class:`gpuckpt.regions.Widened`) a chunk of stretches at a time,
    one stretch per index of the leading axes: ``(first, stop, picked)`` for stretches
    ``[first, stop)``, ``picked`` the region's bytes of them as a (stretches, picks, words per
    pick) view of the one reused buffer (valid until the next chunk)."""
    axis = wide.axis
    offsets, run_bytes = run_offsets(entry.shape, itemsize, wide.selection, block_from=axis)
    inner = math.prod(entry.shape[axis + 1 :]) * itemsize  # the bytes of one index of the axis
    unit = math.gcd(inner, 8)  # copied in the widest word an index is made of
    per_chunk = max(1, chunk_bytes // max(run_bytes, 1))
    buffer = np.empty(min(len(offsets), per_chunk) * run_bytes, np.uint8)
    for first in range(0, len(offsets), per_chunk):
        stop = min(len(offsets), first + per_chunk)
        stretches = buffer[: (stop - first) * run_bytes]
        read_window(shards, entry, offsets[first:stop], run_bytes, 0, len(stretches), memoryview(stretches))  # type: ignore[arg-type]
        words = stretches.view(f"u{unit}").reshape(stop - first, run_bytes // inner, inner // unit)
        yield first, stop, words[:, wide.pick, :]


def _read_runs(shards: ShardFiles, entry: TensorEntry, offsets: np.ndarray, run_bytes: int, dst: memoryview) -> None:
    """Whole runs, in order, into ``dst``: a group of one run read straight into its place (a
    stretch of them in one tight loop), a shared group's span into a buffer and its runs picked out."""
    bounds = read_groups(offsets, run_bytes)
    sizes = np.diff(bounds)
    singles = sizes == 1
    buffer = np.empty(0, np.uint8)  # one for every shared read (a fresh one would be faulted in each time)
    group = 0
    while group < len(sizes):
        first = int(bounds[group])
        if singles[group]:
            last = group
            while last + 1 < len(sizes) and singles[last + 1]:
                last += 1
            stop = int(bounds[last + 1])
            where = (offsets[first:stop] + entry.offset).tolist()
            shards.read_runs(entry.shard_id, where, run_bytes, dst[first * run_bytes : stop * run_bytes], entry.name)
            group = last + 1
            continue
        stop = int(bounds[group + 1])
        runs = offsets[first:stop]
        low, high = int(runs.min()), int(runs.max()) + run_bytes
        if len(buffer) < high - low:
            buffer = np.empty(max(high - low, GROUP_READ_BYTES + run_bytes), np.uint8)
        span = buffer[: high - low]
        shards.read_into(entry.shard_id, entry.offset + low, memoryview(span), entry.name)  # type: ignore[arg-type]
        target = np.frombuffer(dst[first * run_bytes : stop * run_bytes], np.uint8)
        step = int(runs[1] - runs[0])
        if (np.diff(runs) == step).all():  # evenly spaced (along one axis): one strided copy
            unit = math.gcd(run_bytes, 8, abs(step))
            ascending = np.lib.stride_tricks.as_strided(
                span.view(f"u{unit}"), (len(runs), run_bytes // unit), (abs(step), unit), writeable=False
            )
            target.view(f"u{unit}").reshape(len(runs), -1)[...] = ascending if step > 0 else ascending[::-1]
        elif run_bytes >= PICK_LOOP_BYTES:  # few, long runs: one copy each
            for number, start in enumerate((runs - low).tolist()):
                target[number * run_bytes : (number + 1) * run_bytes] = span[start : start + run_bytes]
        else:  # many short ones: one gather, in the widest word every run is made of
            unit = math.gcd(run_bytes, 8, int(np.gcd.reduce(runs - low)))
            picks = ((runs - low) // unit)[:, None] + np.arange(run_bytes // unit)
            target.view(f"u{unit}")[...] = span.view(f"u{unit}")[picks.reshape(-1)]
        group += 1


def read_region_into(
    reader: HostReader, tensor: TensorEntry, region: Region, destination: np.ndarray, *, verify: bool
) -> bool:
    """The stored values of ``region`` of a fixed-size tensor into ``destination`` (C-contiguous,
    the region's elements in the stored dtype), fixed up (byte order, narrow ints) as a whole read
    is; reads only the bytes the region needs. Returns whether every byte read was checked
    against a crc32c (a saved slice the region holds whole is read whole and checked; other
    reads cannot be)."""
    index = reader.index
    info = tensor.dtype_info
    assert info is not None and info.numpy is not None and not info.is_string
    if region.num_elements == 0:
        return True
    shards = reader.shards
    checked = True
    if not tensor.slices:
        fill_region(shards, tensor, info.itemsize, region.selection, destination.reshape(-1).view(np.uint8))
        shards.check_not_shrunk(tensor.shard_id, tensor.name)  # no checksum covers a partial read
        checked = False
    else:
        box = destination.reshape(region.box_shape)
        for tensor_slice in tensor.slices:
            bounds = _bounds(tensor_slice, tensor.shape)
            meet = intersect(region.selection, bounds)
            if meet is None:
                continue
            positions, within = meet
            entry = index.slice_entry(tensor, tensor_slice)
            whole = all(is_full(w, stop - start) for w, (start, stop) in zip(within, bounds, strict=True))
            if whole:  # the saved slice is read whole, and checked
                part = box[positions]
                if part.flags.c_contiguous:
                    _read_checked(reader, entry, tensor, memoryview(part.reshape(-1).view(np.uint8)), verify)  # type: ignore[arg-type]
                else:
                    values = np.empty(entry.shape, info.numpy)
                    _read_checked(reader, entry, tensor, memoryview(values.reshape(-1).view(np.uint8)), verify)  # type: ignore[arg-type]
                    box[positions] = values
                continue
            checked = False
            values = np.empty(tuple(len(w) for w in within), info.numpy)
            named = entry._replace(name=tensor.name)  # errors name the tensor, not the slice's key
            fill_region(shards, named, info.itemsize, within, values.reshape(-1).view(np.uint8))
            shards.check_not_shrunk(entry.shard_id, tensor.name)
            box[positions] = values
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
    if not tensor.slices and widened_pieces(tensor.shape, info.itemsize, region.selection) is None:
        # converted 1 MiB at a time: no temporary the size of the region
        destination = out if out is not None else np.empty(region.shape, wanted)
        elements = destination.reshape(-1)  # a view: out= arrays are C-contiguous
        offsets, run_bytes = run_offsets(tensor.shape, info.itemsize, region.selection)
        total = len(offsets) * run_bytes
        stage = np.empty(min(total, CHUNK_BYTES), np.uint8)
        for start in range(0, total, CHUNK_BYTES):  # CHUNK_BYTES is a multiple of every itemsize
            end = min(total, start + CHUNK_BYTES)
            read_window(reader.shards, tensor, offsets, run_bytes, start, end, memoryview(stage[: end - start]))  # type: ignore[arg-type]
            values = stage[: end - start].view(stored)
            fix_in_place(values, info, reader.index.header.big_endian)
            first = start // info.itemsize
            elements[first : first + values.size] = reference_convert(kernel, values)
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

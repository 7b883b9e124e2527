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

import math
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry
from .convert import fix_in_place
from .reader import HostReader, check_dtype, check_readable
from .shards import ShardFiles

# One more read call costs about as much as reading this many more bytes from the page cache
# (~1.5 us per preadv against ~10 GB/s): the break-even between many small runs and one span.
READ_CALL_COST_BYTES = 16 << 10
SPAN_READ_BYTES = 4 << 20  # a span is read in pieces this big, through one buffer


def _normalize(key: object, shape: tuple[int, ...]) -> tuple[list[range], list[int]]:
    """The indices selected along each axis by a basic-indexing ``key`` (as ranges: nothing the
    size of a whole axis is built), and the axes given as integers."""
    items = key if isinstance(key, tuple) else (key,)
    ellipses = [at for at, k in enumerate(items) if k is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        at = ellipses[0]
        items = items[:at] + (slice(None),) * (len(shape) - len(items) + 1) + items[at + 1 :]
    if len(items) > len(shape):
        raise IndexError(f"too many indices: tensor has rank {len(shape)}, {len(items)} were given")
    items = items + (slice(None),) * (len(shape) - len(items))
    selection, int_axes = [], []
    for axis, (item, dim) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            selection.append(range(*item.indices(dim)))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -dim <= item < dim:
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {dim}")
            selection.append(range(item % dim, item % dim + 1))
            int_axes.append(axis)
        else:
            raise IndexError(f"get_slice supports integers, slices and '...', not {type(item).__name__}")
    return selection, int_axes


def _is_run(selected: range) -> bool:
    """Ascending and contiguous: one run of the axis."""
    return len(selected) <= 1 or selected.step == 1


def _is_full(selected: range, dim: int) -> bool:
    return len(selected) == dim and _is_run(selected) and (dim == 0 or selected[0] == 0)


def _as_slice(selected: range, shift: int) -> slice:
    """The slice picking ``selected`` from an axis that starts at index ``shift``."""
    first = selected[0] - shift
    stop = selected[-1] - shift + (1 if selected.step > 0 else -1)
    return slice(first, stop if stop >= 0 else None, selected.step)


def read_region(shards: ShardFiles, entry: TensorEntry, dtype: np.dtype, selection: list[range]) -> np.ndarray:
    """The elements ``entry[np.ix_(*selection)]`` as raw stored values, read from the shard.

    The trailing axes selected whole, plus the axis before them where it is an ascending run, are
    contiguous in the file and in the result: one read per combination of the leading indices.
    """
    shape = entry.shape
    out = np.empty(tuple(len(s) for s in selection), dtype)
    if out.size == 0:
        return out
    itemsize = dtype.itemsize
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]  # in elements
    whole_from = len(shape)
    while whole_from > 0 and _is_full(selection[whole_from - 1], shape[whole_from - 1]):
        whole_from -= 1
    block_from = whole_from - 1 if whole_from > 0 and _is_run(selection[whole_from - 1]) else whole_from
    num_blocks = math.prod(out.shape[:block_from])
    block_bytes = math.prod(out.shape[block_from:]) * itemsize
    read_runs = True
    if shape:  # else a scalar: one run
        rows = selection[0]
        first_row, last_row = min(rows[0], rows[-1]), max(rows[0], rows[-1])
        span_bytes = (last_row - first_row + 1) * strides[0] * itemsize
        read_runs = num_blocks * (READ_CALL_COST_BYTES + block_bytes) <= READ_CALL_COST_BYTES + span_bytes
    if read_runs:
        starts = np.zeros((), np.int64)
        for axis in range(block_from):
            indices = np.arange(selection[axis].start, selection[axis].stop, selection[axis].step, dtype=np.int64)
            starts = np.add.outer(starts, indices * strides[axis])
        start_in_block = selection[block_from][0] * strides[block_from] if block_from < whole_from else 0
        offsets = ((starts.reshape(-1) + start_in_block) * itemsize + entry.offset).tolist()
        flat = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        shards.read_runs(entry.shard_id, offsets, block_bytes, flat, entry.name)
        shards.check_not_shrunk(entry.shard_id, entry.name)  # no checksum covers a partial read
        return out
    _read_span(shards, entry, out, selection, strides[0] * itemsize)
    return out


def _read_span(shards: ShardFiles, entry: TensorEntry, out: np.ndarray, selection: list[range], row_bytes: int) -> None:
    """Fill ``out`` by reading every row between the first and last selected ones, a few MiB at a
    time into one reused buffer (no page faults on a fresh span-sized one), picking the selection
    out of each piece with basic slicing."""
    rows = selection[0]
    ascending, target = (rows, out) if rows.step > 0 else (rows[::-1], out[::-1])
    rows_per_read = max(1, SPAN_READ_BYTES // row_bytes)
    buffer = np.empty((min(rows_per_read, ascending[-1] - ascending[0] + 1), *entry.shape[1:]), out.dtype)
    flat = memoryview(buffer.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    picks = (slice(None),) + tuple(_as_slice(r, 0) for r in selection[1:])  # within a row
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

    def _read(self, entry: TensorEntry, selection: list[range]) -> np.ndarray:
        assert self._info.numpy is not None  # strings are read whole
        return read_region(self._reader.shards, entry, self._info.numpy, selection)

    def __getitem__(self, key: Any) -> np.ndarray:
        index: BundleIndex = self._reader.index
        tensor = self._tensor
        selection, int_axes = _normalize(key, tensor.shape)  # the same keys, and errors, for every dtype
        if self._info.is_string:
            # Strings have variable-length elements: locating one means decoding the lengths anyway.
            picked = self._reader.read([tensor])[tensor.name][key]
            if not isinstance(picked, np.ndarray):  # an element: a 0-d object array of it, as for numbers
                single = np.empty((), dtype=object)
                single[()] = picked
                return single
            return picked.copy()  # owns its memory: not a view of the whole tensor
        kept_shape = tuple(len(s) for axis, s in enumerate(selection) if axis not in int_axes)
        out: np.ndarray
        if not tensor.slices:
            out = self._read(tensor, selection).reshape(kept_shape)
        else:
            result = np.empty(kept_shape, self._info.numpy)
            out = result.reshape(tuple(len(s) for s in selection))  # a view with the integer axes kept
            filled = np.zeros(out.shape, dtype=bool)  # TF refuses regions the saved slices leave uncovered
            for tensor_slice in tensor.slices:
                entry = index.slice_entry(tensor, tensor_slice)
                positions, within = [], []
                for extent, dim, wanted in zip(tensor_slice, tensor.shape, selection, strict=True):
                    start, stop = extent.bounds(dim)
                    values = np.arange(wanted.start, wanted.stop, wanted.step)  # as long as the output axis
                    hit = np.nonzero((values >= start) & (values < stop))[0]
                    # The selection is monotonic, so the part of it inside [start, stop) is one stretch.
                    lo, hi = (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)
                    positions.append(slice(lo, hi))
                    inside = wanted[lo:hi]
                    within.append(range(inside.start - start, inside.stop - start, inside.step))
                if all(len(w) for w in within) and out.size:
                    target = tuple(positions)
                    if filled[target].any():
                        raise FormatError("saved slices overlap: " + describe(index.path, tensor.name))
                    out[target] = self._read(entry, within)
                    filled[target] = True
            if not filled.all():
                raise FormatError(
                    "does not have sufficient slices for the requested region of partitioned tensor: "
                    + describe(index.path, tensor.name)
                )
            out = result
        fix_in_place(out, self._info, index.header.big_endian)
        return out


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

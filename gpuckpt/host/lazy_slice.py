"""``Checkpoint.get_slice(name)[...]``: index a stored tensor, touching only the bytes needed.

Unpartitioned tensors are indexed as read-only numpy views over the memory-mapped shard, so only the
pages holding the selected elements are read. Partitioned tensors gather from each saved slice that
intersects the selection. Partial reads cannot be checked against the tensor's crc32c (it covers
the whole tensor); ``get_tensor`` verifies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry
from .convert import fix_in_place
from .reader import HostReader, check_dtype, check_readable


def _normalize(key: object, shape: tuple[int, ...]) -> tuple[list[np.ndarray], list[int]]:
    """Per-axis index arrays for a basic-indexing ``key``, and the axes given as integers."""
    items = key if isinstance(key, tuple) else (key,)
    if sum(1 for k in items if k is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (len(shape) - len(items) + 1) + items[at + 1 :]
    if len(items) > len(shape):
        raise IndexError(f"too many indices: tensor has rank {len(shape)}, {len(items)} were given")
    items = items + (slice(None),) * (len(shape) - len(items))
    arrays, int_axes = [], []
    for axis, (item, dim) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            arrays.append(np.arange(dim, dtype=np.int64)[item])
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -dim <= item < dim:
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {dim}")
            arrays.append(np.array([item % dim], dtype=np.int64))
            int_axes.append(axis)
        else:
            raise IndexError(f"get_slice supports integers, slices and '...', not {type(item).__name__}")
    return arrays, int_axes


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

    def _view(self, entry: TensorEntry) -> np.ndarray:
        mapping = self._reader.shards.mapping(entry.shard_id)
        raw = mapping[entry.offset : entry.offset + entry.size]
        return np.frombuffer(raw, dtype=self._info.numpy).reshape(entry.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        index: BundleIndex = self._reader.index
        tensor = self._tensor
        if self._info.is_string:
            # Strings have variable-length elements: locating one means decoding the lengths anyway.
            return np.array(self._reader.read([tensor])[tensor.name][key], copy=True)
        if not tensor.slices:
            out = np.array(self._view(tensor)[key], copy=True)
        else:
            arrays, int_axes = _normalize(key, tensor.shape)
            result = np.empty(tuple(len(a) for i, a in enumerate(arrays) if i not in int_axes), self._info.numpy)
            out = result.reshape(tuple(len(a) for a in arrays))  # a view with the integer axes kept
            filled = np.zeros(out.shape, dtype=bool)  # TF refuses regions the saved slices leave uncovered
            for tensor_slice in tensor.slices:
                entry = index.slice_entry(tensor, tensor_slice)
                positions, within = [], []
                for extent, dim, wanted in zip(tensor_slice, tensor.shape, arrays, strict=True):
                    start, stop = extent.bounds(dim)
                    hit = np.nonzero((wanted >= start) & (wanted < stop))[0]
                    positions.append(hit)
                    within.append(wanted[hit] - start)
                if all(len(p) for p in positions) and out.size:
                    target = np.ix_(*positions)
                    if filled[target].any():
                        raise FormatError("saved slices overlap: " + describe(index.path, tensor.name))
                    out[target] = self._view(entry)[np.ix_(*within)]
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

"""Partitioned tensors: slice extents, slice keys and coverage (FORMAT.md 3.6, 5).

A saved slice is a tuple of :class:`Extent`, one per dimension of the full tensor. Its data lives
under the key :func:`slice_key` builds with TF's OrderedCode encoding.
"""

from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """One dimension of a slice: ``length is None`` means the whole dimension (TF's "full" extent).

    An explicit ``(0, dim)`` extent is *not* full: it encodes differently in the slice key.
    """

    start: int
    length: int | None

    def bounds(self, dim: int) -> tuple[int, int]:
        """``[start, stop)`` of this extent within a dimension of size ``dim``."""
        if self.length is None:
            return 0, dim
        return self.start, self.start + self.length


TensorSlice = tuple[Extent, ...]


def _num_increasing(value: int) -> bytes:
    """OrderedCode ``WriteNumIncreasing``: a length byte, then the big-endian bytes."""
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return bytes([len(body)]) + body


_SIGNED_HEADERS = {
    2: (0xC0, 0x00),
    3: (0xE0, 0x00),
    4: (0xF0, 0x00),
    5: (0xF8, 0x00),
    6: (0xFC, 0x00),
    7: (0xFE, 0x00),
    8: (0xFF, 0x00),
    9: (0xFF, 0x80),
    10: (0xFF, 0xC0),
}


def _signed_num_increasing(value: int) -> bytes:
    """OrderedCode ``WriteSignedNumIncreasing`` (FORMAT.md 5.2)."""
    x = value if value >= 0 else ~value
    if x < 64:
        return bytes([(0x80 ^ value) & 0xFF])
    n = x.bit_length() // 7 + 1
    raw = bytearray(value.to_bytes(10, "big", signed=True)[-n:])
    first, second = _SIGNED_HEADERS[n]
    raw[0] ^= first
    raw[1] ^= second
    return bytes(raw)


def _ordered_string(name: bytes) -> bytes:
    """OrderedCode ``WriteString``: 0x00 -> 00 ff, 0xff -> ff 00 (one pass), then the 00 01 terminator."""
    if b"\x00" not in name and b"\xff" not in name:
        return name + b"\x00\x01"
    escaped = b"".join(b"\x00\xff" if b == 0 else b"\xff\x00" if b == 0xFF else bytes([b]) for b in name)
    return escaped + b"\x00\x01"


def slice_key(name: bytes, tensor_slice: TensorSlice) -> bytes:
    """TF's ``EncodeTensorNameSlice``: the table key holding one saved slice's data."""
    parts = [b"\x00", _ordered_string(name), _num_increasing(len(tensor_slice))]
    for extent in tensor_slice:
        parts.append(_signed_num_increasing(extent.start if extent.length is not None else 0))
        parts.append(_signed_num_increasing(extent.length if extent.length is not None else -1))
    return b"".join(parts)


def slice_shape(tensor_slice: TensorSlice, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the data stored for one slice of a tensor of ``shape``."""
    return tuple(stop - start for start, stop in (e.bounds(d) for e, d in zip(tensor_slice, shape, strict=True)))


def check_extents(tensor_slice: TensorSlice, shape: tuple[int, ...]) -> str | None:
    """Why a slice does not fit ``shape`` (None when it does)."""
    if len(tensor_slice) != len(shape):
        return f"slice has rank {len(tensor_slice)} but the tensor has rank {len(shape)}"
    for axis, (extent, dim) in enumerate(zip(tensor_slice, shape, strict=True)):
        if extent.length is None:
            continue
        if extent.start < 0 or extent.length <= 0 or extent.start + extent.length > dim:
            return (
                f"slice extent [{extent.start}, {extent.start}+{extent.length}) on axis {axis} "
                f"is outside the dimension of size {dim}"
            )
    return None


def _box(tensor_slice: TensorSlice, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [e.bounds(d) for e, d in zip(tensor_slice, shape, strict=True)]


def _volume(box: list[tuple[int, int]]) -> int:
    volume = 1
    for start, stop in box:
        volume *= stop - start
    return volume


_PAIRWISE_LIMIT = 64  # above this many slices, count coverage per element instead of per pair


def coverage_problem(slices: tuple[TensorSlice, ...], shape: tuple[int, ...]) -> str | None:
    """Why ``slices`` do not tile ``shape`` exactly once (None when they do).

    Pairwise disjoint boxes whose volumes add up to the whole tensor cover it exactly; TF refuses
    both overlaps (when registering slices) and gaps ("does not have sufficient slices"). The caller
    has checked each slice's data against the file sizes, so the element count is bounded by them.
    """
    boxes = [_box(s, shape) for s in slices]
    covered = sum(_volume(b) for b in boxes)
    total = _volume([(0, d) for d in shape])
    if covered < total:
        return f"saved slices cover at most {covered} of the tensor's {total} elements"
    if len(boxes) <= _PAIRWISE_LIMIT:
        for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
            if all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b, strict=True)):
                return f"saved slices {i} and {j} overlap"
        return None
    if covered != total:
        return "saved slices overlap"
    import numpy as np  # only for unusually finely partitioned tensors

    counts = np.zeros(shape, dtype=np.uint8)
    for box in boxes:
        region = tuple(slice(start, stop) for start, stop in box)
        if counts[region].any():
            return "saved slices overlap"
        counts[region] = 1
    return None

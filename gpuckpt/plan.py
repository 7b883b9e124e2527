"""The read planner: a pure function from wanted tensors to the byte ranges to read.

Every restore goes through a plan, whatever the backend: pieces (a whole tensor, or one saved slice
of a partitioned one) sorted by shard and offset; small neighbours coalesced into one read; large
pieces read alone, straight into their destination. Backends only execute plans.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import NamedTuple

from .format.bundle import BundleIndex, TensorEntry


@dataclasses.dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` bytes at ``offset`` of data shard ``shard_id``."""

    shard_id: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Piece(NamedTuple):
    """The bytes of ``stored`` (the tensor itself, or one slice of it) destined for ``tensor``.

    ``region`` is the ``[start, stop)`` box of the full tensor it fills; None when it is the whole.
    (A NamedTuple: one is made per tensor read, so construction cost matters.)
    """

    tensor: TensorEntry
    stored: TensorEntry
    region: tuple[tuple[int, int], ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReadGroup:
    """One read: ``byte_range`` covers every piece; a piece starts at ``piece.stored.offset - byte_range.offset``."""

    byte_range: ByteRange
    pieces: tuple[Piece, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PlanOptions:
    """``coalesce_below_bytes``: pieces smaller than this share reads; ``max_gap_bytes``: the most
    unused bytes a shared read may span between two pieces; ``max_group_bytes``: cap on a shared read.

    Pieces from 64 KiB up are read alone, straight into their destination: one ``preadv`` costs
    about 2 us, copying 64 KiB out of a shared buffer about as much again, and into an ``out=``
    array a shared read would be a second pass over those bytes.
    """

    coalesce_below_bytes: int = 64 << 10
    max_gap_bytes: int = 64 << 10
    max_group_bytes: int = 8 << 20


DEFAULT_PLAN = PlanOptions()


def pieces_of(index: BundleIndex, tensor: TensorEntry) -> list[Piece]:
    """The pieces that hold ``tensor``'s data: itself, or each of its saved slices."""
    if not tensor.slices:
        return [Piece(tensor, tensor)]
    return [
        Piece(tensor, index.slice_entry(tensor, s), tuple(e.bounds(d) for e, d in zip(s, tensor.shape, strict=True)))
        for s in tensor.slices
    ]


def plan_reads(pieces: Iterable[Piece], options: PlanOptions = DEFAULT_PLAN) -> list[ReadGroup]:
    """Group pieces into reads: sorted by (shard, offset), small neighbours coalesced.

    Returned largest read first, so a pool of reader threads finishes close together.
    """
    ordered = sorted(pieces, key=lambda p: (p.stored.shard_id, p.stored.offset, p.stored.size))
    groups: list[ReadGroup] = []
    run: list[Piece] = []
    run_shard = run_start = run_end = -1

    for piece in ordered:
        entry = piece.stored
        end = entry.offset + entry.size
        if entry.size >= options.coalesce_below_bytes:
            groups.append(ReadGroup(ByteRange(entry.shard_id, entry.offset, entry.size), (piece,)))
            continue
        if (
            run
            and entry.shard_id == run_shard
            and entry.offset - run_end <= options.max_gap_bytes
            and max(run_end, end) - run_start <= options.max_group_bytes
        ):
            run.append(piece)
            run_end = max(run_end, end)
            continue
        if run:
            groups.append(ReadGroup(ByteRange(run_shard, run_start, run_end - run_start), tuple(run)))
        run, run_shard, run_start, run_end = [piece], entry.shard_id, entry.offset, end
    if run:
        groups.append(ReadGroup(ByteRange(run_shard, run_start, run_end - run_start), tuple(run)))
    groups.sort(key=lambda g: g.byte_range.length, reverse=True)
    return groups


def contiguous_range(shape: tuple[int, ...], region: tuple[tuple[int, int], ...] | None) -> tuple[int, int] | None:
    """The ``[start, stop)`` range of flat (C-order) element indices that the box ``region`` of
    an array of ``shape`` occupies, or None when its elements are not contiguous there.

    A box is contiguous when, past its first dimension of extent over one, every dimension is
    whole: a slice saved along the first axis (TF's usual partitioning) always is, so its bytes
    can be read straight into their place in the full tensor.
    """
    if region is None:
        return 0, math.prod(shape)
    extents = [stop - start for start, stop in region]
    count = math.prod(extents)
    if count == 0:
        return 0, 0
    first = next((d for d, extent in enumerate(extents) if extent > 1), len(shape))
    if any(region[d] != (0, shape[d]) for d in range(first + 1, len(shape))):
        return None
    start = 0
    for (low, _), size in zip(region, shape, strict=True):
        start = start * size + low
    return start, start + count

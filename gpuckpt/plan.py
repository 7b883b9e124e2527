"""The read planner: a pure function from wanted tensors to the byte ranges to read.

Every restore goes through a plan, whatever the backend: pieces (a whole tensor, or one saved slice
of a partitioned one) sorted by shard and offset; small neighbours coalesced into one read; large
pieces read alone, straight into their destination. Backends only execute plans.
"""

from __future__ import annotations

import dataclasses
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
    unused bytes a shared read may span between two pieces; ``max_group_bytes``: cap on a shared read."""

    coalesce_below_bytes: int = 1 << 20
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

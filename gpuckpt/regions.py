"""Regions of a tensor: a basic index normalized against a shape, and the byte runs it needs.

A region is what ``restore(regions={name: index})`` and ``get_slice(name)[index]`` read: any basic
numpy index (integers, slices with steps, ``...``, ``None``) against the tensor's shape. Pure: no
I/O happens here. :func:`region_of` checks the index and gives a :class:`Region` (the indices
selected along each axis, as ranges, and the result's shape, numpy's for that index);
:func:`run_layout` and :func:`run_offsets` give the contiguous runs of stored bytes that hold it, in
the order the result holds them; :func:`plan_stretches` chooses how to read them (the runs, or
longer stretches along an outer axis, a cost model weighing read calls against bytes);
:func:`sub_selections` cuts a region into pieces of its result (a staging slot, a conversion
chunk); :func:`intersect` says what part of a region a saved slice holds.

In C order the trailing axes selected whole, plus the axis before them where it is an ascending
run, are contiguous both in the file and in the result: a region is ``len(offsets)`` runs of
``run_bytes`` bytes each, run ``i`` filling bytes ``[i * run_bytes, (i + 1) * run_bytes)`` of the
result. Runs never overlap (a basic index selects each element at most once).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

# A sharded restore reads two runs in one call only when at most this many unwanted bytes lie
# between them: a page, which the page cache and most storage fetch whole anyway.
REGION_GAP_BYTES = 4 << 10


class RegionError(InvalidArgumentError, IndexError):
    """A region that cannot be read: out of bounds, too many indices, or not a basic index.
    Also an ``IndexError``, as numpy raises for the same index."""


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    """A basic index applied to a tensor of ``tensor_shape``.

    ``selection`` holds the indices selected along each axis of the tensor (a range; an integer
    index is a range of one); ``shape`` is the result's shape, numpy's for the index (integer
    axes dropped, ``None`` axes added).
    """

    tensor_shape: tuple[int, ...]
    selection: tuple[range, ...]
    shape: tuple[int, ...]

    @property
    def box_shape(self) -> tuple[int, ...]:
        """The result's shape with every axis of the tensor kept (integer axes as length 1)."""
        return tuple(len(s) for s in self.selection)

    @property
    def num_elements(self) -> int:
        return math.prod(self.box_shape)

    @property
    def whole(self) -> bool:
        """Every element of the tensor, in order: the region is the tensor (reshaped at most)."""
        return all(is_full(s, d) for s, d in zip(self.selection, self.tensor_shape, strict=True))

    def box(self) -> tuple[tuple[int, int], ...] | None:
        """The ``[start, stop)`` box of the tensor the region is, when every axis is an ascending
        run (a saved slice can then be exactly it); None otherwise."""
        if not all(is_run(s) for s in self.selection) or self.num_elements == 0:
            return None
        return tuple((s[0], s[-1] + 1) for s in self.selection)

    def numpy_index(self) -> tuple[slice, ...]:
        """The index that picks the region's box out of the whole tensor (reshape to ``shape``)."""
        return tuple(as_slice(s, 0) for s in self.selection)


def _fancy(item: object) -> bool:
    """Booleans, sequences and arrays (numpy's, or anything exporting one); numpy's integer
    scalars are integers."""
    if isinstance(item, (bool, np.bool_)):
        return True
    return not isinstance(item, np.integer) and (isinstance(item, (list, np.ndarray)) or hasattr(item, "__array__"))


def region_of(key: Any, shape: tuple[int, ...], where: str = "") -> Region:
    """Normalize the basic index ``key`` against ``shape`` (numpy's rules), or raise
    :class:`RegionError` (ending in ``where``, e.g. ``describe(path, name)``) without reading."""

    def refuse(message: str) -> RegionError:
        return RegionError(message + (f": {where}" if where else ""))

    if isinstance(key, Region):
        if key.tensor_shape != shape:
            raise refuse(f"region of a tensor of shape {key.tensor_shape}, this one has shape {shape}")
        return key
    items = key if isinstance(key, tuple) else (key,)
    ellipses = [at for at, k in enumerate(items) if k is Ellipsis]
    if len(ellipses) > 1:
        raise refuse("an index can only have a single ellipsis ('...')")
    consuming = sum(1 for k in items if k is not None and k is not Ellipsis)
    if consuming > len(shape):
        raise refuse(f"too many indices: tensor has rank {len(shape)}, {consuming} were given")
    if ellipses:
        at = ellipses[0]
        items = items[:at] + (slice(None),) * (len(shape) - consuming) + items[at + 1 :]
    else:
        items = items + (slice(None),) * (len(shape) - consuming)
    selection: list[range] = []
    result: list[int] = []
    axis = 0
    for item in items:
        if item is None:
            result.append(1)
            continue
        dim = shape[axis]
        if isinstance(item, slice):
            try:
                selected = range(*item.indices(dim))
            except (TypeError, ValueError) as exc:
                raise refuse(f"slice {item!r} on axis {axis}: {exc}") from None
            result.append(len(selected))
        elif not _fancy(item) and hasattr(item, "__index__"):
            index = operator.index(item)
            if not -dim <= index < dim:
                raise refuse(f"index {index} is out of bounds for axis {axis} with size {dim}")
            selected = range(index % dim, index % dim + 1)
        else:
            what = type(item).__name__
            raise refuse(
                f"regions are basic indices (integers, slices, '...', None), not {what} "
                "(fancy or boolean indexing reads arbitrary elements: read the tensor and index it)"
            )
        selection.append(selected)
        axis += 1
    return Region(tuple(shape), tuple(selection), tuple(result))


def is_run(selected: range) -> bool:
    """Ascending and contiguous: one run of the axis."""
    return len(selected) <= 1 or selected.step == 1


def is_full(selected: range, dim: int) -> bool:
    """The whole axis, in order."""
    return len(selected) == dim and is_run(selected) and (dim == 0 or selected[0] == 0)


def as_slice(selected: range, shift: int) -> slice:
    """The slice picking ``selected`` from an axis that starts at index ``shift``."""
    if not len(selected):
        return slice(0, 0)
    first = selected[0] - shift
    stop = selected[-1] - shift + (1 if selected.step > 0 else -1)
    return slice(first, stop if stop >= 0 else None, selected.step)


def run_layout(shape: tuple[int, ...], selection: tuple[range, ...] | list[range]) -> tuple[int, int]:
    """``(block_from, whole_from)``: the axes from ``whole_from`` on are selected whole; those from
    ``block_from`` on are contiguous in the file (``block_from`` is ``whole_from - 1`` where the axis
    before the whole ones is an ascending run). One run per combination of the leading indices."""
    whole_from = len(shape)
    while whole_from > 0 and is_full(selection[whole_from - 1], shape[whole_from - 1]):
        whole_from -= 1
    block_from = whole_from - 1 if whole_from > 0 and is_run(selection[whole_from - 1]) else whole_from
    return block_from, whole_from


def run_offsets(
    shape: tuple[int, ...], itemsize: int, selection: tuple[range, ...] | list[range], block_from: int | None = None
) -> tuple[np.ndarray, int]:
    """The byte offsets (from the tensor's first byte, as int64, in the result's order) of the runs
    holding the region, and the bytes of each run. No runs for an empty region. ``block_from``
    (an ascending run's axis, the ones after it whole) makes each run one index of the axes
    before it, even where runs could be longer."""
    counts = [len(s) for s in selection]
    if math.prod(counts) == 0:
        return np.zeros(0, np.int64), 0
    if block_from is None:
        block_from, _ = run_layout(shape, selection)
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]  # in elements
    starts = np.zeros((), np.int64)
    for axis in range(block_from):
        picked = selection[axis]
        indices = np.arange(picked.start, picked.stop, picked.step, dtype=np.int64)
        starts = np.add.outer(starts, indices * strides[axis])
    start_in_block = selection[block_from][0] * strides[block_from] if block_from < len(shape) else 0
    offsets = (starts.reshape(-1) + start_in_block) * itemsize
    return offsets, math.prod(counts[block_from:]) * itemsize


@dataclasses.dataclass(frozen=True, slots=True)
class Stretches:
    """How a region of a stored tensor is read (into host memory, or a device's staging slot):
    one read per *stretch*, the stored bytes from
    the first to the last byte the region needs under one combination of the indices it selects
    on the axes before ``axis`` (``count`` of them, in the result's order). A stretch covers the
    indices ``rows`` of ``axis`` (the trailing axes whole) and is read into a buffer place of
    ``len(rows)`` such rows, starting ``head`` bytes in, ``length`` bytes long; the region is then
    picked out of the place by ``pick``, a basic index on it. ``direct``: the stretches are the
    region's runs (:func:`run_offsets`), read straight into place, nothing picked."""

    axis: int
    count: int
    rows: range
    head: int
    length: int
    pick: tuple[slice, ...]
    direct: bool

    def row_bytes(self, shape: tuple[int, ...], itemsize: int) -> int:
        """The bytes of one index of ``axis`` (with every axis after it)."""
        return math.prod(shape[self.axis + 1 :]) * itemsize


def plan_stretches(
    shape: tuple[int, ...],
    itemsize: int,
    selection: tuple[range, ...],
    *,
    call_cost_bytes: int,
    gap_bytes: int | None,
    buffer_bytes: int,
) -> Stretches:
    """The cheapest way to read a region (not empty) as :class:`Stretches`: the axis minimizing
    ``reads * call_cost_bytes + bytes read`` (one read call costs about as much as reading
    ``call_cost_bytes`` more bytes), where a stretch may only hold gaps of at most ``gap_bytes``
    unwanted bytes between two of the region's runs (None: any gap, for the fastest read from a
    warm page cache; a number bounds what is read beyond the region, as sharded restores need), and
    one index of the axis must fit a buffer of ``buffer_bytes`` (a longer stretch is read in pieces
    of whole indices). The region's own runs are always a candidate: they hold no gap."""
    block_from, _ = run_layout(shape, selection)
    ndim = len(shape)
    strides = [math.prod(shape[axis + 1 :]) * itemsize for axis in range(ndim)]  # in bytes
    lows = [min(s[0], s[-1]) for s in selection]
    highs = [max(s[0], s[-1]) for s in selection]
    counts = [len(s) for s in selection]
    run_bytes = math.prod(counts[block_from:]) * itemsize
    runs = math.prod(counts[:block_from])
    best_axis, best_cost = block_from, runs * (call_cost_bytes + run_bytes)
    under = run_bytes  # first to last wanted byte under one index of the axis (the axes after it)
    widest_gap = 0
    for axis in range(block_from - 1, -1, -1):  # from the innermost: ties go to fewer, longer reads
        if counts[axis] > 1:
            widest_gap = max(widest_gap, abs(selection[axis].step) * strides[axis] - under)
        if gap_bytes is not None and widest_gap > gap_bytes:
            break  # a stretch along any axis before this one holds this gap too
        length = (highs[axis] - lows[axis]) * strides[axis] + under
        # (an axis with one index reads what the axis inside it reads, into a buffer a whole index bigger)
        if counts[axis] > 1 and strides[axis] <= buffer_bytes:
            stretches = math.prod(counts[:axis])
            pieces = -(-((highs[axis] - lows[axis] + 1) * strides[axis]) // buffer_bytes)
            cost = stretches * (pieces * call_cost_bytes + length)
            if cost <= best_cost:
                best_axis, best_cost = axis, cost
        under = length
    if best_axis == block_from:
        return Stretches(block_from, runs, range(0), 0, run_bytes, (), True)
    axis = best_axis
    head = sum(lows[j] * strides[j] for j in range(axis + 1, ndim))  # axes after the run's are whole: 0
    tail = sum((highs[j] - lows[j]) * strides[j] for j in range(axis + 1, block_from))
    pick = (as_slice(selection[axis], lows[axis]),) + tuple(as_slice(s, 0) for s in selection[axis + 1 :])
    length = (highs[axis] - lows[axis]) * strides[axis] + tail + run_bytes
    return Stretches(axis, math.prod(counts[:axis]), range(lows[axis], highs[axis] + 1), head, length, pick, False)


def stretch_offsets(shape: tuple[int, ...], itemsize: int, selection: tuple[range, ...], plan: Stretches) -> np.ndarray:
    """The byte offset (from the tensor's first byte, int64) of each stretch's first byte, in the
    result's order."""
    if plan.direct:
        return run_offsets(shape, itemsize, selection)[0]
    strides = [math.prod(shape[axis + 1 :]) * itemsize for axis in range(len(shape))]
    starts = np.zeros((), np.int64)
    for axis in range(plan.axis):
        picked = selection[axis]
        starts = np.add.outer(starts, np.arange(picked.start, picked.stop, picked.step, dtype=np.int64) * strides[axis])
    return starts.reshape(-1) + plan.rows[0] * strides[plan.axis] + plan.head


def sub_selections(
    selection: tuple[range, ...], itemsize: int, most_bytes: int
) -> Iterator[tuple[int, tuple[range, ...], int]]:
    """A region cut, in the result's order, into sub-regions whose results are at most
    ``most_bytes`` each (or one element): ``(first element, selection, elements)``, each a
    contiguous stretch of the region's result. Cut along the first axis one index of which fits."""
    lengths = [len(s) for s in selection]
    if not lengths:  # a scalar
        yield 0, selection, 1
        return
    axis = 0
    while axis < len(lengths) - 1 and math.prod(lengths[axis + 1 :]) * itemsize > most_bytes:
        axis += 1
    under = math.prod(lengths[axis + 1 :])
    step = max(1, most_bytes // max(1, under * itemsize))
    first = 0
    for leading in itertools.product(*(range(n) for n in lengths[:axis])):
        fixed = tuple(s[i : i + 1] for s, i in zip(selection[:axis], leading, strict=True))
        for start in range(0, lengths[axis], step):
            picked = selection[axis][start : start + step]
            yield first, (*fixed, picked, *selection[axis + 1 :]), len(picked) * under
            first += len(picked) * under


def _ascending_hits(selected: range, start: int, stop: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions in the ascending ``selected`` of the indices in ``[start, stop)``."""
    return bisect.bisect_left(selected, start), bisect.bisect_left(selected, stop)


def intersect(
    selection: tuple[range, ...], box: tuple[tuple[int, int], ...]
) -> tuple[tuple[slice, ...], tuple[range, ...]] | None:
    """Where the region ``selection`` meets the ``[start, stop)`` box of a saved slice: the part of
    the region's box it fills (a slice per axis; the selection is monotonic, so the indices inside
    the box are one stretch of it) and the indices it selects within the saved slice. None when
    they do not meet."""
    positions, within = [], []
    for wanted, (start, stop) in zip(selection, box, strict=True):
        if len(wanted) <= 1 or wanted.step > 0:
            lo, hi = _ascending_hits(wanted, start, stop)
        else:
            a, b = _ascending_hits(wanted[::-1], start, stop)
            lo, hi = len(wanted) - b, len(wanted) - a
        if hi <= lo:
            return None
        positions.append(slice(lo, hi))
        inside = wanted[lo:hi]
        within.append(range(inside.start - start, inside.stop - start, inside.step))
    return tuple(positions), tuple(within)


_PAIRWISE_LIMIT = 64  # above this many parts, look for overlaps element by element


def cover_problem(box_shape: tuple[int, ...], parts: list[tuple[slice, ...]]) -> str | None:
    """Why ``parts`` (what saved slices fill of a region's box, from :func:`intersect`) do not
    fill the box exactly once (None when they do), as TF asks of a region it reads. Counted
    before anything the size of the box is allocated: the parts' volumes must add up to the
    box's, so a declared shape the saved data cannot fill is refused without allocating it."""
    volumes = [math.prod(p.stop - p.start for p in part) for part in parts]
    covered, total = sum(volumes), math.prod(box_shape)
    if covered < total:
        return f"saved slices hold {covered} of the region's {total} elements"
    if len(parts) <= _PAIRWISE_LIMIT:
        for (i, a), (j, b) in itertools.combinations(enumerate(parts), 2):
            if all(max(x.start, y.start) < min(x.stop, y.stop) for x, y in zip(a, b, strict=True)):
                return f"saved slices overlap in the region (its parts {i} and {j})"
        return None
    if covered != total:
        return "saved slices overlap"
    counts = np.zeros(box_shape, np.bool_)  # no larger than the saved data that fills it
    for part in parts:
        if counts[part].any():
            return "saved slices overlap"
        counts[part] = True
    return None

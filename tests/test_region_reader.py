"""The region reader get_slice, restore(regions=) and the device pipeline share
(gpuckpt.regions.plan_stretches, gpuckpt.host.lazy_slice.read_selection, gpuckpt.regions.sub_selections)
at its edges: tiny buffers, chunks and staging slots, negative steps, single-element and empty axes,
big-endian files, narrow ints, saved slices, truncation; and what it holds in memory."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_regions import _values, _write, index_for, shape_and_selection

import gpuckpt
from gpuckpt.host import lazy_slice


@st.composite
def small_cases(draw):
    name = draw(st.sampled_from(["float32", "int16", "uint8", "int4", "complex128", "bfloat16"]))
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=4)))
    return name, shape, draw(index_for(shape)), draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=small_cases(),
    span=st.sampled_from([16, 32, 48, 100, 256]),
    cost=st.sampled_from([0, 8, 1 << 40]),
    chunk=st.sampled_from([1, 2, 12, 40, 1 << 20]),
)
def test_pinned_tiny_buffers_get_slice_and_restore_regions_equal_numpy(monkeypatch, case, span, cost, chunk):
    """Pieces of whole indices, several stretches per buffer, negative steps, big-endian,
    int4, dtype= in tiny sub_selections: all equal numpy's indexing of the whole tensor."""
    name, shape, key, big_endian, seed = case
    values = _values(name, shape, seed)
    try:
        expected = values[key]
    except IndexError:
        return
    prefix = _write({name: values}, big_endian)
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", span)
    monkeypatch.setattr(lazy_slice, "READ_CALL_COST_BYTES", cost)
    monkeypatch.setattr(lazy_slice, "CHUNK_BYTES", chunk)
    with gpuckpt.open(prefix) as ckpt:
        whole = ckpt.restore([name])[name]
        expected = np.asarray(whole[key])
        got = ckpt.get_slice(name)[key]
        assert got.tobytes() == expected.tobytes() and got.shape == expected.shape, (shape, key)
        got = ckpt.restore(regions={name: key})[name]
        assert got.tobytes() == expected.tobytes() and got.shape == expected.shape, (shape, key)
        if name not in ("int4", "complex128"):
            conv = ckpt.restore(regions={name: key}, dtype=np.float64)[name]
            ref = ckpt.restore([name], dtype=np.float64)[name][key]
            assert conv.tobytes() == np.asarray(ref).tobytes(), (shape, key)


@pytest.fixture(scope="module")
def cupy():
    import cupy_double

    with cupy_double.installed(device_count=2, memory_bytes=64 << 20) as module:
        yield module


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=small_cases(),
    span=st.sampled_from([16, 48, 256, 4 << 20]),
    slot=st.sampled_from([16, 24, 64, 256]),
    dtype=st.sampled_from([None, np.float64]),
    backend=st.sampled_from(["cuda", "hostdevice"]),
)
def test_pinned_device_regions_with_tiny_slots_equal_numpy(cupy, monkeypatch, case, span, slot, dtype, backend):
    """The device pipeline's _RegionPart parts over 3 threads, each piece through read_selection; progress ends
    at its total."""
    from gpuckpt.device import HostDevice

    name, shape, key, big_endian, seed = case
    if name == "complex128" and slot < 16:
        return
    if dtype is not None and name in ("int4", "complex128"):
        dtype = None
    values = _values(name, shape, seed)
    try:
        values[key]
    except IndexError:
        return
    prefix = _write({name: values}, big_endian)
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", span)
    monkeypatch.setattr(lazy_slice, "READ_CALL_COST_BYTES", 8)
    options = gpuckpt.RestoreOptions(staging_slot_bytes=slot, staging_slots=4, io_threads=3)
    seen = []
    with gpuckpt.open(prefix, options=options) as ckpt:
        expected = np.asarray(ckpt.restore([name], dtype=dtype)[name][key])
        device = "cuda" if backend == "cuda" else HostDevice()
        progress = lambda done, total: seen.append((done, total))  # noqa: E731
        got = ckpt.restore(regions={name: key}, dtype=dtype, device=device, progress=progress)[name]
        got = cupy.asnumpy(got) if backend == "cuda" else got
        assert got.shape == expected.shape and got.tobytes() == expected.tobytes(), (shape, key)
        if seen:
            assert seen[-1][0] == seen[-1][1], seen


@st.composite
def partitioned_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    cuts = [sorted(set(draw(st.lists(st.integers(1, d - 1), max_size=2)) if d > 1 else [])) for d in shape]
    name = draw(st.sampled_from(["float32", "int16", "uint8", "complex128"]))
    return name, shape, cuts, draw(index_for(shape)), draw(st.integers(0, 999))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=partitioned_cases(),
    span=st.sampled_from([16, 48, 256]),
    cost=st.sampled_from([0, 8, 1 << 40]),
    backend=st.sampled_from(["host", "slice", "cuda", "host64"]),
)
def test_pinned_partitioned_regions_with_tiny_buffers_equal_numpy(cupy, monkeypatch, case, span, cost, backend):
    import itertools

    name, shape, cuts, key, seed = case
    full = _values(name, shape, seed)
    try:
        full[key]
    except IndexError:
        return
    bounds = [list(itertools.pairwise([0, *c, d])) for c, d in zip(cuts, shape, strict=True)]
    parts = [
        (tuple(slice(a, b) for a, b in box), full[tuple(slice(a, b) for a, b in box)])
        for box in itertools.product(*bounds)
    ]
    prefix = tempfile.mkdtemp(prefix="review-p-") + "/ckpt"
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", span)
    monkeypatch.setattr(lazy_slice, "READ_CALL_COST_BYTES", cost)
    options = gpuckpt.RestoreOptions(staging_slot_bytes=32, staging_slots=4, io_threads=2)
    with gpuckpt.open(prefix, options=options) as ckpt:
        if backend == "slice":
            got = ckpt.get_slice("pv")[key]
            expected = np.asarray(full[key])
        elif backend == "host64":
            if name == "complex128":
                return
            got = ckpt.restore(regions={"pv": key}, dtype=np.float64)["pv"]
            expected = np.asarray(ckpt.restore(["pv"], dtype=np.float64)["pv"][key])
        else:
            got = ckpt.restore(regions={"pv": key}, device="cuda" if backend == "cuda" else "cpu")["pv"]
            got = cupy.asnumpy(got) if backend == "cuda" else got
            expected = np.asarray(full[key])
        assert got.shape == expected.shape and got.tobytes() == expected.tobytes(), (shape, cuts, key)


class _FakeShards:
    """read_runs / read_into over bytes in memory; records each read and the buffer it lands in."""

    def __init__(self, data: bytes):
        self.data = data
        self.reads: list[tuple[int, int, int]] = []  # (offset, length, bytes of the buffer read into)

    def _one(self, offset, dst):
        got = self.data[offset : offset + len(dst)]
        if len(got) != len(dst):
            raise gpuckpt.FormatError("short read")
        dst[:] = got
        base = dst.obj
        self.reads.append((offset, len(dst), getattr(base, "nbytes", len(dst))))

    def read_into(self, shard_id, offset, dst, tensor=None):
        self._one(offset, dst)

    def read_runs(self, shard_id, offsets, length, dst, tensor, spacing=None):
        spacing = length if spacing is None else spacing
        for number, offset in enumerate(offsets):
            piece = dst[number * spacing : number * spacing + length]
            assert len(piece) == length
            self._one(offset, piece)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=shape_and_selection(most_dim=13, ranks=(0, 5), steps=(1, 1, 2, 3, 5)),
    itemsize=st.sampled_from([1, 2, 4, 8, 16]),
    span=st.integers(1, 3000),
    cost=st.sampled_from([0, 1, 16, 300, 1 << 14, 1 << 40]),
    gap=st.sampled_from([None, 0, 3, 64, 4096]),
    offset=st.sampled_from([0, 7, 1000]),
    at_once=st.sampled_from([1, 2, 3, 1 << 16]),
)
def test_pinned_read_selection_against_numpy_with_a_fake_file(
    monkeypatch, case, itemsize, span, cost, gap, offset, at_once
):
    """The executor over a file in memory: the box equals numpy's; every read lies in the tensor, within a buffer
    of at most SPAN_READ_BYTES (or the box), and holds no more than ``gap`` unwanted bytes between
    two wanted ones."""
    from gpuckpt.host.lazy_slice import read_selection

    shape, selection = case
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", span)
    monkeypatch.setattr(lazy_slice, "READ_CALL_COST_BYTES", cost)
    monkeypatch.setattr(lazy_slice, "_OFFSETS_AT_ONCE", at_once)
    size = math.prod(shape) * itemsize
    # the plan needs one index of its axis to fit: a span below the innermost row leaves only runs
    rng = np.random.default_rng(len(shape) * 31 + itemsize)
    data = bytes(rng.integers(0, 256, offset + size + 50, dtype=np.uint8))
    tensor = np.frombuffer(data[offset : offset + size], np.dtype(f"V{itemsize}")).reshape(shape)
    expected = tensor[tuple(slice(r.start, r.stop if r.stop >= 0 else None, r.step) for r in selection)]
    entry = gpuckpt.format.bundle.TensorEntry("t", 1, shape, 0, offset, size, 0)
    shards = _FakeShards(data)
    box = np.empty([len(s) for s in selection], np.dtype(f"V{itemsize}"))
    read_selection(shards, entry, selection, box, gap)
    assert box.tobytes() == expected.tobytes()
    wanted = np.zeros(len(data), bool)
    idx = np.arange(size).reshape(*shape, itemsize) if shape else np.arange(size)
    picked = idx[tuple(slice(r.start, r.stop if r.stop >= 0 else None, r.step) for r in selection)]
    wanted[offset + picked.reshape(-1)] = True
    for start, length, into in shards.reads:
        assert offset <= start and start + length <= offset + size
        assert into <= max(span, box.nbytes), (into, span, box.nbytes)
        held = wanted[start : start + length]
        assert held[0] and held[-1]
        if gap is not None:
            assert (np.diff(np.flatnonzero(held)) - 1).max(initial=0) <= gap


@pytest.mark.parametrize("span", [64, 4 << 20])
@pytest.mark.parametrize(
    "key", [np.s_[:, ::3], np.s_[::-1, 5], np.s_[50:, 1:7:2], np.s_[::-7, ::-1], np.s_[99], np.s_[-1, -1]]
)
@pytest.mark.parametrize("how", ["slice", "regions", "regions64", "cuda", "cuda64"])
def test_pinned_a_truncated_file_is_a_format_error_on_every_path(cupy, monkeypatch, tmp_path, span, key, how):
    """A file cut under the region (after open) is a FormatError, never wrong data."""
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", span)
    a = np.arange(100 * 8, dtype=np.float32).reshape(100, 8)
    prefix = gpuckpt.save(str(tmp_path / "t"), {"t": a})
    options = gpuckpt.RestoreOptions(staging_slot_bytes=32, staging_slots=4, io_threads=3)
    with gpuckpt.open(prefix, options=options) as ckpt:
        entry = ckpt.index.tensors["t"]
        with open(ckpt.data_files()[entry.shard_id], "r+b") as f:
            f.truncate(entry.offset + entry.size - 4 * 8 * 3 - 2)  # the last 3 rows and a bit gone
        dtype = np.float64 if how.endswith("64") else None
        with pytest.raises(gpuckpt.FormatError, match="'t'"):
            if how == "slice":
                ckpt.get_slice("t")[key]
            elif how.startswith("regions"):
                ckpt.restore(regions={"t": key}, dtype=dtype)
            else:
                ckpt.restore(regions={"t": key}, dtype=dtype, device="cuda")


@pytest.mark.parametrize("backend", ["hostdevice", "cuda"])
def test_a_staging_slot_holds_at_least_the_widest_element(cupy, backend, tmp_path):
    """A region is staged whole elements at a time, so a slot smaller than a complex128 (16
    bytes) is refused when the options are made; at 16 bytes a region of complex128 stages
    element by element."""
    from gpuckpt.device import HostDevice

    with pytest.raises(ValueError, match="staging_slot_bytes must be at least 16"):
        gpuckpt.RestoreOptions(staging_slot_bytes=8, staging_slots=2, io_threads=1)
    a = np.arange(40, dtype=np.complex128).reshape(5, 8)
    prefix = gpuckpt.save(str(tmp_path / "c"), {"t": a})
    options = gpuckpt.RestoreOptions(staging_slot_bytes=16, staging_slots=2, io_threads=1)
    device = HostDevice() if backend == "hostdevice" else "cuda"
    as_numpy = (lambda x: x) if backend == "hostdevice" else cupy.asnumpy
    with gpuckpt.open(prefix, options=options) as ckpt:
        np.testing.assert_array_equal(as_numpy(ckpt.restore(device=device)["t"]), a)
        got = ckpt.restore(regions={"t": np.s_[1:4, ::3]}, device=device)["t"]
        np.testing.assert_array_equal(as_numpy(got), a[1:4, ::3])


class _NoFile:
    def read_runs(self, shard_id, offsets, length, dst, tensor, spacing=None):
        pass

    def read_into(self, shard_id, offset, dst, tensor=None):
        pass


def test_a_million_stretches_are_not_a_million_python_ints_at_once():
    """A stretch plan's offsets become Python ints a batch at a time, as a direct plan's runs do:
    a million 3-byte stretches (two columns of 4100-byte rows; restore(regions=)'s 4 KiB gap keeps
    them one row each) for a 2 MB result stay within the int64 offsets and one buffer."""
    import tracemalloc

    from gpuckpt.format.bundle import TensorEntry
    from gpuckpt.host.lazy_slice import read_selection
    from gpuckpt.regions import REGION_GAP_BYTES, plan_stretches, region_of

    rows = 1_000_000
    shape = (rows, 4100)
    entry = TensorEntry("t", 4, shape, 0, 0, rows * 4100, 0)  # uint8, never read: _NoFile
    selection = region_of(np.s_[:, 0:3:2], shape).selection
    plan = plan_stretches(
        shape,
        1,
        selection,
        call_cost_bytes=lazy_slice.READ_CALL_COST_BYTES,
        gap_bytes=REGION_GAP_BYTES,
        buffer_bytes=lazy_slice.SPAN_READ_BYTES,
    )
    assert not plan.direct and plan.count == rows
    box = np.empty((rows, 2), np.uint8)
    tracemalloc.start()
    try:
        read_selection(_NoFile(), entry, selection, box, REGION_GAP_BYTES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * rows + lazy_slice.SPAN_READ_BYTES, peak  # int64 offsets (a few copies) and a buffer


def test_a_tiny_region_under_one_index_gets_a_buffer_its_own_size(tmp_path):
    """``[1, 5:40:2]`` of 4 MiB rows is 18 floats in one 140-byte stretch along axis 1; axis 0
    (one index) reads the same bytes into a buffer a whole 4 MiB row bigger, so it is never the
    stretch axis."""
    import tracemalloc

    from gpuckpt.regions import plan_stretches, region_of

    a = np.arange(4 * 1048576, dtype=np.float32).reshape(4, 1048576)
    prefix = gpuckpt.save(str(tmp_path / "t"), {"t": a})
    key = np.s_[1, 5:40:2]
    plan = plan_stretches(
        a.shape,
        4,
        region_of(key, a.shape).selection,
        call_cost_bytes=lazy_slice.READ_CALL_COST_BYTES,
        gap_bytes=None,
        buffer_bytes=lazy_slice.SPAN_READ_BYTES,
    )
    with gpuckpt.open(prefix) as ckpt:
        lazy = ckpt.get_slice("t")
        tracemalloc.start()
        try:
            got = lazy[key]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(got, a[key])
    place = len(plan.rows) * plan.row_bytes(a.shape, 4)
    assert place <= 64 * plan.length and peak <= 64 << 10, (plan, place, peak)

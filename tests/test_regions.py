"""``restore(regions={name: index})``: a region of a tensor equals numpy's indexing of the whole
tensor, on the host, on ``HostDevice`` and through the real ``CudaDevice`` (on a GPU, or on the CuPy
double), for every dtype, big-endian bundles and partitioned tensors; each call reads only the bytes
the region needs (counted with ``Checkpoint.bytes_read``); whole reads are verified."""

from __future__ import annotations

import itertools
import math
import tempfile
import unittest.mock

import cupy_double
import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuckpt
from gpuckpt.cuda import cuda_available
from gpuckpt.device import HostDevice
from gpuckpt.dtypes import DataType
from gpuckpt.host import lazy_slice
from gpuckpt.regions import (
    REGION_GAP_BYTES,
    RegionError,
    plan_stretches,
    region_of,
    run_offsets,
    stretch_offsets,
)

REAL_GPU = cuda_available()  # decided before the double can be installed

# name -> (numpy type of the array written, TF dtype code overriding it or None)
DTYPES = {
    "float32": (np.float32, None),
    "float64": (np.float64, None),
    "float16": (np.float16, None),
    "bfloat16": (ml_dtypes.bfloat16, None),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, None),
    "float8_e5m2": (ml_dtypes.float8_e5m2, None),
    "complex64": (np.complex64, None),
    "complex128": (np.complex128, None),
    "int8": (np.int8, None),
    "int16": (np.int16, None),
    "int32": (np.int32, None),
    "int64": (np.int64, None),
    "uint8": (np.uint8, None),
    "uint16": (np.uint16, None),
    "uint32": (np.uint32, None),
    "uint64": (np.uint64, None),
    "bool": (np.bool_, None),
    "int4": (np.int8, 29),  # one per byte, the high bits set as TF may leave them (FORMAT.md 3.7)
    "uint4": (np.uint8, 30),
}
BACKENDS = ["host", "hostdevice", "cuda"]
OPTIONS = gpuckpt.RestoreOptions(staging_slot_bytes=256, staging_slots=4, io_threads=2)  # regions cross slots


@pytest.fixture(scope="module")
def cupy():
    """The real CuPy on a GPU, else the double (the real CudaDevice runs on it)."""
    if REAL_GPU:
        import cupy

        yield cupy
        return
    with cupy_double.installed(device_count=1) as module:
        yield module


def _values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    np_type, _ = DTYPES[name]
    dtype = np.dtype(np_type)
    count = math.prod(shape)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, count).astype(np.bool_).reshape(shape)
    raw = rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _write(tensors: dict[str, np.ndarray], big_endian: bool = False) -> str:
    codes = {n: DTYPES[n.split("/")[0]][1] for n in tensors if DTYPES[n.split("/")[0]][1] is not None}
    prefix = tempfile.mkdtemp(prefix="regions-") + "/ckpt"
    return make_bundle(tensors, big_endian=big_endian, num_shards=2, dtypes=codes).write(prefix)


@st.composite
def index_for(draw, shape):
    """Any basic index: integers (negative too), slices with steps (either way, out of range
    bounds), '...' for some axes, None (new axes)."""
    items: list[object] = []
    for dim in shape:
        if dim and draw(st.booleans()):
            items.append(draw(st.integers(-dim, dim - 1)))
        else:
            start = draw(st.none() | st.integers(-dim - 2, dim + 2))
            stop = draw(st.none() | st.integers(-dim - 2, dim + 2))
            step = draw(st.none() | st.sampled_from([1, 2, 3, -1, -2]))
            items.append(slice(start, stop, step))
    items = items[: draw(st.integers(0, len(items)))]
    if items and draw(st.booleans()):
        at = draw(st.integers(0, len(items)))
        items = items[:at] + [Ellipsis] + items[at + 1 :]
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), None)
    return tuple(items)


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=4)))
    return name, shape, draw(index_for(shape)), draw(st.booleans()), draw(st.integers(0, 2**16))


def _delta(ckpt: gpuckpt.Checkpoint, before: dict[str, int]) -> int:
    return sum(ckpt.bytes_read().values()) - sum(before.values())


def _as_numpy(array, backend: str, cupy_module) -> np.ndarray:
    return cupy_module.asnumpy(array) if backend == "cuda" else array


def _device(backend: str):
    return {"host": "cpu", "hostdevice": HostDevice(), "cuda": "cuda"}[backend]


def _same(got: np.ndarray, expected: np.ndarray, backend: str, what: object) -> None:
    """Equal bit for bit, in the dtype the backend gives (on CUDA float8 and int4 as their bytes)."""
    assert got.shape == expected.shape, what
    if backend == "cuda":
        from gpuckpt.cuda import cuda_device

        assert got.dtype == cuda_device(0).array_dtype(expected.dtype), what
    else:
        assert got.dtype == expected.dtype, what
    assert got.tobytes() == expected.tobytes(), what


def _expected_bytes(ckpt: gpuckpt.Checkpoint, name: str, key: object) -> tuple[int, int | None, int]:
    """(bytes the region holds, bytes the host's stretch plan reads, most any reader may read): a
    whole region reads the tensor once; a partial one its runs, at most REGION_GAP_BYTES between
    two. The plan's figure is None where the host reads a stretch in pieces (longer than its buffer)."""
    entry = ckpt.index.tensors[name]
    info = entry.dtype_info
    region = region_of(key, entry.shape)
    parts = [(entry, region.selection, entry.shape)]
    if entry.slices:
        from gpuckpt.regions import intersect

        parts = []
        for tensor_slice in entry.slices:
            bounds = tuple(e.bounds(d) for e, d in zip(tensor_slice, entry.shape, strict=True))
            meet = intersect(region.selection, bounds)
            if meet is not None:
                parts.append((ckpt.index.slice_entry(entry, tensor_slice), meet[1], tuple(b - a for a, b in bounds)))
    needed = host = most = 0
    exact = True
    for stored, selection, shape in parts:
        holds = math.prod(len(s) for s in selection) * info.itemsize
        needed += holds
        if region.whole or all(len(s) == d and (d <= 1 or s.step == 1) for s, d in zip(selection, shape, strict=True)):
            host += stored.size  # read whole, verified
            most += stored.size
            continue
        offsets, _ = run_offsets(shape, info.itemsize, selection)
        most += holds + REGION_GAP_BYTES * max(len(offsets) - 1, 0)
        if holds == 0:
            continue
        plan = plan_stretches(
            shape,
            info.itemsize,
            tuple(selection),
            call_cost_bytes=lazy_slice.READ_CALL_COST_BYTES,
            gap_bytes=REGION_GAP_BYTES,
            buffer_bytes=lazy_slice.SPAN_READ_BYTES,
        )
        host += plan.count * plan.length
        place = len(plan.rows) * plan.row_bytes(shape, info.itemsize)
        exact = exact and (plan.direct or place <= lazy_slice.SPAN_READ_BYTES)
    return needed, host if exact else None, most


def _check_bytes(ckpt: gpuckpt.Checkpoint, name: str, key: object, read: int, backend: str) -> None:
    """The host reads what its stretch plan says (:func:`gpuckpt.regions.plan_stretches`); a
    device reads a region slot by slot, each slot's runs grouped anew (a run cut by a slot's end
    is read in two), so it may read less than its groups, never more than the runs and a gap's
    slack between two."""
    needed, host, most = _expected_bytes(ckpt, name, key)
    if backend == "host" and host is not None:
        assert needed <= read == host <= most, (name, key)
    else:
        assert needed <= read <= most, (name, key)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_a_region_equals_numpy_indexing_of_the_whole_tensor(cupy, backend, case):
    name, shape, key, big_endian, seed = case
    prefix = _write({name: _values(name, shape, seed)}, big_endian)
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        whole = ckpt.restore([name])[name]
        before = ckpt.bytes_read()
        try:
            expected = whole[key]
        except IndexError:  # numpy refuses it: so does the restore, before reading anything
            with pytest.raises(RegionError, match=f"tensor '{name}'"):
                ckpt.restore(regions={name: key}, device=_device(backend))
            assert _delta(ckpt, before) == 0
            return
        got = ckpt.restore(regions={name: key}, device=_device(backend))[name]
        read = _delta(ckpt, before)
        _same(_as_numpy(got, backend, cupy), np.asarray(expected), backend, (name, shape, key))
        _check_bytes(ckpt, name, key, read, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_partitioned_regions_read_only_the_parts_of_the_slices_they_need(cupy, backend, data):
    """Saved slices cut along both axes; a region meeting several reads each slice it holds whole
    (verified), and only the runs of the others."""
    rows, cols = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 6))
    name = data.draw(st.sampled_from(["float32", "bfloat16", "int16", "float8_e4m3fn", "int64"]))
    full = _values(name, (rows, cols), data.draw(st.integers(0, 99)))
    row_cuts = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=2)) if rows > 1 else []))
    col_cuts = sorted(set(data.draw(st.lists(st.integers(1, cols - 1), max_size=2)) if cols > 1 else []))
    parts = [
        ((slice(a, b), slice(c, d)), full[a:b, c:d])
        for (a, b), (c, d) in itertools.product(
            itertools.pairwise([0, *row_cuts, rows]), itertools.pairwise([0, *col_cuts, cols])
        )
    ]
    prefix = tempfile.mkdtemp(prefix="regions-p-") + "/ckpt"
    # gpuckpt.save refuses slices of the types TF's reader cannot assemble (float8 here), but TF's
    # writer makes them, and gpuckpt reads them: lift the refusal to write one
    with unittest.mock.patch.object(gpuckpt.writer, "TF_SLICED_TYPES", frozenset(DataType)):
        gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    key = data.draw(index_for(full.shape))
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        whole = ckpt.restore(["pv"])["pv"]
        before = ckpt.bytes_read()
        try:
            expected = whole[key]
        except IndexError:
            with pytest.raises(RegionError, match="tensor 'pv'"):
                ckpt.restore(regions={"pv": key}, device=_device(backend))
            return
        got = ckpt.restore(regions={"pv": key}, device=_device(backend))["pv"]
        read = _delta(ckpt, before)
        _same(_as_numpy(got, backend, cupy), np.asarray(expected), backend, key)
        _check_bytes(ckpt, "pv", key, read, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_region_that_is_one_saved_slice_reads_that_slice_alone_and_checks_it(cupy, backend, tmp_path):
    full = np.arange(60, dtype=np.float32).reshape(6, 10)
    parts = [((slice(0, 4), slice(None)), full[:4]), ((slice(4, 6), slice(None)), full[4:])]
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        before = ckpt.bytes_read()
        got = ckpt.restore(regions={"pv": np.s_[4:6]}, device=_device(backend))["pv"]
        assert _delta(ckpt, before) == full[4:].nbytes
        np.testing.assert_array_equal(_as_numpy(got, backend, cupy), full[4:])
        second = next(s for s in ckpt.index.tensors["pv"].slices if s[0].start == 4)
        entry = ckpt.index.slice_entry(ckpt.index.tensors["pv"], second)
    with open(ckpt.data_files()[entry.shard_id], "r+b") as f:  # damage that slice
        f.seek(entry.offset + 5)
        f.write(b"\xff")
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        with pytest.raises(gpuckpt.ChecksumError, match="pv"):
            ckpt.restore(regions={"pv": np.s_[4:6]}, device=_device(backend))
        got = ckpt.restore(regions={"pv": np.s_[0:4]}, device=_device(backend))["pv"]  # the other slice: fine
        np.testing.assert_array_equal(_as_numpy(got, backend, cupy), full[:4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_regions_are_verified_partial_ones_are_not(cupy, backend, tmp_path):
    a = np.arange(400, dtype=np.float32).reshape(20, 20)
    prefix = make_bundle({"a": a}).write(str(tmp_path / "ck"))
    entry_offset = 0
    with open(prefix + ".data-00000-of-00001", "r+b") as f:
        f.seek(entry_offset + 4 * 399)  # the last element
        f.write(b"\x00\x00\x80\x7f")
    device = _device(backend)
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        for whole in (np.s_[:], np.s_[...], np.s_[None, :, 0:20], np.s_[0:100, -20:]):
            with pytest.raises(gpuckpt.ChecksumError, match="'a'"):
                ckpt.restore(regions={"a": whole}, device=device)
        got = _as_numpy(ckpt.restore(regions={"a": np.s_[:10]}, device=device)["a"], backend, cupy)
        np.testing.assert_array_equal(got, a[:10])  # unchecked: the damage is outside the region
        got = _as_numpy(ckpt.restore(regions={"a": np.s_[::-1]}, device=device)["a"], backend, cupy)
        assert np.isinf(got[0, -1])  # every element, but not in order: read as runs, unchecked


@pytest.mark.parametrize("backend", BACKENDS)
def test_regions_with_dtype_and_out(cupy, backend, tmp_path, monkeypatch):
    from gpuckpt.host import lazy_slice

    monkeypatch.setattr(lazy_slice, "CHUNK_BYTES", 48)  # host conversions chunk by chunk, across runs
    a = np.linspace(-3, 3, 12 * 9, dtype=np.float32).reshape(12, 9)
    f8 = a.astype(ml_dtypes.float8_e4m3fn)
    prefix = make_bundle({"a": a, "f8": f8}, big_endian=True).write(str(tmp_path / "ck"))
    device = _device(backend)
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        for target in (np.float16, ml_dtypes.bfloat16, np.float64):
            for name in ("a", "f8"):
                for key in (np.s_[2:9, ::2], np.s_[3], np.s_[:, None, 4]):
                    expected = ckpt.restore([name], dtype=target)[name][key]
                    got = ckpt.restore(regions={name: key}, dtype=target, device=device)[name]
                    _same(_as_numpy(got, backend, cupy), np.asarray(expected), backend, (name, target, key))
        key = np.s_[1:11:3, 2:7]
        if backend == "cuda":
            out = cupy.zeros((4, 5), np.float16)
        else:
            out = np.zeros((4, 5), np.float16)
        got = ckpt.restore(regions={"a": key}, out={"a": out}, dtype=np.float16, device=device)["a"]
        assert got is out
        np.testing.assert_array_equal(_as_numpy(out, backend, cupy), a[key].astype(np.float16))
        wrong = out.reshape(5, 4) if backend != "cuda" else cupy.zeros((12, 9), np.float16)
        with pytest.raises(ValueError, match="region restores as"):
            ckpt.restore(regions={"a": key}, out={"a": wrong}, dtype=np.float16, device=device)


def test_a_region_of_a_string_tensor_reads_the_whole_tensor(tmp_path):
    values = [b"a", b"bb", b"", b"dddd", b"eeeee", b"f"]
    prefix = make_bundle({"s": np.array(values, dtype=object).reshape(2, 3)}).write(str(tmp_path / "ck"))
    with gpuckpt.open(prefix) as ckpt:
        before = ckpt.bytes_read()
        got = ckpt.restore(regions={"s": np.s_[1, ::-1]})["s"]
        assert list(got) == [b"f", b"eeeee", b"dddd"]
        assert _delta(ckpt, before) == ckpt.index.tensors["s"].size
        assert ckpt.get_tensor("s", region=np.s_[0, 1]) == b"bb"
        with pytest.raises(gpuckpt.UnsupportedError, match="string"):
            ckpt.restore(regions={"s": np.s_[0]}, device=HostDevice())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_regions_are_refused_naming_the_tensor_before_any_read(cupy, backend, tmp_path):
    prefix = make_bundle({"a": np.zeros((4, 5), np.float32), "b": np.ones(3, np.int32)}).write(str(tmp_path / "ck"))
    with gpuckpt.open(prefix) as ckpt:
        for bad in (np.s_[4], np.s_[0, 0, 0], np.s_[..., ...], [0, 1], np.array([1]), np.s_[True], np.s_[0:1.5], "x"):
            with pytest.raises(RegionError, match="tensor 'a'") as info:
                ckpt.restore(regions={"a": bad, "b": np.s_[1:]}, device=_device(backend))
            assert isinstance(info.value, gpuckpt.InvalidArgumentError) and isinstance(info.value, IndexError)
        with pytest.raises(gpuckpt.InvalidArgumentError, match="does not select"):
            ckpt.restore(["b"], regions={"a": np.s_[0]})
        with pytest.raises(gpuckpt.TensorNotFoundError):
            ckpt.restore(regions={"nope": np.s_[0]})
        assert sum(ckpt.bytes_read().values()) == 0


def test_get_tensor_region_restore_async_and_a_device_map(cupy, tmp_path):
    a = np.arange(1000, dtype=np.int32).reshape(100, 10)
    b = np.arange(50, dtype=np.float32)
    prefix = make_bundle({"a": a, "b": b}).write(str(tmp_path / "ck"))
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        np.testing.assert_array_equal(ckpt.get_tensor("a", region=np.s_[7:9, 1]), a[7:9, 1])
        np.testing.assert_array_equal(cupy.asnumpy(ckpt.get_tensor("a", region=np.s_[::-9], device="cuda")), a[::-9])
        future = ckpt.restore_async(["a", "b"], regions={"a": np.s_[50:]}, device="cuda")
        np.testing.assert_array_equal(cupy.asnumpy(future.wait("a")), a[50:])
        result = future.result()
        np.testing.assert_array_equal(cupy.asnumpy(result["b"]), b)
        spread = ckpt.restore(["a", "b"], regions={"b": np.s_[10:20]}, device={"a": "cuda:0", "": "cpu"})
        np.testing.assert_array_equal(cupy.asnumpy(spread["a"]), a)
        np.testing.assert_array_equal(spread["b"], b[10:20])


def test_bytes_read_for_row_and_column_shards(tmp_path):
    """A row shard reads its rows' bytes exactly; a column shard of rows wider than a page reads
    its runs only; of narrow rows, within a page's slack per row."""
    wide = np.zeros((64, 4096), np.float32)  # 16 KiB rows
    narrow = np.zeros((64, 64), np.float32)  # 256-byte rows
    prefix = make_bundle({"wide": wide, "narrow": narrow}).write(str(tmp_path / "ck"))
    with gpuckpt.open(prefix) as ckpt:
        for name, key, expected in [
            ("wide", np.s_[16:32], 16 * 4096 * 4),
            ("wide", np.s_[:, 1024:2048], 64 * 1024 * 4),
            ("narrow", np.s_[:, 16:32], 63 * 256 + 16 * 4),
        ]:
            before = ckpt.bytes_read()
            ckpt.restore(regions={name: key})
            assert _delta(ckpt, before) == expected, (name, key)


@pytest.mark.parametrize("backend", ["hostdevice", "cuda"])
def test_a_large_region_is_staged_in_parts_by_several_threads(cupy, backend, tmp_path, monkeypatch):
    a = np.arange(64 * 100, dtype=np.float32).reshape(64, 100)
    prefix = make_bundle({"a": a}, big_endian=True).write(str(tmp_path / "ck"))
    from gpuckpt import pipeline

    staged = []
    real = pipeline.StagedRestore._stage_region_part
    monkeypatch.setattr(
        pipeline.StagedRestore,
        "_stage_region_part",
        lambda self, item, *rest: staged.append(item.index) or real(self, item, *rest),
    )
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        for key in (np.s_[3:60, 1:99], np.s_[::-1, ::2]):
            got = ckpt.restore(regions={"a": key}, device=_device(backend), dtype=np.float64)["a"]
            np.testing.assert_array_equal(_as_numpy(got, backend, cupy), a[key].astype(np.float64))
    assert len(staged) > 4


@st.composite
def shape_and_selection(draw, most_dim=7, ranks=(1, 4), steps=(1, 1, 2, 3)):
    """A shape and a region's selection on it (not empty; ranges either way)."""
    shape = tuple(draw(st.lists(st.integers(1, most_dim), min_size=ranks[0], max_size=ranks[1])))
    selection = []
    for dim in shape:
        start = draw(st.integers(0, dim - 1))
        picked = range(start, draw(st.integers(start + 1, dim)), draw(st.sampled_from(steps)))
        selection.append(picked[::-1] if draw(st.booleans()) else picked)
    return shape, tuple(selection)


@settings(max_examples=400, deadline=None)
@given(
    case=shape_and_selection(),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    call_cost=st.sampled_from([0, 16, 1 << 14, 1 << 40]),
    gap=st.sampled_from([None, 0, 8, 64]),
    buffer=st.sampled_from([8, 64, 1 << 20]),
)
def test_a_stretch_plan_reads_every_wanted_byte_and_no_longer_gap(case, itemsize, call_cost, gap, buffer):
    """Pure: each stretch of :func:`plan_stretches` starts and ends on a byte the region needs,
    holds no run of unwanted bytes longer than ``gap_bytes``, fits its buffer place, and the
    stretches together hold every byte the region needs; picking the region out of the places
    gives numpy's answer."""
    shape, selection = case
    plan = plan_stretches(shape, itemsize, selection, call_cost_bytes=call_cost, gap_bytes=gap, buffer_bytes=buffer)
    values = np.arange(math.prod(shape) * itemsize, dtype=np.int64).reshape(*shape, itemsize)
    box = tuple(np.array(list(s), dtype=np.int64) for s in selection)
    expected = values[np.ix_(*box)]  # (the region's box, itemsize): each element's byte offsets
    wanted = np.zeros(values.size, bool)
    wanted[expected.reshape(-1)] = True
    offsets = stretch_offsets(shape, itemsize, selection, plan)
    assert len(offsets) == plan.count
    covered = np.zeros(values.size, bool)
    for offset in offsets.tolist():
        held = wanted[offset : offset + plan.length]
        assert len(held) == plan.length and held[0] and held[-1]
        if gap is not None:
            unwanted = np.diff(np.flatnonzero(held)) - 1
            assert unwanted.max(initial=0) <= gap
        covered[offset : offset + plan.length] = True
    assert covered[wanted].all()
    if plan.direct:
        got = np.concatenate([np.arange(o, o + plan.length) for o in offsets.tolist()])
        np.testing.assert_array_equal(got, expected.reshape(-1))
        return
    row_bytes = plan.row_bytes(shape, itemsize)
    assert row_bytes <= buffer and plan.head + plan.length <= len(plan.rows) * row_bytes
    flat = values.reshape(-1)
    places = []
    for offset in offsets.tolist():
        place = np.full(len(plan.rows) * row_bytes, -1, np.int64)
        place[plan.head : plan.head + plan.length] = flat[offset : offset + plan.length]
        places.append(place.reshape(len(plan.rows), *shape[plan.axis + 1 :], itemsize)[plan.pick])
    got = np.stack(places).reshape(expected.shape)
    np.testing.assert_array_equal(got, expected)


def test_a_region_may_be_given_as_a_region_or_as_slices_from_a_sharding(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(6, 10)
    prefix = make_bundle({"a": a}).write(str(tmp_path / "ck"))
    with gpuckpt.open(prefix) as ckpt:
        region = region_of(np.s_[1:3, ::3], a.shape)
        np.testing.assert_array_equal(ckpt.get_tensor("a", region=region), a[1:3, ::3])
        jax_style = (slice(2, 4, None), slice(None, None, None))  # as addressable_devices_indices_map gives
        np.testing.assert_array_equal(ckpt.restore(regions={"a": jax_style})["a"], a[2:4])
        with pytest.raises(RegionError, match="shape"):
            ckpt.restore(regions={"a": region_of(np.s_[0], (7, 10))})
        np.testing.assert_array_equal(ckpt.get_tensor("a", region=(np.int64(2), np.int32(-1))), a[2, -1])
    assert region.box() is None and region_of(np.s_[1:3, 4], a.shape).box() == ((1, 3), (4, 5))
    assert region_of(np.s_[1:3, 4], a.shape).shape == (2,) and region.numpy_index() == (slice(1, 3, 1), slice(0, 10, 3))


def test_many_regions_are_read_by_several_threads_and_an_error_in_one_fails_the_restore(tmp_path, monkeypatch):
    tensors = {f"t{i}": np.arange(100 * (i + 1), dtype=np.float32).reshape(10 * (i + 1), 10) for i in range(6)}
    prefix = make_bundle(tensors, num_shards=2).write(str(tmp_path / "ck"))
    from gpuckpt.host import lazy_slice

    threads_seen = set()
    real = lazy_slice.restore_region

    def spy(*args, **kwargs):
        import threading
        import time

        threads_seen.add(threading.current_thread().name)
        time.sleep(0.05)  # each region takes a while, so one worker cannot take them all
        return real(*args, **kwargs)

    monkeypatch.setattr(lazy_slice, "restore_region", spy)
    keys = {name: np.s_[1::2, 3:7] for name in tensors}
    with gpuckpt.open(prefix, threads=3) as ckpt:
        got = ckpt.restore(regions=keys)
        assert list(got) == sorted(tensors)
        for name, value in tensors.items():
            np.testing.assert_array_equal(got[name], value[keys[name]])
        assert len(threads_seen) > 1 and all(n.startswith("gpuckpt-region") for n in threads_seen)
        entry = ckpt.index.tensors["t3"]
        with open(ckpt.data_files()[entry.shard_id], "r+b") as f:
            f.truncate(entry.offset + 8)  # after open: t3 and what follows it in that file is gone
        with pytest.raises(gpuckpt.FormatError, match="tensor .t[1-5]"):  # t1 sees the file shrink
            ckpt.restore(regions=keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncation_under_a_partial_region_of_a_partitioned_tensor_names_the_tensor(cupy, backend, tmp_path):
    full = np.arange(600, dtype=np.float32).reshape(60, 10)
    parts = [((slice(0, 30), slice(None)), full[:30]), ((slice(30, 60), slice(None)), full[30:])]
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        with open(ckpt.data_files()[0], "r+b") as f:
            f.truncate(100)
        with pytest.raises(gpuckpt.FormatError, match="tensor 'pv'"):
            ckpt.restore(regions={"pv": np.s_[20:40, 2:5]}, device=_device(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_slice_a_spanning_region_holds_whole_is_checked_one_it_cuts_is_not(cupy, backend, tmp_path):
    full = np.arange(80, dtype=np.float32).reshape(8, 10)
    parts = [((slice(0, 2), slice(None)), full[:2]), ((slice(2, 8), slice(None)), full[2:])]
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    with gpuckpt.open(prefix) as ckpt:
        top = next(s for s in ckpt.index.tensors["pv"].slices if s[0].start == 0)
        entry = ckpt.index.slice_entry(ckpt.index.tensors["pv"], top)
    with open(ckpt.data_files()[entry.shard_id], "r+b") as f:  # damage the first slice's last element
        f.seek(entry.offset + entry.size - 4)
        f.write(b"\x00\x00\x80\x7f")
    device = _device(backend)
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        with pytest.raises(gpuckpt.ChecksumError, match="pv"):
            ckpt.restore(regions={"pv": np.s_[0:5]}, device=device)  # holds the first slice whole
        got = _as_numpy(ckpt.restore(regions={"pv": np.s_[1:5, 5:]}, device=device)["pv"], backend, cupy)
        assert np.isinf(got[0, -1])  # cuts it: read unchecked
        got = _as_numpy(ckpt.restore(regions={"pv": np.s_[0:5]}, device=device, verify=False)["pv"], backend, cupy)
        assert np.isinf(got[1, -1])


def test_regions_into_a_single_allocation_and_copy_false_refused(cupy, tmp_path):
    a = np.arange(200, dtype=np.float32).reshape(20, 10)
    b = np.arange(30, dtype=np.int16)
    prefix = make_bundle({"a": a, "b": b}).write(str(tmp_path / "ck"))
    options = gpuckpt.RestoreOptions(single_allocation=True, staging_slot_bytes=256, staging_slots=4, io_threads=2)
    with gpuckpt.open(prefix, options=options) as ckpt:
        got = ckpt.restore(regions={"a": np.s_[3:9, ::-2], "b": np.s_[None, 5:]}, device="cuda")
        np.testing.assert_array_equal(cupy.asnumpy(got["a"]), a[3:9, ::-2])
        np.testing.assert_array_equal(cupy.asnumpy(got["b"]), b[None, 5:])
        with pytest.raises(gpuckpt.InvalidArgumentError, match="region"):
            ckpt.get_tensor("a", region=np.s_[0], copy=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partitioned_regions_with_dtype_and_out(cupy, backend, tmp_path):
    full = np.linspace(-2, 2, 9 * 6, dtype=np.float32).reshape(9, 6)
    parts = [
        ((slice(0, 4), slice(0, 3)), full[:4, :3]),
        ((slice(0, 4), slice(3, 6)), full[:4, 3:]),
        ((slice(4, 9), slice(None)), full[4:]),
    ]
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    device = _device(backend)
    with gpuckpt.open(prefix, options=OPTIONS) as ckpt:
        for key in (np.s_[0:4, 3:6], np.s_[4:9], np.s_[2:7, 1:5], np.s_[::-2, 4], np.s_[:], np.s_[None, ...]):
            for dtype in (None, np.float16, ml_dtypes.bfloat16):
                expected = np.asarray(full[key] if dtype is None else full[key].astype(dtype))
                got = ckpt.restore(regions={"pv": key}, dtype=dtype, device=device)["pv"]
                _same(_as_numpy(got, backend, cupy), expected, backend, (key, dtype))
        shape = full[2:7, 1:5].shape
        out = cupy.zeros(shape, np.float16) if backend == "cuda" else np.zeros(shape, np.float16)
        got = ckpt.restore(regions={"pv": np.s_[2:7, 1:5]}, dtype=np.float16, out={"pv": out}, device=device)["pv"]
        assert got is out
        np.testing.assert_array_equal(_as_numpy(out, backend, cupy), full[2:7, 1:5].astype(np.float16))

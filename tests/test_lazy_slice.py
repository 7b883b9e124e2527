"""``get_slice``: any basic index on stored and partitioned tensors equals numpy's answer, read
without a mapping, whichever way the reader plans (its runs, or stretches along an outer axis)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_regions import index_for  # any basic index, None axes too

import gpuckpt
from gpuckpt.host import lazy_slice

DTYPES = [np.float32, np.int16, np.uint8, np.float64]


@st.composite
def tensor_and_index(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(dtype).reshape(shape)
    return array, draw(index_for(shape))


def _slice_like_numpy(ckpt, name, array, key):
    """``get_slice(name)[key]`` checked against ``array[key]``: equal, or both IndexError (None)."""
    try:
        expected = array[key]
    except IndexError:
        with pytest.raises(IndexError):
            ckpt.get_slice(name)[key]
        return None
    got = ckpt.get_slice(name)[key]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    return got


STRATEGIES = {  # (READ_CALL_COST_BYTES, SPAN_READ_BYTES)
    "runs": (0, lazy_slice.SPAN_READ_BYTES),
    "model": (lazy_slice.READ_CALL_COST_BYTES, lazy_slice.SPAN_READ_BYTES),
    "span": (1 << 40, lazy_slice.SPAN_READ_BYTES),
    "span_row_by_row": (1 << 40, 1),
    "span_in_pieces": (1 << 40, 40),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=150, deadline=None)
@given(case=tensor_and_index())
def test_any_basic_index_matches_numpy(tmp_path_factory, strategy, case):
    array, key = case
    prefix = str(tmp_path_factory.mktemp("s") / "ckpt")
    gpuckpt.save(prefix, {"t": array})
    with gpuckpt.open(prefix) as ckpt, pytest.MonkeyPatch.context() as patch:
        patch.setattr(lazy_slice, "READ_CALL_COST_BYTES", STRATEGIES[strategy][0])
        patch.setattr(lazy_slice, "SPAN_READ_BYTES", STRATEGIES[strategy][1])
        got = _slice_like_numpy(ckpt, "t", array, key)
    if got is None:
        return
    owner = got if got.base is None else got.base
    assert got.flags.writeable and isinstance(owner, np.ndarray) and owner.flags.owndata  # not a file mapping


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_partitioned_tensors_match_numpy(tmp_path_factory, data):
    rows, cols = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 5))
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    cut = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=3)) if rows > 1 else []))
    bounds = [0, *cut, rows]
    parts = [((slice(a, b), slice(None)), full[a:b]) for a, b in itertools.pairwise(bounds)]
    prefix = str(tmp_path_factory.mktemp("p") / "ckpt")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned(full.shape, parts)})
    key = data.draw(index_for(full.shape))
    with gpuckpt.open(prefix) as ckpt:
        _slice_like_numpy(ckpt, "pv", full, key)


def _preadv_calls(monkeypatch, after=None) -> list[int]:
    """The size of every preadv the reader makes from now on; ``after()`` runs after each."""
    sizes: list[int] = []
    real = os.preadv

    def counting(fd, buffers, offset):
        sizes.append(sum(len(memoryview(b)) for b in buffers))
        got = real(fd, buffers, offset)
        if after is not None:
            after()
        return got

    monkeypatch.setattr(os, "preadv", counting)
    return sizes


def test_a_column_of_a_wide_matrix_reads_one_element_per_row(tmp_path, monkeypatch):
    wide = np.arange(4 * 100_000, dtype=np.float32).reshape(4, 100_000)
    gpuckpt.save(str(tmp_path / "w"), {"wide": wide})
    with gpuckpt.open(str(tmp_path / "w")) as ckpt:
        sizes = _preadv_calls(monkeypatch)
        np.testing.assert_array_equal(ckpt.get_slice("wide")[:, 7], wide[:, 7])
    assert sizes == [4, 4, 4, 4]


def test_a_column_of_a_tall_matrix_reads_one_span_in_pieces(tmp_path, monkeypatch):
    tall = np.arange(100_000 * 4, dtype=np.float32).reshape(100_000, 4)
    gpuckpt.save(str(tmp_path / "t"), {"tall": tall})
    with gpuckpt.open(str(tmp_path / "t")) as ckpt:
        sizes = _preadv_calls(monkeypatch)
        np.testing.assert_array_equal(ckpt.get_slice("tall")[10:20_000, 3], tall[10:20_000, 3])
    assert sizes == [(20_000 - 1 - 10) * 16 + 4]  # from the first element wanted to the last
    monkeypatch.setattr(lazy_slice, "SPAN_READ_BYTES", 100_000)  # 6250 rows of 16 bytes a piece
    sizes.clear()
    with gpuckpt.open(str(tmp_path / "t")) as ckpt:
        np.testing.assert_array_equal(ckpt.get_slice("tall")[20_000:10:-1, 1], tall[20_000:10:-1, 1])
    assert sizes == [(6250 - 1) * 16 + 4] * 3 + [(19_990 - 3 * 6250 - 1) * 16 + 4]


def test_rows_read_as_one_run(tmp_path, monkeypatch):
    embedding = np.arange(5000 * 8, dtype=np.float32).reshape(5000, 8)
    gpuckpt.save(str(tmp_path / "e"), {"e": embedding})
    with gpuckpt.open(str(tmp_path / "e")) as ckpt:
        sizes = _preadv_calls(monkeypatch)
        np.testing.assert_array_equal(ckpt.get_slice("e")[1000:2000], embedding[1000:2000])
    assert sizes == [1000 * 8 * 4]


def test_no_mapping_is_made_by_slicing(tmp_path):
    gpuckpt.save(str(tmp_path / "m"), {"m": np.ones((3, 3))})
    with gpuckpt.open(str(tmp_path / "m")) as ckpt:
        ckpt.get_slice("m")[1:, :2]
        ckpt.restore()
        maps = open("/proc/self/maps").read()
    assert os.path.basename(str(tmp_path / "m.data-00000-of-00001")) not in maps


def test_a_truncation_racing_an_unchecked_read_is_an_error(tmp_path, monkeypatch):
    """The read itself succeeded (Linux may hand out a zeroed page tail instead of a short read);
    the size check after it sees the truncation, so no unchecked bytes are returned."""
    prefix = str(tmp_path / "r")
    gpuckpt.save(prefix, {"r": np.arange(1000, dtype=np.float32)})
    data_file = prefix + ".data-00000-of-00001"
    original = open(data_file, "rb").read()
    with gpuckpt.open(prefix) as ckpt:
        _preadv_calls(monkeypatch, after=lambda: os.truncate(data_file, 100))  # each read succeeds, then
        with pytest.raises(gpuckpt.FormatError, match="shrank from 4000 to 100 bytes") as info:
            ckpt.get_slice("r")[10:20]
        assert "tensor 'r'" in str(info.value)
        with open(data_file, "r+b") as f:
            f.write(original)
        with pytest.raises(gpuckpt.FormatError, match="shrank"):
            ckpt.restore(verify=False)  # unverified whole reads get the same check


def _partitioned_bundle(tmp_path, shape, boxes):
    """A bundle whose tensor 'pv' declares ``shape`` and saves the row ranges ``boxes`` (each
    ``(start, length)`` on axis 0, the other axes whole), each filled with its number: the index
    may lie, the writer would refuse it."""
    from bundle_builder import make_bundle

    from gpuckpt._proto import tensor_bundle_pb2
    from gpuckpt.format.slices import Extent, slice_key

    bundle = make_bundle({f"part{i}": np.full((n, *shape[1:]), i, np.float32) for i, (_, n) in enumerate(boxes)})
    full = tensor_bundle_pb2.BundleEntryProto(dtype=1)
    for dim in shape:
        full.shape.dim.add().size = dim
    for i, (start, length) in enumerate(boxes):
        saved = (Extent(start, length),) + (Extent(0, None),) * (len(shape) - 1)
        bundle.entries[slice_key(b"pv", saved)] = bundle.entries.pop(f"part{i}".encode())
        extents = full.slices.add()
        extents.extent.add(start=start, length=length)
        for _ in shape[1:]:
            extents.extent.add()
    bundle.entries[b"pv"] = full
    return bundle.write(str(tmp_path / "lie"))


def test_a_region_the_saved_slices_cannot_fill_is_refused_before_it_is_allocated(tmp_path):
    """A declared shape of 16 TiB with 64 bytes saved: the same FormatError as restore, no
    MemoryError; regions the saved slices do fill still read."""
    prefix = _partitioned_bundle(tmp_path, (2**40, 4), [(0, 2), (2, 2)])
    with gpuckpt.open(prefix) as ckpt:
        with pytest.raises(gpuckpt.FormatError, match="sufficient slices") as whole:
            ckpt.restore()
        assert "tensor 'pv'" in str(whole.value)
        for key in (np.s_[:], np.s_[3:5], np.s_[::-1], np.s_[2**39, 1]):
            with pytest.raises(gpuckpt.FormatError, match="sufficient slices.*region") as info:
                ckpt.get_slice("pv")[key]
            assert "tensor 'pv'" in str(info.value) and prefix + ".index" in str(info.value)
        np.testing.assert_array_equal(ckpt.get_slice("pv")[1:4, ::2], [[0, 0], [1, 1], [1, 1]])
        assert ckpt.get_slice("pv")[5:5].shape == (0, 4)


def test_overlapping_saved_slices_are_refused_where_a_region_meets_both(tmp_path):
    prefix = _partitioned_bundle(tmp_path, (6, 3), [(0, 3), (2, 4)])  # rows 2 saved twice
    with gpuckpt.open(prefix) as ckpt:
        with pytest.raises(gpuckpt.FormatError, match="overlap") as info:
            ckpt.get_slice("pv")[1:4]
        assert "tensor 'pv'" in str(info.value)
        np.testing.assert_array_equal(ckpt.get_slice("pv")[4:], np.ones((2, 3)))


@pytest.mark.parametrize("key", [np.s_[:, ::2], np.s_[1:, -2::-3], np.s_[::-1, 5::2]])
def test_a_stepped_axis_with_stretches_over_a_mib_is_read_in_stretches(tmp_path, monkeypatch, key):
    """``restore(regions=)`` of every other element of 2 MiB rows: the rows are read as stretches
    of at most one buffer (SPAN_READ_BYTES) each (a few reads, no table of one offset per
    element), memory within the result plus that buffer, as ``get_slice`` reads them."""
    import tracemalloc

    wide = np.arange(4 * 524_288, dtype=np.float32).reshape(4, 524_288)
    gpuckpt.save(str(tmp_path / "w"), {"wide": wide})
    expected = wide[key]
    with gpuckpt.open(str(tmp_path / "w")) as ckpt:
        sizes = _preadv_calls(monkeypatch)
        tracemalloc.start()
        try:
            got = ckpt.restore(regions={"wide": key})["wide"]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(got, expected)
        assert len(sizes) <= 3 * len(expected) and max(sizes) <= lazy_slice.SPAN_READ_BYTES, sizes
        assert peak <= expected.nbytes + lazy_slice.SPAN_READ_BYTES + (256 << 10), peak
        np.testing.assert_array_equal(ckpt.get_slice("wide")[key], expected)
        # converted (dtype=) regions are read the same way, then converted
        np.testing.assert_array_equal(ckpt.restore(regions={"wide": key}, dtype=np.float64)["wide"], expected)


def test_cover_problem_counts_before_it_allocates():
    from gpuckpt.regions import cover_problem

    rows = [(slice(i, i + 1), slice(0, 3)) for i in range(100)]
    assert cover_problem((100, 3), rows) is None
    assert cover_problem((100, 3), rows[:10]) == "saved slices hold 30 of the region's 300 elements"
    assert cover_problem((2**60, 3), rows) == f"saved slices hold 300 of the region's {3 * 2**60} elements"
    twice = rows[:50] + [(slice(10, 11), slice(0, 3))] + rows[51:]  # 50 missing, 10 twice
    assert cover_problem((100, 3), twice) == "saved slices overlap"
    assert (
        cover_problem((4, 3), [(slice(0, 3), slice(0, 3)), (slice(2, 4), slice(0, 3))])
        == "saved slices overlap in the region (its parts 0 and 1)"
    )
    assert cover_problem((0, 3), []) is None

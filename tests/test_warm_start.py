"""Warm start on the host: ``restore(out=)`` reads straight into the given arrays, and new large
arrays come from the restore's own mapping (gpuckpt/host/arena.py). Correctness only; speed is
benchmarks/warm_start.py's."""

from __future__ import annotations

import gc
import itertools

import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import EXPECTED, FIXTURE_PREFIXES, assert_bit_exact, fixture_path

import gpuckpt
from gpuckpt.host import arena, reader
from gpuckpt.host.arena import owner_of
from gpuckpt.host.convert import convert
from gpuckpt.host.shards import ShardFiles
from gpuckpt.plan import contiguous_range

RNG = np.random.default_rng(7)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB and parts of 256 KiB: a 2 MB tensor is many chunks in several parts."""
    monkeypatch.setattr(reader, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(reader, "SPLIT_BYTES", 256 << 10)


@pytest.fixture
def reads(monkeypatch):
    """Counts every read of a data file."""
    calls = []
    original = ShardFiles.read_into

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardFiles, "read_into", counted)
    return calls


def _sentinel_like(value, dtype=None):
    """An array of ``value``'s shape and dtype (or ``dtype``) filled with 0xA5 bytes ("unset" for strings)."""
    shape = np.shape(value)
    dtype = np.dtype(dtype or np.asarray(value).dtype)
    if dtype.kind == "O":
        return np.full(shape, b"unset", dtype=object)
    return np.frombuffer(bytes([0xA5]) * (int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape).copy()


# -- out= is filled in place ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", FIXTURE_PREFIXES)
def test_out_is_filled_in_place_bit_for_bit(prefix):
    """Every tensor of every TF-written fixture (all dtypes, strings, partitioned, sharded)."""
    expected = EXPECTED[prefix]["tensors"]
    with gpuckpt.open(fixture_path(prefix)) as ckpt:
        out = {name: _sentinel_like(value, ckpt.info(name).dtype) for name, value in expected.items()}
        given = dict(out)
        got = ckpt.restore(list(expected), out=out, threads=2)
        fresh = ckpt.restore(list(expected), threads=2)
    for name, value in expected.items():
        assert got[name] is given[name], name
        assert_bit_exact(got[name], value, name)
        assert_bit_exact(fresh[name], value, name)


def test_large_tensors_are_read_into_out_in_parts(tmp_path, small_chunks, reads):
    values = {
        "f32": RNG.standard_normal((512, 1000)).astype(np.float32),  # 2 MB: 8 parts of 32 chunks
        "f64": RNG.standard_normal(70_001),
        "i8": RNG.integers(-128, 127, 300_001, dtype=np.int8),
        "tiny": np.arange(5, dtype=np.int32),
    }
    prefix = str(tmp_path / "ck")
    gpuckpt.save(prefix, values)
    out = {name: _sentinel_like(v) for name, v in values.items()}
    addresses = {name: a.ctypes.data for name, a in out.items()}
    with gpuckpt.open(prefix) as ckpt:
        for threads in (1, 3):
            for array in out.values():
                array[...] = _sentinel_like(array)
            got = ckpt.restore(out=out, threads=threads)
            for name, value in values.items():
                assert got[name] is out[name] and got[name].ctypes.data == addresses[name]
                assert got[name].tobytes() == value.tobytes(), (name, threads)
    # Every large piece went to the data file straight from its place in the out= array.
    lows = {name: a.ctypes.data for name, a in out.items() if a.nbytes > 1 << 16}
    highs = {name: a.ctypes.data + a.nbytes for name, a in out.items() if a.nbytes > 1 << 16}
    for args in reads:
        view = args[2]
        address = np.frombuffer(view, np.uint8).ctypes.data if len(view) else None
        if address is not None and len(view) >= 1 << 16:
            assert any(lows[n] <= address < highs[n] for n in lows), "a large read went through a temporary"


def test_async_restore_into_out_returns_the_same_arrays(tmp_path):
    values = {"w": RNG.standard_normal((300, 1000)).astype(np.float32)}
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    out = {"w": np.zeros((300, 1000), np.float32)}
    with gpuckpt.open(prefix) as ckpt:
        future = ckpt.restore_async(out=out)
        assert future.wait("w") is out["w"]
        assert future.result()["w"] is out["w"]
    assert out["w"].tobytes() == values["w"].tobytes()


def test_checksum_error_into_out(tmp_path, small_chunks):
    values = RNG.standard_normal(600_000).astype(np.float32)
    bundle = make_bundle({"big": values, "small": np.arange(3, dtype=np.int8)})
    bundle.shards[0][bundle.entries[b"big"].offset + 1_000_001] ^= 0x10
    prefix = bundle.write(str(tmp_path / "bad"))
    out = {"big": np.zeros_like(values)}
    with gpuckpt.open(prefix) as ckpt:
        with pytest.raises(gpuckpt.ChecksumError, match="'big'"):
            ckpt.restore(out=out, threads=2)
        assert ckpt.restore(["small"])["small"].tolist() == [0, 1, 2]


# -- refusals, before anything is read or written ---------------------------------------------------


def _refusal_cases():
    base = np.zeros((40, 60), np.float32)
    read_only = np.zeros((20, 30), np.float32)
    read_only.flags.writeable = False
    return {
        "read-only": (read_only, "read-only"),
        "not C-contiguous": (base[::2, ::2], "not C-contiguous"),
        "Fortran order": (np.asfortranarray(np.zeros((20, 30), np.float32)), "not C-contiguous"),
        "a list": ([[0.0] * 30] * 20, "not a numpy array"),
        "wrong shape": (np.zeros((30, 20), np.float32), "nothing was written"),
        "wrong dtype": (np.zeros((20, 30), np.float64), "nothing was written"),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_unusable_out_arrays_are_refused_before_any_read_or_write(tmp_path, reads, case):
    values = {"a": RNG.standard_normal((20, 30)).astype(np.float32), "b": np.arange(7, dtype=np.int64)}
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    bad, message = _refusal_cases()[case]
    good = np.full(7, -1, np.int64)
    with gpuckpt.open(prefix) as ckpt:
        del reads[:]
        with pytest.raises(ValueError) as info:
            ckpt.restore(["b", "a"], out={"a": bad, "b": good})
        assert message in str(info.value) and "'a'" in str(info.value)
        if "wrong" not in case:  # shape and dtype: the ValueError every backend raises
            assert isinstance(info.value, gpuckpt.InvalidArgumentError)
        assert not reads
        assert (good == -1).all()
        if isinstance(bad, np.ndarray):
            assert (bad == 0).all()


def test_an_undefined_conversion_is_refused_before_out_is_touched(tmp_path, reads):
    prefix = gpuckpt.save(str(tmp_path / "ck"), {"i": np.arange(4, dtype=np.int32), "f": np.ones(3, np.float32)})
    out = {"f": np.zeros(3, np.float16)}
    with gpuckpt.open(prefix) as ckpt:
        del reads[:]
        with pytest.raises(ValueError, match="nothing was written"):
            ckpt.restore(out={"f": np.zeros(3, np.float32)}, dtype=np.float16)
        assert not reads
        assert ckpt.restore(["f"], out=out, dtype=np.float16)["f"] is out["f"]
    assert (out["f"] == 1).all()


# -- dtype=, big-endian, narrow ints, strings, partitioned ------------------------------------------


@pytest.mark.parametrize("big_endian", [False, True])
def test_dtype_converts_chunk_by_chunk_into_out_and_fresh(tmp_path, small_chunks, big_endian):
    values = {
        "bf16": RNG.standard_normal((700, 1000)).astype(ml_dtypes.bfloat16),  # 1.4 MB
        "f64": RNG.standard_normal(200_001) * 1e30,  # infinity in float16, finite in bfloat16
        "f16": RNG.standard_normal(300_000).astype(np.float16),
        "small": RNG.standard_normal(10).astype(np.float32),
        "ints": np.arange(300_000, dtype=np.int32),
    }
    values["f64"][:5] = [np.nan, -np.inf, 0.0, -0.0, 5e-324]
    prefix = make_bundle(values, big_endian=big_endian).write(str(tmp_path / "ck"))
    for target in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64):
        want = {n: convert(v, np.dtype(target), n) if v.dtype.kind != "i" else v for n, v in values.items()}
        with gpuckpt.open(prefix) as ckpt:
            fresh = ckpt.restore(dtype=target, threads=2)
            out = {n: _sentinel_like(w) for n, w in want.items()}
            into = ckpt.restore(dtype=target, out=out, threads=3)
        for name, value in want.items():
            assert fresh[name].dtype == value.dtype and fresh[name].tobytes() == value.tobytes(), (name, target)
            assert into[name] is out[name] and into[name].tobytes() == value.tobytes(), (name, target)


def test_big_endian_bundles_fixed_up_in_place(tmp_path, small_chunks):
    values = {
        "f32": RNG.standard_normal(400_003).astype(np.float32),
        "c64": (RNG.standard_normal(200_000) + 1j * RNG.standard_normal(200_000)).astype(np.complex64),
        "c128": RNG.standard_normal(5) + 1j,
        "i16": RNG.integers(-30000, 30000, 700_000).astype(np.int16),
        "bf16": RNG.standard_normal(600_000).astype(ml_dtypes.bfloat16),
        "u64": RNG.integers(0, 2**63, 9, dtype=np.uint64),
    }
    prefix = make_bundle(values, big_endian=True).write(str(tmp_path / "be"))
    out = {n: _sentinel_like(v) for n, v in values.items()}
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.big_endian
        fresh = ckpt.restore(threads=2)
        into = ckpt.restore(out=out, threads=2)
    for name, value in values.items():
        assert fresh[name].tobytes() == value.tobytes(), name
        assert into[name] is out[name] and into[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("dtype, bits", [(29, 4), (30, 4), (31, 2), (32, 2)])
def test_narrow_ints_have_their_high_bits_cleared_in_place(tmp_path, small_chunks, dtype, bits):
    import gpuckpt.dtypes

    numpy_type = gpuckpt.dtypes.DTYPES[dtype].numpy
    raw = {"big": RNG.integers(0, 256, 700_001, dtype=np.uint8), "small": RNG.integers(0, 256, 33, dtype=np.uint8)}
    prefix = make_bundle(raw, dtypes={"big": dtype, "small": dtype}).write(str(tmp_path / "narrow"))
    out = {n: np.full(v.shape, 0xFF, np.uint8).view(numpy_type) for n, v in raw.items()}
    with gpuckpt.open(prefix) as ckpt:
        fresh = ckpt.restore(threads=2)
        into = ckpt.restore(out=out, threads=2)
    for name, value in raw.items():
        want = (value & ((1 << bits) - 1)).tobytes()
        assert fresh[name].dtype == numpy_type and fresh[name].tobytes() == want, name
        assert into[name] is out[name] and into[name].tobytes() == want, name


def test_strings_into_out_any_layout(tmp_path):
    words = np.array([[b"a", b"", b"ccc"], [b"dd" * 50, b"\x00e", b"f"]], dtype=object)
    prefix = make_bundle({"s": words, "scalar": np.array(b"one", dtype=object)}).write(str(tmp_path / "s"))
    holder = np.full((4, 6), b"-", dtype=object)
    out = {"s": holder[::2, ::2], "scalar": np.array(b"", dtype=object)}  # a strided view is fine for strings
    with gpuckpt.open(prefix) as ckpt:
        got = ckpt.restore(out=out)
    assert got["s"] is out["s"] and got["s"].tolist() == words.tolist()
    assert holder[1].tolist() == [b"-"] * 6  # the rows between untouched
    assert got["scalar"] is out["scalar"] and got["scalar"][()] == b"one"


@pytest.mark.parametrize("axis", [0, 1])
def test_partitioned_tensors_fill_their_regions_of_out(tmp_path, small_chunks, reads, axis):
    full = RNG.standard_normal((600, 700)).astype(np.float32)  # 1.68 MB, parts over 256 KiB each
    cuts = [0, 150, 151, 400, full.shape[axis]]
    parts = []
    for low, high in itertools.pairwise(cuts):
        region = [slice(None), slice(None)]
        region[axis] = slice(low, high)
        parts.append((tuple(region), np.ascontiguousarray(full[tuple(region)])))
    prefix = gpuckpt.save(str(tmp_path / "p"), {"p": gpuckpt.Partitioned(full.shape, parts), "x": np.ones(3)})
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.info("p").partitioned
        out = {"p": _sentinel_like(full)}
        del reads[:]
        got = ckpt.restore(out=out, threads=3)
        assert got["p"] is out["p"] and got["p"].tobytes() == full.tobytes()
        if axis == 0:  # rows: each part's bytes are one run of the full tensor, read into place
            start, end = out["p"].ctypes.data, out["p"].ctypes.data + full.nbytes
            big_reads = [np.frombuffer(a[2], np.uint8).ctypes.data for a in reads if len(a[2]) >= 1 << 16]
            assert big_reads and all(start <= address < end for address in big_reads)
        fresh = ckpt.restore(threads=2)
        assert fresh["p"].tobytes() == full.tobytes()
        half = ckpt.restore(["p"], dtype=np.float16, out={"p": np.zeros(full.shape, np.float16)})["p"]
        assert half.tobytes() == convert(full, np.dtype(np.float16), "p").tobytes()


@pytest.mark.parametrize(
    "shape", [(3, 4, 5), (1, 6), (4,), (), (2, 0, 3), (2, 1, 3)], ids=lambda s: "x".join(map(str, s)) or "scalar"
)
def test_contiguous_range_matches_numpy_for_every_box(shape):
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    ranges = [[(low, high) for low in range(size + 1) for high in range(low, size + 1)] for size in shape]
    for box in itertools.product(*ranges):
        picked = flat[tuple(slice(a, b) for a, b in box)].reshape(-1)
        span = contiguous_range(shape, box)
        if span is None:
            assert picked.size > 1 and not (np.diff(picked) == 1).all(), box
        else:
            assert list(range(*span)) == picked.tolist(), box
    assert contiguous_range(shape, None) == (0, flat.size)


# -- new arrays: the restore's own mapping ---------------------------------------------------------


def _resident_kib(address):
    """Rss of the mapping holding ``address`` in this process (None if nothing is mapped there)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":") and "-" in fields[0]:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                inside = low <= address < high
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    return None


@pytest.mark.skipif(not arena._HAVE_MADVISE, reason="needs mmap.madvise")
def test_large_new_arrays_own_their_mapping_and_free_it_with_the_last_view(tmp_path):
    values = {
        "a": RNG.standard_normal((1000, 1000)).astype(np.float32),  # 4 MB
        "b": RNG.standard_normal(3_000_000),  # 24 MB
        "small": np.arange(10, dtype=np.float32),
    }
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    with gpuckpt.open(prefix) as ckpt:
        got = ckpt.restore(threads=2)
    for name, value in values.items():  # the checkpoint is closed: the arrays stay valid
        assert got[name].tobytes() == value.tobytes()
        assert got[name].flags.writeable and got[name].flags.c_contiguous
    assert got["small"].flags.owndata  # small tensors: numpy's allocator
    assert isinstance(owner_of(got["b"]), memoryview) and owner_of(got["a"]) is not owner_of(got["b"])
    address = got["a"].ctypes.data
    assert address % arena.HUGE_PAGE == 0  # the first tensor starts on a huge page boundary
    got["a"][...] = 1  # writeable, and writing does not touch the other tensor
    assert got["b"].tobytes() == values["b"].tobytes()
    resident = _resident_kib(address)
    assert resident is not None and resident >= (4_000_000 + 24_000_000) // 1024

    b_view = got["b"][10:20]
    del got["b"]
    gc.collect()
    assert b_view.tolist() == values["b"][10:20].tolist()  # a view keeps the tensor's memory
    assert _resident_kib(address) >= resident - 8 * 1024
    del b_view
    gc.collect()
    assert _resident_kib(address) <= resident - 23_000  # its 24 MB went back to the system at once
    row = got.pop("a")[3]
    gc.collect()
    assert _resident_kib(address) is not None and (row == 1).all()
    del row
    gc.collect()
    assert _resident_kib(address) is None  # the last view died: the mapping is gone


def test_new_arrays_survive_an_exception_midway_without_leaking(tmp_path):
    """A failed restore drops its mapping with its arrays."""
    values = RNG.standard_normal(2_000_000).astype(np.float32)
    bundle = make_bundle({"big": values})
    bundle.shards[0][bundle.entries[b"big"].offset + 5] ^= 1
    prefix = bundle.write(str(tmp_path / "bad"))
    with gpuckpt.open(prefix) as ckpt:
        for _ in range(5):
            with pytest.raises(gpuckpt.ChecksumError):
                ckpt.restore()
    gc.collect()
    with open("/proc/self/maps") as f:
        maps = f.read().count("\n")
    with gpuckpt.open(prefix) as ckpt:
        for _ in range(20):
            with pytest.raises(gpuckpt.ChecksumError):
                ckpt.restore()
    gc.collect()
    with open("/proc/self/maps") as f:
        assert f.read().count("\n") <= maps + 2


def test_no_mapping_to_be_had_falls_back_to_numpy(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(arena.mmap, "mmap", refuse)
    arrays = arena.new_arrays([((1000, 1000), np.dtype(np.float32)), ((3,), np.dtype(np.int8))])
    assert [a.shape for a in arrays] == [(1000, 1000), (3,)] and all(a.flags.owndata for a in arrays)

"""The GPU tests: every dtype and conversion against the host path bit for bit, out=, device maps,
async restore, out-of-memory and leaks, run through the real ``gpuckpt.cuda.CudaDevice``. On a
machine with a GPU and CuPy they use them; elsewhere (CI) on the CuPy double in tests/cupy_double,
which keeps CuPy's and CUDA's rules (dtype checks, stream ordering, the memory pool, several
devices). Marked ``gpu``."""

from __future__ import annotations

import gc
import os

import cupy_double
import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import fixture_path

import gpuckpt
from gpuckpt.cuda import cuda_available

pytestmark = [pytest.mark.gpu]
REAL_GPU = cuda_available()  # decided before the double can be installed


@pytest.fixture(scope="module", autouse=True)
def cupy_backend():
    """The real CuPy on a GPU, else the double with two devices, for this module's tests."""
    if REAL_GPU:
        import cupy

        yield cupy
        return
    with cupy_double.installed(device_count=2) as cupy:
        yield cupy


FLOATS = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def _all_bit_patterns(np_type):
    dtype = np.dtype(np_type)
    if dtype.itemsize <= 2:
        return np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)
    rng = np.random.default_rng(0)
    return rng.integers(0, 2 ** (8 * dtype.itemsize) - 1, 1 << 20, dtype=f"u{dtype.itemsize}").view(dtype)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tensors = {
        f"{np.dtype(t).name}": _all_bit_patterns(t) for t in FLOATS + [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
    }
    tensors.update(
        {
            "i64": np.arange(-5, 5, dtype=np.int64),
            "u8": np.arange(256, dtype=np.uint8),
            "c64": (np.arange(10) + 1j).astype(np.complex64),
            "bool": np.array([True, False]),
        }
    )
    return make_bundle(tensors, num_shards=2).write(str(tmp_path_factory.mktemp("gpu") / "ck"))


def _same(device_array, host_array, name):
    """The host path's bytes, in the dtype a CuPy array of the tensor has (the host dtype, or its
    bytes' unsigned type for float8 and the other types CuPy has no C type for)."""
    import cupy

    from gpuckpt.cuda import cuda_device

    got = cupy.asnumpy(device_array)
    assert got.dtype == cuda_device(0).array_dtype(host_array.dtype), name
    assert got.tobytes() == host_array.tobytes(), name


FLOAT8 = ["float8_e4m3fn", "float8_e5m2"]


@pytest.mark.parametrize("single_allocation", [False, True])
def test_every_dtype_matches_host(bundle, single_allocation):
    options = gpuckpt.RestoreOptions(single_allocation=single_allocation)
    with gpuckpt.open(bundle, options=options) as ckpt:
        names = [n for n in ckpt.keys() if n not in FLOAT8]
        host = ckpt.restore(names)
        for verify in (True, False):
            device = ckpt.restore(names, device="cuda", verify=verify)
            for name, value in host.items():
                _same(device[name], value, name)


@pytest.mark.parametrize("name", FLOAT8)
def test_float8_converts_with_dtype_exactly_as_on_the_host(bundle, name):
    with gpuckpt.open(bundle) as ckpt:
        for target in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
            _same(ckpt.get_tensor(name, device="cuda", dtype=target), ckpt.get_tensor(name, dtype=target), name)


@pytest.fixture(scope="module")
def narrow_bundle(tmp_path_factory):
    """float8 of every bit pattern; int4 and uint4 stored with their unused high bits set, as TF
    may store them (the host path clears them, FORMAT.md 3.7)."""
    tensors = {name: _all_bit_patterns(getattr(ml_dtypes, name)) for name in FLOAT8}
    tensors["i4"] = np.array([-1, 7, -8, 0, 3], np.int8)  # 0xff, 0x07, 0xf8, ...
    tensors["u4"] = np.array([0xF1, 0x0F, 0x30], np.uint8)
    tensors["f32"] = np.linspace(-1, 1, 100, dtype=np.float32)
    return make_bundle(tensors, dtypes={"i4": 29, "u4": 30}).write(str(tmp_path_factory.mktemp("narrow") / "ck"))


@pytest.mark.parametrize("single_allocation", [False, True], ids=["one_per_tensor", "single_allocation"])
def test_types_cupy_cannot_hold_arrive_as_their_bytes(narrow_bundle, single_allocation):
    """float8, int4, ...: a uint8 CuPy array of the tensor's shape holding exactly the bytes of the
    host path's ml_dtypes array, in both allocation modes, exportable with DLPack (PyTorch:
    ``torch.from_dlpack(a).view(torch.float8_e4m3fn)``)."""
    import cupy

    options = gpuckpt.RestoreOptions(single_allocation=single_allocation)
    with gpuckpt.open(narrow_bundle, options=options) as ckpt:
        host = ckpt.restore()
        device = ckpt.restore(device="cuda")
    for name in FLOAT8 + ["i4", "u4"]:
        array = device[name]
        assert array.dtype == np.uint8 and array.shape == host[name].shape, name
        got = cupy.asnumpy(array)
        assert got.tobytes() == host[name].tobytes(), name
        assert (got.view(host[name].dtype) == host[name]).all() or name in FLOAT8, name  # float8 has NaNs
        array.__dlpack__()
    _same(device["f32"], host["f32"], "f32")


def test_a_strided_out_array_is_refused_before_anything_is_written(bundle):
    import cupy

    with gpuckpt.open(bundle) as ckpt:
        size = ckpt.info("float32").shape[0]
        backing = cupy.full((2 * size,), -1.0, cupy.float32)
        with pytest.raises(gpuckpt.CheckpointError, match="contiguous"):
            ckpt.restore(["float16", "float32"], device="cuda", out={"float32": backing[::2]})
    assert (cupy.asnumpy(backing) == -1).all()


@pytest.mark.parametrize("target", FLOATS)
def test_every_conversion_matches_host(bundle, target):
    with gpuckpt.open(bundle) as ckpt:
        host = ckpt.restore(dtype=target)
        device = ckpt.restore(device="cuda", dtype=target)
        for name, value in host.items():
            _same(device[name], value, name)


def test_big_endian_and_partitioned_on_gpu(tmp_path):
    tensors = {"f": np.linspace(-2, 2, 1001, dtype=np.float32), "h": np.arange(9, dtype=np.float16)}
    prefix = make_bundle(tensors, big_endian=True).write(str(tmp_path / "be"))
    with gpuckpt.open(prefix) as ckpt:
        for name, value in ckpt.restore(device="cuda").items():
            _same(value, tensors[name], name)
    with gpuckpt.open(fixture_path("tf1_partitioned")) as ckpt:
        _same(ckpt.get_tensor("pv", device="cuda"), ckpt.get_tensor("pv"), "pv")


def test_out_async_and_dlpack(bundle):
    import cupy

    with gpuckpt.open(bundle) as ckpt:
        out = {"float32": cupy.zeros(ckpt.info("float32").shape, cupy.float32)}
        result = ckpt.restore(["float32"], device="cuda", out=out)
        assert result["float32"] is out["float32"]
        future = ckpt.restore_async(device="cuda")
        first = future.wait("float16")
        assert future.ready("float16")
        _same(first, ckpt.get_tensor("float16"), "float16")
        future.result()
        if not REAL_GPU:  # the double exports no capsule a framework could take
            result["float32"].__dlpack__()
            return
        torch = pytest.importorskip("torch")
        tensor = torch.from_dlpack(result["float32"])
        assert tensor.data_ptr() == result["float32"].data.ptr  # no copy


def test_device_map_over_available_gpus(bundle):
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    placement = {"float": "cuda:0", "": f"cuda:{count - 1}"}
    with gpuckpt.open(bundle) as ckpt:
        arrays = ckpt.restore(device=placement)
        assert arrays["float32"].device.id == 0 and arrays["u8"].device.id == count - 1
        balanced = ckpt.restore(device=[f"cuda:{i}" for i in range(count)])
        for name, value in ckpt.restore().items():
            _same(balanced[name], value, name)


@pytest.mark.parametrize("where", ["before_start", "mid_restore"])
def test_out_of_memory_is_typed_and_leaks_nothing(bundle, monkeypatch, where):
    """Refused by the free-memory check, or (check blinded) by the allocator part-way through."""
    import cupy

    from gpuckpt.cuda import cuda_device
    from gpuckpt.cuda.device import CudaDevice

    if where == "mid_restore":
        monkeypatch.setattr(CudaDevice, "free_bytes", lambda self: 1 << 50)

    pool = cupy.get_default_memory_pool()
    pinned = cupy.get_default_pinned_memory_pool()
    with gpuckpt.open(bundle) as ckpt:
        ckpt.restore(device="cuda")  # warms the pinned pool: the staging ring's blocks are now free in it
        gc.collect()
        # The pool serves cached chunks before it looks at the limit, and the warm-up left chunks
        # of every size this restore asks for: without this, nothing would run out.
        pool.free_all_blocks()
        before, free_pinned_blocks = pool.used_bytes(), pinned.n_free_blocks()
        pool.set_limit(size=pool.total_bytes() + (64 << 10))
        try:
            for _ in range(20):  # each failure pays the pool's gc.collect()
                with pytest.raises(gpuckpt.DeviceMemoryError, match="bytes"):
                    ckpt.restore(device="cuda")
        finally:
            pool.set_limit(size=0)
    gc.collect()
    assert pool.used_bytes() == before
    assert cuda_device(0).pinned_live == 0
    assert pinned.n_free_blocks() == free_pinned_blocks  # every staging block went back to the pool


def test_checksum_failure_frees_device_memory(tmp_path):
    import cupy

    bundle = make_bundle({"a": np.ones(1 << 20, np.float32), "b": np.ones(1 << 20, np.float32)})
    entry = bundle.entries[b"b"]
    bundle.shards[0][entry.offset + 123] ^= 1
    prefix = bundle.write(str(tmp_path / "bad"))
    pool = cupy.get_default_memory_pool()
    gc.collect()
    before = pool.used_bytes()
    with gpuckpt.open(prefix) as ckpt:
        for _ in range(50):
            with pytest.raises(gpuckpt.ChecksumError, match="'b'"):
                ckpt.restore(device="cuda")
    gc.collect()
    assert pool.used_bytes() == before


def test_eight_threads_restore_to_the_gpu_at_once(bundle):
    import concurrent.futures

    with gpuckpt.open(bundle) as shared:
        names = [n for n in shared.keys() if n not in FLOAT8]
        host = shared.restore(names)

        def work(i):
            if i % 2:
                return shared.restore(names, device="cuda")
            with gpuckpt.open(bundle) as own:
                return own.restore(names, device="cuda")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
    for result in results:
        for name, value in host.items():
            _same(result[name], value, name)


def test_interrupt_and_truncation_mid_device_restore_release_everything(bundle, tmp_path):
    import shutil

    import cupy

    from gpuckpt.cuda import cuda_device

    pool = cupy.get_default_memory_pool()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with gpuckpt.open(bundle) as ckpt:
        gc.collect()
        before = pool.used_bytes()
        for _ in range(20):
            with pytest.raises(KeyboardInterrupt):
                ckpt.restore(device="cuda", progress=interrupt)
        gc.collect()
        assert pool.used_bytes() == before and cuda_device(0).pinned_live == 0
        assert len(ckpt.restore(device="cuda")) == len(ckpt.keys())  # still usable

    copy = str(tmp_path / "ck")
    with gpuckpt.open(bundle) as ckpt:
        files = ckpt.data_files() + [bundle + ".index"]
    for path in files:
        shutil.copy(path, copy + path[len(bundle) :])
    with gpuckpt.open(copy) as ckpt:
        os.truncate(ckpt.data_files()[0], 1000)
        with pytest.raises(gpuckpt.FormatError, match="short"):
            ckpt.restore(device="cuda")
    gc.collect()
    assert pool.used_bytes() == before and cuda_device(0).pinned_live == 0


def test_saving_cupy_arrays_streams_them_through_pinned_chunks(tmp_path, monkeypatch):
    import cupy

    from gpuckpt import download
    from gpuckpt.cuda import cuda_device

    monkeypatch.setattr(download, "CHUNK_BYTES", 1 << 16)
    rng = np.random.default_rng(0)
    host = {
        "f32": rng.standard_normal((700, 300)).astype(np.float32),
        "f16": rng.standard_normal(100_001).astype(np.float16),
        "strided": np.arange(30_000, dtype=np.int64).reshape(300, 100)[:, ::7],
    }
    gpuckpt.save(str(tmp_path / "s"), {name: cupy.asarray(value) for name, value in host.items()})
    with gpuckpt.open(str(tmp_path / "s")) as ckpt:
        got = ckpt.restore()  # crc32c verified
    for name, value in host.items():
        assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    assert cuda_device(0).pinned_live == 0

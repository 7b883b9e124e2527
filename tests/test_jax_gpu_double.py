"""gpuckpt.jax's GPU path on the CuPy double: the CuPy arrays the device pipeline fills, handed to
``jax.dlpack.from_dlpack`` (a model of JAX's consumer side, tests/cupy_double/dlpack_consumers.py,
patched in for these tests only), must give JAX arrays of the host path's dtype, shape and bits,
through the DLPack calls JAX makes. No GPU needed."""

from __future__ import annotations

import cupy_double
import numpy as np
import pytest

jax = pytest.importorskip("jax")
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
import gpuckpt.jax as gj  # noqa: E402

NARROW = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz"]
SUB_BYTE = ["int4", "uint4", "int2", "uint2", "float4_e2m1fn"]
NUMPY = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16", "float32", "complex64"]


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in NARROW + SUB_BYTE else np.dtype(name)


def _values(name: str, rng: np.random.Generator) -> np.ndarray:
    dtype = _dtype(name)
    if name == "bool":
        return rng.integers(0, 2, (5, 33)).astype(bool)
    if name in SUB_BYTE:  # one element per byte, every value the type has
        if "int" in name:
            info = ml_dtypes.iinfo(dtype)
            return rng.integers(int(info.min), int(info.max) + 1, (5, 33)).astype(dtype)
        return rng.integers(0, 16, (5, 33), dtype=np.uint8).view(dtype)
    raw = rng.integers(0, 256, 5 * 33 * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(5, 33)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    rng = np.random.default_rng(7)
    tensors = {name: _values(name, rng) for name in NARROW + SUB_BYTE + NUMPY}
    tensors["scalar"] = np.float32(1.5)
    tensors["empty"] = np.zeros((0, 3), np.float32)
    return gpuckpt.save(str(tmp_path_factory.mktemp("jaxgpu") / "ckpt"), tensors), tensors


@pytest.fixture
def jax_gpu(monkeypatch):
    """The CuPy double with two devices, and JAX seeing two GPUs whose DLPack import is the model."""
    with cupy_double.installed(device_count=2, memory_bytes=64 << 20):
        import dlpack_consumers

        model = dlpack_consumers.JaxModel.over(2)
        real_devices = jax.devices

        def devices(backend=None):
            if backend in ("gpu", "cuda"):
                return list(model.devices.values())
            return real_devices(backend)

        monkeypatch.setattr(jax, "devices", devices)
        monkeypatch.setattr(jax.dlpack, "from_dlpack", model.from_dlpack)
        yield model


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_every_type_jax_holds_arrives_with_the_host_paths_dtype_shape_and_bits(bundle, jax_gpu, device):
    """bfloat16 and float8 come from CuPy as unsigned integers of their width and are bit-cast;
    the sub-byte types (int4, uint4, int2, uint2, float4_e2m1fn) come as one byte per element,
    which ``bitcast_convert_type`` to a narrower type would split into a new trailing axis
    (jax/_src/lax/lax.py, _bitcast_convert_type_shape_rule: ``(*operand.shape, old_nbits //
    new_nbits)``)."""
    prefix, _ = bundle
    names = NARROW + SUB_BYTE + NUMPY + ["scalar", "empty"]
    with gpuckpt.open(prefix) as ckpt:
        host = gj.restore(ckpt, names, device="cpu")
        ours = gj.restore(ckpt, names, device=device)
    for name in names:
        assert ours[name].dtype == host[name].dtype, name
        assert ours[name].shape == host[name].shape, name
        assert np.asarray(ours[name]).tobytes() == np.asarray(host[name]).tobytes(), name


def test_jax_is_handed_the_cupy_array_itself_with_its_ready_stream(bundle, jax_gpu):
    """jax/_src/dlpack.py, from_dlpack: ``__dlpack_device__`` first, then ``__dlpack__(stream=
    device.get_stream_for_external_ready_events())`` and no max_version: the array itself must
    be given (a capsule has neither method and is a TypeError there), so that CuPy can order
    XLA's stream after its own."""
    prefix, _ = bundle
    with gpuckpt.open(prefix) as ckpt:
        gj.restore(ckpt, ["float32", "bfloat16"], device="cuda:1")
    stream = jax_gpu.devices[1].ready_stream
    assert jax_gpu.calls == [("__dlpack_device__", {}), ("__dlpack__", {"stream": stream})] * 2


def test_the_arrays_jax_imports_keep_cupys_memory_until_jax_frees_them(bundle, jax_gpu):
    """dlpack.pyx, _toDlpack: the capsule holds a reference to the exported array
    (``manager_ctx``, Py_INCREF) until the consumer calls its deleter; JAX calls it when its
    buffer goes (jaxlib/dlpack.cc, MakePjrtBuffer: ``on_delete_callback``)."""
    import cupy

    prefix, _ = bundle
    pool = cupy.get_default_memory_pool()
    with cupy.cuda.Device(1):
        before = pool.used_bytes()
    with gpuckpt.open(prefix) as ckpt:
        arrays = gj.restore(ckpt, ["float32", "int8"], device="cuda:1")
    import gc

    gc.collect()
    with cupy.cuda.Device(1):
        assert pool.used_bytes() > before  # the capsules' owners: the CuPy arrays JAX imported
    del arrays
    gc.collect()
    with cupy.cuda.Device(1):
        assert pool.used_bytes() == before


def test_a_type_cupy_lets_an_array_have_but_cannot_export_is_handed_over_as_bytes(jax_gpu):
    """float8_e4m3b11fnuz's type character is 'L' (uint64's), so CuPy's check_supported_dtype
    (cupy/_core/_dtype.pyx: ``dtype.type in all_type_chars_b``) lets an array have it, and the
    device pipeline restores into such an array; but dlpack.pyx,
    get_dlpack_dtype_code_itemsize refuses it (kind 'V', not bfloat16) with BufferError."""
    import cupy

    dtype = np.dtype(ml_dtypes.float8_e4m3b11fnuz)
    values = np.arange(256, dtype=np.uint8).view(dtype)
    array = cupy.empty(values.shape, dtype)
    array.view(cupy.uint8).set(values.view(np.uint8))
    with pytest.raises(BufferError, match="not supported for dlpack export"):
        array.__dlpack__()
    result = gj.from_dlpack(array, dtype)
    assert result.dtype == dtype and np.asarray(result).tobytes() == values.tobytes()


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e4m3b11fnuz", "int4", "uint4", "float4_e2m1fn"])
def test_a_converted_array_is_ready_before_the_view_of_cupys_memory_is_freed(bundle, jax_gpu, monkeypatch, name):
    """XLA's GPU client runs a view's DLPack deleter as soon as the view is dropped, not once the
    kernels reading it are done (PjRtStreamExecutorRawBuffer::DecrefAfter drops the buffer
    without waiting on its usage events: see gpuckpt.jax.from_dlpack), and the deleter hands the
    memory back to CuPy's pool; so the converted array must be waited for first. An array JAX
    takes as it is, is the view: not waited for, its deleter run only when it goes."""
    import gc

    from jax._src.array import ArrayImpl

    wait = ArrayImpl.block_until_ready

    def logged(self):
        jax_gpu.events.append(("block_until_ready", np.dtype(self.dtype).name))
        return wait(self)

    monkeypatch.setattr(ArrayImpl, "block_until_ready", logged)
    prefix, _ = bundle
    with gpuckpt.open(prefix) as ckpt:
        converted = gj.restore(ckpt, [name], device="cuda:0")
        gc.collect()
        assert [event for event, _ in jax_gpu.events] == ["block_until_ready", "on_delete_callback"]
        assert jax_gpu.events[0] == ("block_until_ready", name)
        assert converted[name].dtype == _dtype(name)
        jax_gpu.events.clear()
        taken = gj.restore(ckpt, ["float32"], device="cuda:0")
        gc.collect()
        assert jax_gpu.events == []
    del taken
    gc.collect()
    assert [event for event, _ in jax_gpu.events] == ["on_delete_callback"]

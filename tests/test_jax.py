"""gpuckpt.jax: every dtype as jax.Arrays bit for bit against the numpy path, zero-copy on the host,
64-bit types refused by name without jax_enable_x64, the DLPack path through numpy's export, the
nested-dict view by scope, and load_into for pytrees (sharded leaves keep their sharding, on 8
host devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="gpuckpt.jax needs JAX (pip install jax)")
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
import gpuckpt.jax as gj  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NARROW = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz"]
NARROW += ["int4", "uint4", "int2", "uint2", "float4_e2m1fn"]
NUMPY = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16", "float32", "complex64"]
WIDE = ["float64", "int64", "uint64", "complex128"]


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in NARROW else np.dtype(name)


def _values(name: str, rng: np.random.Generator) -> np.ndarray:
    dtype = _dtype(name)
    if name == "bool":
        return rng.integers(0, 2, (5, 33)).astype(bool)
    if name in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn"):  # one element per byte, low bits only
        info = ml_dtypes.iinfo(dtype) if "int" in name else None
        if info is not None:
            return rng.integers(int(info.min), int(info.max) + 1, (5, 33)).astype(dtype)
        return rng.integers(0, 16, (5, 33), dtype=np.uint8).view(dtype)
    raw = rng.integers(0, 256, 5 * 33 * dtype.itemsize, dtype=np.uint8)  # every kind of bit pattern
    return raw.view(dtype).reshape(5, 33)


def _bits(array) -> bytes:
    return np.asarray(array).tobytes()


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    rng = np.random.default_rng(5)
    tensors = {name: _values(name, rng) for name in NARROW + NUMPY + WIDE}
    tensors["words"] = np.array([b"x"], dtype=object)
    tensors["scalar"] = np.float32(1.5)
    return gpuckpt.save(str(tmp_path_factory.mktemp("jax") / "ckpt"), tensors), tensors


def test_import_gpuckpt_does_not_import_jax():
    code = (
        "import sys, gpuckpt, gpuckpt.mapping\nassert 'jax' not in sys.modules\n"
        "import gpuckpt.jax\nassert 'jax' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_dtype_jax_holds_equals_the_numpy_result_bit_for_bit(every_dtype):
    prefix, tensors = every_dtype
    names = NARROW + NUMPY + ["scalar"]
    with gpuckpt.open(prefix) as ckpt:
        ours = gj.restore(ckpt, names, device="cpu")
        reference = ckpt.restore(names)
        for name in names:
            assert isinstance(ours[name], jax.Array), name
            assert ours[name].dtype == reference[name].dtype and ours[name].shape == reference[name].shape, name
            assert _bits(ours[name]) == reference[name].tobytes(), name
        assert gj.get_tensor(ckpt, "bfloat16").dtype == _dtype("bfloat16")


def test_host_arrays_are_the_aligned_buffers_the_restore_filled(every_dtype, monkeypatch):
    prefix, _ = every_dtype
    seen = {}
    original = gpuckpt.Checkpoint.restore

    def spy(self, names=None, **kwargs):
        seen.update(kwargs.get("out") or {})
        return original(self, names, **kwargs)

    monkeypatch.setattr(gpuckpt.Checkpoint, "restore", spy)
    names = ["float32", "bfloat16", "float8_e4m3fn", "int8", "bool", "complex64"]
    with gpuckpt.open(prefix) as ckpt:
        arrays = gj.restore(ckpt, names, device="cpu")
    for name in names:
        assert seen[name].ctypes.data % gj.ALIGNMENT == 0
        assert arrays[name].unsafe_buffer_pointer() == seen[name].ctypes.data, name  # no copy


@pytest.mark.parametrize("name", WIDE)
def test_64_bit_types_need_x64_and_are_refused_by_name_before_any_read(every_dtype, name, monkeypatch):
    if gj.x64_enabled():
        pytest.skip("jax_enable_x64 is on")
    prefix, _ = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        monkeypatch.setattr(ckpt, "restore", lambda *a, **k: pytest.fail("read before the refusal"))
        with pytest.raises(gpuckpt.UnsupportedError, match="jax_enable_x64") as info:
            gj.restore(ckpt, ["float32", name], device="cpu")
        assert repr(name) in str(info.value)
        with pytest.raises(gpuckpt.UnsupportedError, match="string"):
            gj.restore(ckpt, ["words"], device="cpu")


def test_float64_converted_by_dtype_and_64_bit_types_with_x64(every_dtype):
    prefix, tensors = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        ours = gj.restore(ckpt, ["float64"], device="cpu", dtype="float32")["float64"]
        assert _bits(ours) == ckpt.get_tensor("float64", dtype="float32").tobytes()
    code = textwrap.dedent(
        f"""
        import numpy as np, jax, gpuckpt, gpuckpt.jax as gj
        jax.config.update("jax_enable_x64", True)
        with gpuckpt.open({prefix!r}) as ckpt:
            names = {WIDE!r}
            ours, ref = gj.restore(ckpt, names, device="cpu"), ckpt.restore(names)
            for n in names:
                assert ours[n].dtype == ref[n].dtype and np.asarray(ours[n]).tobytes() == ref[n].tobytes(), n
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["float32", "int8", "bool", "complex64", "bfloat16", "float8_e4m3fn"])
def test_the_dlpack_path_device_arrays_take(every_dtype, name):
    """The GPU path (CuPy arrays through DLPack; bfloat16/float8 as unsigned integers of their
    width, bit-cast) run with numpy arrays, which export DLPack on the host."""
    _, tensors = every_dtype
    expected = tensors[name]
    held = expected.dtype if name in NUMPY else np.dtype(f"u{expected.dtype.itemsize}")  # what CuPy holds
    array = gj.aligned_empty(expected.shape, held)
    array[...] = expected.view(held)
    result = gj.from_dlpack(array, expected.dtype)
    assert result.dtype == expected.dtype and _bits(result) == expected.tobytes()
    if name in NUMPY:
        assert result.unsafe_buffer_pointer() == array.ctypes.data  # the same memory


def test_devices_named_for_jax():
    assert gj._jax_device("cpu").platform == "cpu"
    assert gj._gpuckpt_device(jax.devices("cpu")[0]) == "cpu"
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(gpuckpt.DeviceUnavailableError):
            gj._jax_device("cuda:0")
    with pytest.raises(gpuckpt.InvalidArgumentError):
        gj._jax_device("tpu:7")


# -- trees ---------------------------------------------------------------------------------------------


def test_tree_by_scope():
    a, b, c = np.zeros(1), np.ones(2), np.ones(3)
    assert gj.tree({"encoder/layer_0/kernel": a, "encoder/layer_0/bias": b, "head": c}) == {
        "encoder": {"layer_0": {"kernel": a, "bias": b}},
        "head": c,
    }
    keras = {"model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": a}
    assert gj.tree(keras) == {"model": {"dense": {"kernel": a}}}
    with pytest.raises(gpuckpt.InvalidArgumentError, match="'a' is a tensor and 'a/b' is under it"):
        gj.tree({"a": a, "a/b": b})
    with pytest.raises(gpuckpt.InvalidArgumentError, match="'a/b'.*'a'"):
        gj.tree({"a/b": b, "a": a})
    assert gj.flatten({"x": {"y": a, "z": [b, c]}}) == {"x/y": a, "x/z/0": b, "x/z/1": c}


@pytest.fixture()
def flax_like(tmp_path):
    rng = np.random.default_rng(9)
    tensors = {
        "dense/kernel": rng.standard_normal((4, 8)).astype(np.float32),
        "dense/bias": rng.standard_normal(8).astype(np.float32),
        "norm/scale": rng.standard_normal(8).astype(np.float32),
        "global_step": np.int64(5),
        "dense/kernel/Adam": np.zeros((4, 8), np.float32),
    }
    return gpuckpt.save(str(tmp_path / "flax"), tensors), tensors


def test_restore_tree_and_load_into_a_pytree(flax_like):
    prefix, tensors = flax_like
    with gpuckpt.open(prefix) as ckpt:
        params = gj.restore_tree(ckpt, ckpt.model_keys(), device="cpu")
    assert set(params) == {"dense", "norm"} and set(params["dense"]) == {"kernel", "bias"}
    import jax.numpy as jnp

    initial = {
        "dense": {"kernel": jnp.zeros((4, 8), jnp.bfloat16), "bias": np.zeros(8, np.float32)},
        "norm": {"scale": jnp.zeros(8)},
    }
    new, report = gj.load_into(initial, prefix)  # same paths: no mapping needed
    assert report.ok and set(report.skipped) == {"global_step", "dense/kernel/Adam"}
    assert new["dense"]["kernel"].dtype == jnp.bfloat16
    with gpuckpt.open(prefix) as ckpt:
        assert _bits(new["dense"]["kernel"]) == ckpt.get_tensor("dense/kernel", dtype="bfloat16").tobytes()
    assert isinstance(new["dense"]["bias"], np.ndarray) and np.array_equal(new["dense"]["bias"], tensors["dense/bias"])
    assert _bits(new["norm"]["scale"]) == tensors["norm/scale"].tobytes()
    assert float(np.asarray(initial["norm"]["scale"]).sum()) == 0.0  # the old leaves are untouched

    wrong = {"dense": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(8)}, "extra": jnp.zeros(1)}
    with pytest.raises(gpuckpt.mapping.LoadError) as info:
        gj.load_into(wrong, prefix)
    result = info.value.result
    assert [m.target for m in result.mismatched_keys] == ["dense/kernel"]
    assert result.missing_keys == ["extra"] and result.unexpected_keys == ["norm/scale"]
    transposed = gpuckpt.mapping.NameMap(
        [
            gpuckpt.mapping.skip(kinds=gpuckpt.mapping.NOT_MODEL_KINDS),
            gpuckpt.mapping.rule("dense/kernel", "dense/kernel", transpose=True),
        ],
        fallback=lambda n: n,
    )
    new, report = gj.load_into(wrong, prefix, transposed, strict=False)
    assert np.array_equal(np.asarray(new["dense"]["kernel"]), tensors["dense/kernel"].T)
    assert report.missing_keys == ["extra"]


def test_sharded_leaves_keep_their_sharding_on_eight_devices(flax_like):
    prefix, tensors = flax_like
    code = textwrap.dedent(
        f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import numpy as np, jax, jax.numpy as jnp, gpuckpt, gpuckpt.jax as gj
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert len(jax.devices()) == 8
        mesh = Mesh(np.array(jax.devices()), ("x",))
        sharding = NamedSharding(mesh, P(None, "x"))
        params = {{"dense": {{"kernel": jax.device_put(jnp.zeros((4, 8)), sharding), "bias": jnp.zeros(8)}},
                  "norm": {{"scale": jax.device_put(jnp.zeros(8), jax.devices()[3])}}}}
        new, report = gj.load_into(params, {prefix!r})
        assert report.ok, report.describe()
        assert new["dense"]["kernel"].sharding == sharding
        assert len(new["dense"]["kernel"].addressable_shards) == 8
        assert new["norm"]["scale"].devices() == {{jax.devices()[3]}}
        with gpuckpt.open({prefix!r}) as ckpt:
            assert np.asarray(new["dense"]["kernel"]).tobytes() == ckpt.get_tensor("dense/kernel").tobytes()
            on3 = gj.restore(ckpt, ["dense/bias"], device=jax.devices()[3])["dense/bias"]
            assert on3.devices() == {{jax.devices()[3]}}
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_partitioned_tensors_reassembled_into_the_aligned_buffers(tmp_path):
    whole = np.arange(40, dtype=np.float32).reshape(10, 4)
    parts = [((slice(0, 3), slice(None)), whole[:3]), ((slice(3, 10), slice(None)), whole[3:])]
    prefix = gpuckpt.save(str(tmp_path / "parts"), {"big": gpuckpt.Partitioned((10, 4), parts)})
    with gpuckpt.open(prefix) as ckpt:
        array = gj.restore(ckpt, ["big"], device="cpu")["big"]
    assert _bits(array) == whole.tobytes()


def test_load_into_keeps_each_leaf_what_it_was(tmp_path):
    """Python numbers stay Python numbers, 0-d leaves stay 0-d, numpy leaves stay numpy (64-bit ones
    too, with x64 off: JAX never holds them), and a leaf JAX placed by default (uncommitted) stays
    uncommitted, while a committed one stays on its device."""
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    stored = {
        "temperature": np.float32(0.5),
        "n": np.int32(3),
        "scale": np.float32(2.5),
        "w": rng.standard_normal(3),  # float64
        "b": rng.standard_normal(4).astype(np.float32),
        "pinned": rng.standard_normal(2).astype(np.float32),
        "eps": np.float32(1e-6),
    }
    prefix = gpuckpt.save(str(tmp_path / "leaves"), stored)
    params = {
        "temperature": 1.0,
        "n": 0,
        "scale": jnp.zeros((), jnp.float32),
        "w": np.zeros(3),
        "b": jnp.zeros(4, jnp.float32),
        "pinned": jax.device_put(jnp.zeros(2, jnp.float32), jax.devices()[0]),
        "eps": np.float32(0),  # a numpy scalar
    }
    assert not jax.config.read("jax_enable_x64")
    new, report = gj.load_into(params, prefix)
    assert report.ok, report.describe()
    assert type(new["temperature"]) is float and new["temperature"] == 0.5
    assert type(new["n"]) is int and new["n"] == 3
    assert isinstance(new["scale"], jax.Array) and new["scale"].shape == () and float(new["scale"]) == 2.5
    assert isinstance(new["w"], np.ndarray) and new["w"].dtype == np.float64 and _bits(new["w"]) == _bits(stored["w"])
    assert not new["b"].committed and not new["scale"].committed
    assert new["pinned"].committed and new["pinned"].devices() == {jax.devices()[0]}
    assert type(new["eps"]) is np.float32 and new["eps"] == np.float32(1e-6)


def test_a_sharding_with_a_memory_kind_puts_the_shards_in_that_memory(tmp_path):
    """``NamedSharding(..., memory_kind=...)`` (host offload): each shard goes to that memory of its
    device, as ``jax.device_put`` puts it."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    prefix = gpuckpt.save(str(tmp_path / "kinds"), {"w": values})
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]), ("x",))
    kinds = [memory.kind for memory in device.addressable_memories()]
    assert len(kinds) > 1, kinds  # a CPU device has host memories besides its own
    with gpuckpt.open(prefix) as ckpt:
        for kind in kinds:
            sharding = NamedSharding(mesh, P(None, "x"), memory_kind=kind)
            array = gj.restore(ckpt, ["w"], shardings={"w": sharding})["w"]
            assert array.sharding.memory_kind == kind
            assert array.sharding.memory_kind == jax.device_put(values, sharding).sharding.memory_kind
            assert _bits(array) == values.tobytes()


def test_a_shardings_key_that_is_bytes_is_refused_before_any_read(every_dtype):
    prefix, _ = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        for key in (b"float32", __import__("re").compile(b"float32")):
            with pytest.raises(gpuckpt.InvalidArgumentError, match="not a name or regular expression"):
                gj.restore(ckpt, ["float32"], shardings={key: None})
        assert sum(ckpt.bytes_read().values()) == 0


def test_a_rules_floating_type_rounds_once_into_a_wider_leaf(tmp_path):
    value = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)], np.float64)
    prefix = gpuckpt.save(str(tmp_path / "r"), {"w": value})
    new, _ = gj.load_into({"w": np.zeros(2, np.float32)}, prefix, [gpuckpt.mapping.rule("w", "w", dtype="bfloat16")])
    with gpuckpt.open(prefix) as ckpt:
        once = ckpt.get_tensor("w", dtype="bfloat16").astype(np.float32)
    assert new["w"].tobytes() == once.tobytes()

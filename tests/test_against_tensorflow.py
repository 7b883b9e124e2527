"""Fresh, randomized checkpoints written by a live TensorFlow, compared bit for bit with
``tf.train.load_checkpoint``; and bundles written by tests/bundle_builder.py read back by TF.
Skipped where TensorFlow is not importable (CI installs tensorflow-cpu, so they run there)."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import assert_bit_exact, tf_or_skip

import gpuckpt

pytestmark = pytest.mark.tf

NUMERIC = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
    "float8_e5m2",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e4m3b11fnuz",
    "float8_e5m2fnuz",
    "int4",
    "uint4",
    "int2",
    "uint2",
    "float4_e2m1fn",
]


def random_value(rng, dtype_name, shape):
    import ml_dtypes

    if dtype_name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype_name.startswith(("complex",)):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype_name)
    if dtype_name.startswith(("float", "bfloat")):
        np_type = getattr(np, dtype_name, None) or getattr(ml_dtypes, dtype_name)
        values = rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3, shape)
        if values.size:
            values.reshape(-1)[0] = np.inf if dtype_name in ("float32", "float64", "float16", "bfloat16") else 0
        return values.astype(np_type)
    info = ml_dtypes.iinfo(dtype_name) if hasattr(ml_dtypes, dtype_name) else np.iinfo(dtype_name)
    np_type = getattr(ml_dtypes, dtype_name, None) or getattr(np, dtype_name)
    return rng.integers(
        int(info.min), int(info.max), shape, endpoint=True, dtype=np.int64 if info.min < 0 else np.uint64
    ).astype(np_type)


def random_strings(rng, shape):
    count = int(np.prod(shape))
    out = [rng.bytes(int(rng.choice([0, 1, 5, 127, 128, 300]))) for _ in range(count)]
    return np.array(out + [b""], dtype=object)[:count].reshape(shape)


@pytest.mark.parametrize("seed", range(3))
def test_random_checkpoint_bit_exact(tmp_path, seed):
    tf = tf_or_skip()
    from fixtures.make_fixtures import save_raw

    rng = np.random.default_rng(seed)
    items = {}
    for i in range(40):
        shape = tuple(int(d) for d in rng.integers(0, 6, rng.integers(0, 4)))
        dtype_name = str(rng.choice(NUMERIC + ["string"]))
        value = random_strings(rng, shape) if dtype_name == "string" else random_value(rng, dtype_name, shape)
        items[f"scope{i % 3}/t{i}_{dtype_name}"] = (dtype_name, value)
    prefix = str(tmp_path / "random")
    save_raw(prefix, items)
    reader = tf.train.load_checkpoint(prefix)
    with gpuckpt.open(prefix) as ckpt:
        assert sorted(ckpt.keys()) == sorted(reader.get_variable_to_shape_map())
        restored = ckpt.restore(threads=2)
        for name in ckpt.keys():
            assert_bit_exact(restored[name], reader.get_tensor(name), name)


def test_large_tensor_spanning_chunks_and_multi_block_index(tmp_path):
    tf = tf_or_skip()
    from fixtures.make_fixtures import save_raw

    rng = np.random.default_rng(11)
    items = {f"many/{i:05d}_{'x' * 60}": ("int32", np.array([i], np.int32)) for i in range(3000)}
    items["big"] = ("float32", rng.standard_normal(3_000_000).astype(np.float32))  # 12 MB: several chunks
    prefix = str(tmp_path / "large")
    save_raw(prefix, items)
    reader = tf.train.load_checkpoint(prefix)
    with gpuckpt.open(prefix) as ckpt:
        restored = ckpt.restore(threads=2)
        for name in ckpt.keys():
            assert_bit_exact(restored[name], reader.get_tensor(name), name)


def test_big_endian_bundle_read_like_tensorflow(tmp_path):
    """TF byte-swaps BIG bundles on read; our writer makes one, both readers must agree."""
    tf = tf_or_skip()
    import ml_dtypes

    rng = np.random.default_rng(5)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "i16": np.array([-2, 300, 32767], np.int16),
        "u64": np.array([1, 2**63 + 5], np.uint64),
        "c64": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "c128": (rng.standard_normal(2) - 2j).astype(np.complex128),
        "bf16": rng.standard_normal(6).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal(6).astype(np.float16),
        "s": [b"big", b"", b"endian" * 40],
        "u8": np.array([1, 2, 255], np.uint8),
    }
    prefix = make_bundle(tensors, big_endian=True, num_shards=2).write(str(tmp_path / "be"))
    reader = tf.train.load_checkpoint(prefix)
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.big_endian
        for name in tensors:
            assert_bit_exact(ckpt.get_tensor(name), reader.get_tensor(name), name)
            np.testing.assert_array_equal(ckpt.get_tensor(name), np.asarray(tensors[name], dtype=ckpt.info(name).dtype))
        np.testing.assert_array_equal(ckpt.get_slice("f32")[1:, 2], tensors["f32"][1:, 2])


def test_sharded_and_partitioned_checkpoint_via_tf2_sharding(tmp_path):
    """A TF2 checkpoint split across shards by size, with a variable sliced across two shards."""
    tf = tf_or_skip()
    variables = {f"v{i}": tf.Variable(np.arange(1000, dtype=np.float32) + i) for i in range(3)}
    checkpoint = tf.train.Checkpoint(**variables)
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=1500)
    prefix = checkpoint.write(
        str(tmp_path / "shards"), options=tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    )
    reader = tf.train.load_checkpoint(prefix)
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.num_shards > 1
        assert any(ckpt.info(n).partitioned for n in ckpt.keys())
        restored = ckpt.restore()
        for name in ckpt.keys():
            assert_bit_exact(restored[name], reader.get_tensor(name), name)


def test_latest_checkpoint_agrees_with_tensorflow(tmp_path):
    tf = tf_or_skip()
    v = tf.Variable(1.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(tmp_path / "run"), max_to_keep=2)
    for _ in range(3):
        manager.save()
    assert gpuckpt.latest_checkpoint(tmp_path / "run") == tf.train.latest_checkpoint(str(tmp_path / "run"))
    assert gpuckpt.latest_checkpoint(tmp_path) == tf.train.latest_checkpoint(str(tmp_path))


def test_quantized_types_read_like_tensorflow(tmp_path):
    """TF's savers rarely hold quantized tensors; a bundle with them, read by both readers."""
    tf = tf_or_skip()
    tensors = {
        "qint8": np.array([-128, 0, 127], np.int8),
        "quint8": np.array([0, 200, 255], np.uint8),
        "qint16": np.array([-5, 32767], np.int16),
        "quint16": np.array([1, 65535], np.uint16),
        "qint32": np.array([[-(2**31), 7]], np.int32),
    }
    dtypes = {"qint8": 11, "quint8": 12, "qint32": 13, "qint16": 15, "quint16": 16}
    for big_endian in (False, True):
        prefix = make_bundle(tensors, big_endian=big_endian, dtypes=dtypes).write(str(tmp_path / f"q{big_endian}"))
        reader = tf.train.load_checkpoint(prefix)
        with gpuckpt.open(prefix) as ckpt:
            for name in tensors:
                assert ckpt.info(name).tf_dtype == reader.get_variable_to_dtype_map()[name].name
                assert_bit_exact(ckpt.get_tensor(name), reader.get_tensor(name), name)

"""Merging checkpoints and restoring from several: against TensorFlow's own init_from_checkpoint."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import fixture_path, tf_or_skip

import gpuckpt
from gpuckpt.format.object_graph import OBJECT_GRAPH_KEY
from gpuckpt.merge import map_names


def test_map_names_follows_init_from_checkpoint_syntax():
    names = ["enc/w", "enc/b", "dec/w", "step"]
    assert map_names(names, None, "x") == {n: [n] for n in names}
    assert map_names(names, {"enc/": "model/encoder/"}, "x") == {
        "enc/w": ["model/encoder/w"],
        "enc/b": ["model/encoder/b"],
    }
    assert map_names(names, {"step": "global_step"}, "x") == {"step": ["global_step"]}
    assert map_names(names, {"/": "tower/"}, "x") == {n: ["tower/" + n] for n in names}
    assert map_names(names, {"enc/": "/"}, "x") == {"enc/w": ["w"], "enc/b": ["b"]}
    with pytest.raises(gpuckpt.TensorNotFoundError):
        map_names(names, {"missing": "x"}, "x")
    with pytest.raises(ValueError, match="scope"):
        map_names(names, {"enc/": "model"}, "x")


def _write_tf1(tf, prefix, variables):
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        made = [v1.get_variable(name, initializer=value) for name, value in variables.items()]
        loss = sum(v1.reduce_sum(v) for v in made if v.dtype.base_dtype == tf.float32)
        train = v1.train.AdamOptimizer(0.1).minimize(loss)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(train)
            return v1.train.Saver().save(sess, prefix)


def test_merge_matches_tensorflow_init_from_checkpoint(tmp_path):
    tf = tf_or_skip()
    v1 = tf.compat.v1
    rng = np.random.default_rng(0)
    first = _write_tf1(
        tf,
        str(tmp_path / "a" / "model"),
        {
            "enc/w": rng.standard_normal((4, 3)).astype(np.float32),
            "enc/b": rng.standard_normal(3).astype(np.float32),
            "head/w": rng.standard_normal((3, 2)).astype(np.float32),
        },
    )
    second = _write_tf1(
        tf,
        str(tmp_path / "b" / "model"),
        {
            "dec/w": rng.standard_normal((3, 5)).astype(np.float32),
            "count": np.int64(7),
        },
    )
    maps = [
        (first, {"enc/": "model/encoder/", "head/w": "model/head"}),
        (second, {"dec/": "model/decoder/", "count": "model/count"}),
    ]
    merged = gpuckpt.merge(str(tmp_path / "merged" / "ckpt"), maps, skip_optimizer=True)

    graph = tf.Graph()
    with graph.as_default():
        targets = {
            "model/encoder/w": v1.get_variable("model/encoder/w", shape=(4, 3)),
            "model/encoder/b": v1.get_variable("model/encoder/b", shape=(3,)),
            "model/head": v1.get_variable("model/head", shape=(3, 2)),
            "model/decoder/w": v1.get_variable("model/decoder/w", shape=(3, 5)),
            "model/count": v1.get_variable("model/count", shape=(), dtype=tf.int64),
        }
        for source, assignment in maps:
            v1.train.init_from_checkpoint(source, assignment)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            expected = sess.run(targets)

    reader = tf.train.load_checkpoint(merged)
    assert sorted(reader.get_variable_to_shape_map()) == sorted(targets)
    for name, value in expected.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    many = gpuckpt.restore_many(maps, skip_optimizer=True)
    assert sorted(many) == sorted(targets)
    for name, value in expected.items():
        np.testing.assert_array_equal(many[name], value)


def test_merge_keeps_partitions_and_casts(tmp_path):
    src = fixture_path("tf1_partitioned")
    merged = gpuckpt.merge(
        str(tmp_path / "m"),
        [(src, {"/": "tower0/"}), (src, {"pv": "tower1/pv"})],
        skip_optimizer=True,
        skip_counters=True,
        dtypes={"tower1/.*": "bfloat16"},
    )
    with gpuckpt.open(src) as original, gpuckpt.open(merged) as ckpt:
        assert sorted(ckpt.keys()) == ["tower0/dense/kernel", "tower0/pv", "tower1/pv"]
        assert ckpt.info("tower0/pv").partitioned  # copied slice by slice, as bytes
        np.testing.assert_array_equal(ckpt.get_tensor("tower0/pv"), original.get_tensor("pv"))
        assert ckpt.info("tower1/pv").tf_dtype == "bfloat16"
        np.testing.assert_array_equal(ckpt.get_tensor("tower1/pv"), original.get_tensor("pv").astype("bfloat16"))


def test_merge_collisions_name_both_sources(tmp_path):
    src = fixture_path("tf1_partitioned")
    with pytest.raises(ValueError, match=r"both .*model.ckpt-3:pv.*and .*model.ckpt-3:dense/kernel"):
        gpuckpt.merge(str(tmp_path / "m"), [(src, {"pv": "x"}), (src, {"dense/kernel": "x"})])
    assert not list(tmp_path.iterdir())


def test_merge_of_object_based_checkpoint_drops_the_object_graph(tmp_path):
    merged = gpuckpt.merge(str(tmp_path / "m"), [(fixture_path("keras_adam"), None)], skip_optimizer=True)
    with gpuckpt.open(merged) as ckpt:
        assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in ckpt
        assert len(ckpt.keys()) == 5  # four model variables and the save counter


@pytest.mark.parametrize(
    "sources, needle",
    [
        ([fixture_path("sharded")], r"sources\[0\] = '.*sharded' is not a \(checkpoint, assignment_map\) pair"),
        (fixture_path("sharded"), r"sources must be a list of \(checkpoint, assignment_map\) pairs, not str"),
        ([(fixture_path("sharded"), None), (fixture_path("sharded"), "dev0/")], r"sources\[1\].*must be a mapping"),
        ([(7, None)], r"sources\[0\].*the checkpoint must be a path, not int"),
        ([(fixture_path("sharded"), {"dev0/": ""})], r"sources\[0\].*non-empty"),
    ],
)
def test_sources_that_are_not_pairs_are_refused_by_name(tmp_path, sources, needle):
    with pytest.raises(gpuckpt.InvalidArgumentError, match=needle):
        gpuckpt.restore_many(sources)
    with pytest.raises(gpuckpt.InvalidArgumentError, match=needle):
        gpuckpt.merge(str(tmp_path / "m"), sources)
    assert not list(tmp_path.iterdir())


def test_merge_onto_an_existing_checkpoint_is_a_checkpoint_error(tmp_path):
    out = gpuckpt.merge(str(tmp_path / "m"), [(fixture_path("sharded"), None)])
    with pytest.raises(gpuckpt.CheckpointExistsError, match="pass overwrite=True") as caught:
        gpuckpt.merge(out, [(fixture_path("sharded"), None)])
    assert isinstance(caught.value, gpuckpt.CheckpointError) and isinstance(caught.value, FileExistsError)
    with pytest.raises(gpuckpt.CheckpointExistsError):
        gpuckpt.save(out, {"x": np.zeros(2)})
    gpuckpt.merge(out, [(fixture_path("keras_adam"), None)], overwrite=True)


def test_merge_records_a_new_directory_in_its_state_file(tmp_path):
    out = gpuckpt.merge(str(tmp_path / "new" / "m"), [(fixture_path("sharded"), None)])
    assert gpuckpt.latest_checkpoint(tmp_path / "new") == os.path.abspath(out)
    with gpuckpt.open(tmp_path / "new") as ckpt:
        assert len(ckpt) == 6
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    gpuckpt.merge(str(tmp_path / "busy" / "m"), [(fixture_path("sharded"), None)])
    assert gpuckpt.latest_checkpoint(tmp_path / "busy") is None  # not new: no state file unasked
    gpuckpt.merge(str(tmp_path / "none" / "m"), [(fixture_path("sharded"), None)], update_state=False)
    assert gpuckpt.latest_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("name", ["keras_adam", "tf1_partitioned"])
def test_merged_checkpoint_keeps_every_kind_without_the_object_graph(tmp_path, name):
    merged = gpuckpt.merge(str(tmp_path / "m"), [(fixture_path(name), None)])
    with gpuckpt.open(fixture_path(name)) as original, gpuckpt.open(merged) as ckpt:
        assert OBJECT_GRAPH_KEY not in ckpt
        assert {n: ckpt.kind(n) for n in ckpt.keys()} == {
            n: original.kind(n) for n in original.keys() if n != OBJECT_GRAPH_KEY
        }


def test_renamed_counters_stay_counters(tmp_path):
    merged = gpuckpt.merge(
        str(tmp_path / "m"),
        [
            (fixture_path("tf1_partitioned"), {"global_step": "tower0/global_step", "pv": "tower0/pv"}),
            (fixture_path("keras_adam"), {"/": "tower1/"}),
        ],
    )
    with gpuckpt.open(merged) as ckpt:
        assert ckpt.kind("tower0/global_step") == gpuckpt.StateKind.COUNTER
        assert ckpt.kind("tower1/save_counter/.ATTRIBUTES/VARIABLE_VALUE") == gpuckpt.StateKind.COUNTER
        assert ckpt.kind("tower1/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == gpuckpt.StateKind.OPTIMIZER
        assert ckpt.kind("tower0/pv") == gpuckpt.StateKind.MODEL


def test_one_tensor_under_two_names_gives_two_arrays(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "a"), {"t1": np.arange(3, dtype=np.float32)})
    many = gpuckpt.restore_many([(prefix, {"t1": "a", "/": "b/"})])
    assert sorted(many) == ["a", "b/t1"] and many["a"] is not many["b/t1"]
    many["a"][0] = 99
    assert many["b/t1"][0] == 0


def test_a_cast_merge_holds_one_decoded_tensor_at_a_time(tmp_path, monkeypatch):
    """Cast (and byte-swapped) tensors are decoded as their data file is written: when one is
    cast, at most the one before it is still alive (the writer's last chunk), never the model."""
    import importlib
    import weakref

    merge_module = importlib.import_module("gpuckpt.merge")  # gpuckpt.merge is also the function

    rng = np.random.default_rng(5)
    values = {f"layer_{i}/w": rng.standard_normal((64, 100)).astype(np.float32) for i in range(6)}
    values["step"] = np.int64(3)
    prefix = gpuckpt.save(str(tmp_path / "src"), values)
    cast, real_convert = [], merge_module.convert

    def owner(array):  # the array that owns the memory (a view's base is its owner's)
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array

    def tracked(array, target, where):
        result = real_convert(array, target, where)
        alive = [ref for ref in cast if ref() is not None]
        assert len(alive) <= 1, f"{len(alive)} cast tensors held at once"
        cast.append(weakref.ref(owner(result)))
        return result

    monkeypatch.setattr(merge_module, "convert", tracked)
    merged = gpuckpt.merge(str(tmp_path / "m"), [(prefix, None)], dtypes={"layer_.*": "bfloat16"})
    assert len(cast) == 6
    with gpuckpt.open(merged) as ckpt:
        for name, value in values.items():
            want = value.astype("bfloat16") if name.startswith("layer_") else value
            got = ckpt.get_tensor(name)
            assert got.dtype == np.asarray(want).dtype and got.tobytes() == np.asarray(want).tobytes(), name


def test_a_cast_without_a_conversion_is_refused_before_anything_is_written(tmp_path):
    import ml_dtypes

    values = {"a": np.ones(1 << 20, np.float32), "z": np.ones(8, ml_dtypes.float8_e4m3fnuz)}
    prefix = gpuckpt.save(str(tmp_path / "src" / "ck"), values)
    with pytest.raises(gpuckpt.UnsupportedError, match=r"no conversion from float8_e4m3fnuz to float16.*'z'"):
        gpuckpt.merge(str(tmp_path / "out" / "m"), [(prefix, None)], dtypes={".*": "float16"})
    assert not (tmp_path / "out").exists()


def test_a_big_endian_source_keeps_every_stored_type(tmp_path):
    """Byte-swapped (decoded and written again) tensors keep their TF type, quantized ones too:
    each shares its numpy dtype with a plain type, which must not replace it."""
    from bundle_builder import make_bundle

    from gpuckpt.dtypes import DataType

    tensors = {
        "qint8": np.array([1, -2, 3], np.int8),
        "quint8": np.array([1, 2, 250], np.uint8),
        "qint16": np.array([-300, 2], np.int16),
        "quint16": np.array([60000, 2], np.uint16),
        "qint32": np.array([-70000, 5], np.int32),
        "uint16": np.array([60000, 7], np.uint16),
        "f64": np.array([1.5, -2.25]),
    }
    types = {"qint8": 11, "quint8": 12, "qint16": 15, "quint16": 16, "qint32": 13}
    prefix = make_bundle(tensors, big_endian=True, dtypes=types).write(str(tmp_path / "be"))
    merged = gpuckpt.merge(str(tmp_path / "m"), [(prefix, None)])
    with gpuckpt.open(prefix) as source, gpuckpt.open(merged) as ckpt:
        assert not ckpt.big_endian
        for name in tensors:
            assert DataType(ckpt.index.tensors[name].dtype) == DataType(source.index.tensors[name].dtype), name
            assert ckpt.get_tensor(name).tobytes() == source.get_tensor(name).tobytes(), name

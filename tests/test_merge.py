"""Merging checkpoints and restoring from several: against TensorFlow's own init_from_checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fixture_path, tf_or_skip

import gpuckpt
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

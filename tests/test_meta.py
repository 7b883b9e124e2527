"""Summaries of .meta files and saved_model.pb, including graphs imported again and again."""

from __future__ import annotations

import pytest
from conftest import fixture_path, tf_or_skip

import gpuckpt
from gpuckpt.format.meta import find_meta, read_meta


def test_tf1_meta_summary():
    (summary,) = read_meta(fixture_path("tf1_partitioned", "model.ckpt-3.meta"))
    assert summary.node_count == sum(summary.ops.values()) == sum(summary.scopes.values())
    names = {v.name: v for v in summary.variables}
    assert names["pv/part_0"].shape == (4, 3) and names["pv/part_0"].dtype == "float32"
    assert names["dense/kernel"].shape == (2, 3)
    assert summary.saver["version"] == "V2" and summary.saver["max_to_keep"] == 2
    assert summary.collections["variables"][0] == "bytes_list"
    assert summary.part_bytes["total"] >= summary.part_bytes["graph_def.node"] > 0
    assert summary.repeated_imports == {}


def test_saved_model_summary_and_finding_the_graph():
    prefix = fixture_path("saved_model", "variables", "variables")
    path = find_meta(prefix)
    assert path == fixture_path("saved_model", "saved_model.pb")
    (summary,) = read_meta(path)
    assert "serving_default" in summary.signatures
    assert summary.signatures["serving_default"]["inputs"] == {"x": "serving_default_x:0"}
    assert summary.function_count > 0 and summary.part_bytes["graph_def.library"] > 0
    assert find_meta(fixture_path("tf1_partitioned", "model.ckpt-3")).endswith(".meta")


def test_unparseable_meta_is_a_format_error(tmp_path):
    bad = tmp_path / "x.meta"
    bad.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(gpuckpt.FormatError, match="x.meta"):
        read_meta(bad)


def test_repeated_imports_are_visible(tmp_path):
    tf = tf_or_skip()
    v1 = tf.compat.v1
    meta_path = fixture_path("tf1_partitioned", "model.ckpt-3.meta")
    graph = tf.Graph()
    with graph.as_default():
        for _ in range(3):
            v1.train.import_meta_graph(meta_path, import_scope="import")
        exported = str(tmp_path / "grown.meta")
        for _ in range(2):
            v1.train.import_meta_graph(meta_path)  # unscoped: the same names again
        with v1.Session(graph=graph):
            v1.train.export_meta_graph(exported, graph=graph)
    (summary,) = read_meta(exported)
    assert summary.repeated_imports["import"] == ["import", "import_1", "import_2"]
    assert summary.repeated_imports["global_step"] == ["global_step_1"]  # the second unscoped import

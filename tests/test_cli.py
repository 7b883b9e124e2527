"""The gpuckpt command, through subprocess calls as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import fixture_path

import gpuckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuckpt", *args], capture_output=True, text=True, cwd=ROOT)


def test_no_arguments_lists_and_restores_the_bundled_sample():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "16 tensors" in result.stdout and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in result.stdout
    assert "GB/s, crc32c verified" in result.stdout


def test_ls_filter_and_json():
    result = run("ls", fixture_path("tf1_partitioned"), "--filter", "^pv", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["pv", "pv/Adam", "pv/Adam_1"]
    assert rows[0]["partitioned"] and rows[0]["shape"] == [10, 3] and rows[0]["kind"] == "model"
    text = run("ls", fixture_path("raw", "all_dtypes"))
    assert "bfloat16" in text.stdout and "float8_e4m3fn" in text.stdout


def test_inspect_shows_object_graph_and_meta():
    keras = run("inspect", fixture_path("keras_adam"))
    assert keras.returncode == 0, keras.stderr
    assert "object graph:" in keras.stdout and "_functional" in keras.stdout
    tf1 = run("inspect", fixture_path("tf1_partitioned"), "--json")
    report = json.loads(tf1.stdout)
    assert report["meta_file"].endswith("model.ckpt-3.meta")
    assert report["meta"][0]["saver"]["version"] == "V2"
    saved = run("inspect", fixture_path("saved_model"))
    assert "signature serving_default" in saved.stdout


def test_verify_names_damaged_tensors(tmp_path):
    for name in os.listdir(fixture_path("raw")):
        shutil.copy(fixture_path("raw", name), tmp_path / name)
    assert run("verify", fixture_path("keras_adam")).returncode == 0
    before = run("verify", str(tmp_path / "all_dtypes"))  # sl_incomplete is refused, as TF refuses it
    assert before.returncode == 3 and "sl_incomplete" in before.stdout and "int64" not in before.stdout
    with gpuckpt.open(tmp_path / "all_dtypes") as ckpt:
        offset = ckpt.index.tensors["int64"].offset
    data = tmp_path / "all_dtypes.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0xFF
    data.write_bytes(raw)
    result = run("verify", str(tmp_path / "all_dtypes"))
    assert result.returncode == 3
    assert "int64" in result.stdout and "sl_incomplete" in result.stdout
    assert "DAMAGED int64" in result.stderr


def test_restore_and_bench_report_rates():
    result = run("restore", fixture_path("sharded"), "--threads", "2")
    assert result.returncode == 0 and "GB/s" in result.stdout
    result = run("bench", fixture_path("sharded"), "--repeat", "1", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["warm_gpuckpt_s"] > 0 and figures["bytes"] == 168


def test_merge_command(tmp_path):
    out = str(tmp_path / "merged")
    result = run(
        "merge",
        out,
        fixture_path("tf1_partitioned") + "=pv:model/pv,dense/:model/dense/",
        fixture_path("sharded") + "=dev0/:other/",
        "--skip-optimizer",
        "--cast",
        "model/.*=float16",
    )
    assert result.returncode == 0, result.stderr
    with gpuckpt.open(out) as ckpt:
        assert sorted(ckpt.keys()) == ["model/dense/kernel", "model/pv", "other/b", "other/w"]
        assert ckpt.info("model/pv").tf_dtype == "float16"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("ls", "/nonexistent/ckpt"), "no TensorFlow checkpoint found"),
        (("restore", fixture_path("keras_adam"), "--device", "cuda"), "CuPy is not installed"),
    ],
)
def test_errors_are_one_line_without_traceback(args, needle):
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("gpuckpt: error: ") and needle in result.stderr
    assert "Traceback" not in result.stderr
    debug = run("--debug", *args)
    assert "Traceback" in debug.stderr


def test_usage_errors_exit_2():
    assert run("ls").returncode == 2

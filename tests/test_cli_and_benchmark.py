"""The command line on the bundled sample, and the benchmark program at its smallest size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import tf_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_lists_and_restores_the_bundled_sample():
    result = subprocess.run([sys.executable, "-m", "gpuckpt"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "16 tensors" in result.stdout
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in result.stdout
    assert "GB/s, crc32c verified" in result.stdout


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpuckpt", str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: no TensorFlow checkpoint found")


@pytest.mark.tf
def test_benchmark_smoke(tmp_path):
    tf_or_skip()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import restore_host

    out = tmp_path / "result.json"
    assert (
        restore_host.main(
            [
                "--size-mb",
                "2",
                "--tensors",
                "6",
                "--many",
                "300",
                "--repeat",
                "1",
                "--work-dir",
                str(tmp_path / "work"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["large"]["ratios"]["tf_over_gpuckpt_verified"] > 0
    assert result["many"]["tensors"] == 300
    assert result["machine"]["cores"] >= 1

"""The benchmark program at its smallest size."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest
from conftest import tf_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_slice_benchmark_smoke(tmp_path):
    """Checks every selection against numpy, then times it (TF joins where installed)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import slice_host

    out = tmp_path / "slice.json"
    argv = ["--rows", "3000", "--cols", "8", "--repeat", "1", "--work-dir", str(tmp_path), "--out", str(out)]
    assert slice_host.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["selections"]) == set(slice_host.SELECTIONS)
    assert all(row["vs_floor"] > 0 for row in result["selections"].values())


def test_cold_benchmark_smoke(tmp_path):
    """Checks the restore against the arrays written, then times every reader count cold."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import restore_cold

    out = tmp_path / "cold.json"
    argv = ["--size-mb", "2", "--tensors", "6", "--threads", "1,2", "--repeat", "1"]
    assert restore_cold.main([*argv, "--work-dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"floor_read_in_order_1thread_s", "gpuckpt_verified_2threads_s"} <= set(result["cold"])
    assert all(f["best"] > 0 for f in result["cold"].values())


@pytest.mark.gpu
def test_gpu_benchmark_smoke(tmp_path):
    """benchmarks/restore_gpu.py end to end: on a GPU where there is one, else on the CuPy double,
    so that a lent GPU's short session never meets a broken script. Every stage runs; baselines
    that need a real GPU (torch's CUDA, safetensors' pinned memory) record why they were not
    measured instead of failing."""
    from gpuckpt.cuda import cuda_available

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    with contextlib.ExitStack() as stack:
        if not cuda_available():
            import cupy_double

            stack.enter_context(cupy_double.installed(device_count=1, memory_bytes=256 << 20))
        import restore_gpu

        out = tmp_path / "gpu.json"
        argv = ["--size-gb", "0.02", "--tensors", "8", "--repeat", "1", "--work-dir", str(tmp_path), "--out", str(out)]
        assert restore_gpu.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["ratios"]["verified_vs_floor"] > 0
    assert result["stages_done"][-1] == "ratios" and "torch_load_into" in result["stages_done"]
    assert result["torch_load_into_s"] or result["torch_load_into_error"].startswith("not measured")


def test_fuzz_smoke(tmp_path):
    """A short run of the parser fuzzer: every target, zero non-CheckpointError exceptions."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fuzz_parsers

    assert fuzz_parsers.main(["--count", "400", "--seed", "7", "--failures", str(tmp_path)]) == 0


def test_coverage_guided_fuzz_smoke(tmp_path, capsys):
    """A short atheris run over every parser: it starts, reaches the parsers and finds nothing."""
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86-64, Python 3.11-3.13 only")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fuzz_atheris

    assert fuzz_atheris.main(["--runs", "5000", "--failures", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "inputs tried: 5000" in report and "failures: 0" in report
    assert int(report.split("coverage: ")[1].split(" edges")[0]) > 100  # the parsers were instrumented


def test_startup_benchmark_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--repeat", "1", "--skip-tf", "--out", str(out)]) == 0
    seconds = json.loads(out.read_text())["seconds"]
    assert seconds["import gpuckpt"] > 0 and seconds["gpuckpt ls SAMPLE"] > 0


def test_convert_benchmark_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import convert_host

    out = tmp_path / "convert.json"
    assert convert_host.main(["--mb", "1", "--repeat", "1", "--out", str(out)]) == 0
    assert "f64_to_bf16" in json.loads(out.read_text())["conversions"]


def test_warm_start_benchmark_smoke(tmp_path):
    """restore(out=), fresh restores, process history and start-up, at the smallest size."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import warm_start

    out = tmp_path / "warm.json"
    argv = ["--size-mb", "2", "--tensors", "6", "--many", "300", "--startup-mb", "2", "--repeat", "1"]
    assert warm_start.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["large"]["out_verified_s"] > 0 and result["large"]["floor_memcpy_prefaulted_s"] > 0
    assert result["history"]["arena"]["ratio"] > 0
    assert result["startup"]["fp32_fp16"]["new_process_import_open_restore_s"] > 0
    assert result["machine"]["cores"] >= 1


def test_load_into_benchmark_smoke(tmp_path):
    """load_into against restore()+load_state_dict, restore() and the floor, at the smallest size:
    checked bit for bit first, peak memory measured in new processes."""
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import load_into

    out = tmp_path / "load-into.json"
    argv = ["--layers", "1", "--d-model", "32", "--vocab", "64", "--context", "16", "--repeat", "1"]
    argv += ["--writer", "gpuckpt", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    assert load_into.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["seconds"]["tensors"] == 16 and result["checkpoint"]["writer"] == "gpuckpt"
    assert result["ratios"]["load_into_over_restore"] > 0 and result["seconds"]["floor_memcpy_prefaulted_s"] > 0
    assert set(result["peak_extra_bytes"]) == {"load_into", "restore_load_state_dict", "restore"}
    assert result["machine"]["cores"] >= 1

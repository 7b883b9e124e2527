"""tools/gpu_session.sh, run here without a GPU: the device is recorded first, the preflight stops
with its reason, the session fails, and $OUT holds no more files than the device tool brings back
(8, no folders). Its verdict (tools/gpu_preflight.py summary) fails whenever nothing really ran on
a GPU, and its pytest plugin refuses to run the GPU tests on the CuPy double."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")
PREFLIGHT = os.path.join(ROOT, "tools", "gpu_preflight.py")
FAKE_NVIDIA_SMI = """#!/bin/sh
# What a GPU machine's nvidia-smi prints, and which files $OUT held when it was asked.
case "$1" in --query-gpu=*) echo "index, name, driver_version, pcie.link.gen.current, memory.total [MiB]";; esac
echo "0, NVIDIA Fake H200, 580.159.04, 5, 143771 MiB; OUT then held: $(ls "$OUT" | tr '\\n' ' ')"
"""


def _load_preflight():
    spec = importlib.util.spec_from_file_location("gpu_preflight", PREFLIGHT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(tmp_path, python=sys.executable, **env):
    out = tmp_path / "out"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(
        OUT=str(out),
        PATH=f"{bin_dir}{os.pathsep}{environ.get('PATH', '')}",
        GPU_SESSION_PYTHON=python,
        GPU_SESSION_SKIP_WHEELS="1",
        GPU_SESSION_WORK=str(tmp_path / "work"),
        CUDA_VISIBLE_DEVICES="",  # no GPU even where one is: the preflight must stop
    )
    environ.update(env)
    result = subprocess.run(["bash", SCRIPT], env=environ, capture_output=True, text=True, timeout=120)
    return result, out


def _files_come_back(out):
    """What the device tool brings back: at most 8 files, each named in letters, digits, '.', '_'
    and '-'. The script writes no folders."""
    entries = sorted(os.listdir(out))
    assert all(os.path.isfile(out / name) for name in entries), entries
    assert len(entries) <= 8, entries
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in entries), entries
    return entries


def _reason(out):
    """The preflight's one reason to stop: its only PREFLIGHT FAILED line."""
    (reason,) = [line for line in (out / "preflight.log").read_text().splitlines() if "PREFLIGHT FAILED" in line]
    return reason


def test_the_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_without_a_gpu_the_device_is_recorded_first_and_the_preflight_stops_with_its_reason(tmp_path):
    result, out = _session(tmp_path)
    assert result.returncode != 0, result.stdout
    entries = _files_come_back(out)
    assert entries == ["device.txt", "preflight.log", "summary.txt"], entries

    device = (out / "device.txt").read_text()
    assert device.startswith("# gpuckpt GPU session, device record")
    assert "NVIDIA Fake H200, 580.159.04" in device
    assert "OUT then held: device.txt \n" in device  # nvidia-smi ran before any other file existed
    assert f"python: {sys.version.split()[0]}" in device and "## Python packages" in device
    assert "wheels: skipped (GPU_SESSION_SKIP_WHEELS)" in device
    assert "requirements: OK" in device

    reason = _reason(out)
    assert reason.startswith("PREFLIGHT FAILED: CUDA is unusable"), reason

    summary = (out / "summary.txt").read_text()
    assert "device: 0, NVIDIA Fake H200, 580.159.04" in summary
    assert f"FAIL: {reason}" in summary
    assert "FAIL: GPU tests: not run" in summary and "FAIL: benchmark: not run" in summary
    assert summary.strip().endswith("GPU SESSION: FAIL (3 problems)")
    assert result.stdout.strip().endswith("GPU SESSION: FAIL (3 problems)")  # last, where the reply shows it
    assert result.stdout.index("device record") < result.stdout.index("== preflight")


def test_a_python_that_cannot_run_still_leaves_the_device_record_and_a_failing_summary(tmp_path):
    result, out = _session(tmp_path, python=str(tmp_path / "no-such-python"))
    assert result.returncode != 0
    assert _files_come_back(out) == ["device.txt", "preflight.log", "summary.txt"]
    assert "NVIDIA Fake H200" in (out / "device.txt").read_text()
    assert _reason(out).startswith("PREFLIGHT FAILED: the preflight did not finish (exit 127")
    summary = (out / "summary.txt").read_text()
    assert "FAIL: the summary could not be made (exit 127)" in summary
    assert summary.strip().endswith("GPU SESSION: FAIL")


def test_missing_wheels_are_recorded_and_the_session_goes_on(tmp_path):
    result, out = _session(tmp_path, GPU_SESSION_SKIP_WHEELS="", GPU_SESSION_BUDGET_S="40")
    assert result.returncode != 0
    device = (out / "device.txt").read_text()
    if os.path.isdir(os.path.join(ROOT, ".whl")) and os.listdir(os.path.join(ROOT, ".whl")):
        assert "== install the carried wheels" in device
    else:
        assert "wheels: NONE CARRIED: run ../shared/tools/device-prep" in device
    assert _reason(out).startswith("PREFLIGHT FAILED: CUDA is unusable")


# --- the verdict ------------------------------------------------------------------------------------


def _junit(path, cases):
    body = "".join(f'<testcase classname="tests.test_gpu" name="{name}">{inner}</testcase>' for name, inner in cases)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')


PASSED = ("test_a", "")
SKIPPED = ("test_b", '<skipped type="pytest.skip" message="needs a CUDA GPU" />')
XFAILED = ("test_c", '<skipped type="pytest.xfail" message="issue 10 defect 1" />')
FAILED = ("test_d", '<failure message="assert False" />')


def _good_session(out):
    out.mkdir()
    (out / "device.txt").write_text("# device\nrequirements: OK\n")
    (out / "preflight.log").write_text(
        "PREFLIGHT kernels fatbin: OK on sm_90\nPREFLIGHT kernels the backend takes: fatbin\nPREFLIGHT OK in 9.0 s\n"
    )
    (out / "gpu-tests.log").write_text("gpu-session: real GPU: yes\n")
    _junit(out / "gpu-tests.xml", [PASSED, SKIPPED, XFAILED])
    stages = ["start", "floor", "ratios"]
    bench = {"bytes": 4e9, "complete": True, "stages_done": stages, "floor_GBps": 50.0, "ratios": {"x": 0.9}}
    (out / "gpu.json").write_text(json.dumps(bench))


def _verdict(out, preflight="0", tests="0", bench="0"):
    lines, problems = _load_preflight().summarize(str(out), preflight, tests, bench, "installed")
    return problems


def test_a_session_that_ran_on_the_gpu_passes(tmp_path):
    _good_session(tmp_path / "out")
    assert _verdict(tmp_path / "out") == []


@pytest.mark.parametrize("cases", [[SKIPPED, SKIPPED], [SKIPPED, XFAILED], []], ids=["skipped", "xfailed", "none"])
def test_gpu_tests_that_all_skipped_fail_the_session(tmp_path, cases):
    _good_session(tmp_path / "out")
    _junit(tmp_path / "out" / "gpu-tests.xml", cases)
    problems = _verdict(tmp_path / "out")
    assert len(problems) == 1 and problems[0].startswith("GPU tests:"), problems


def test_failed_tests_a_test_run_on_the_double_and_an_unfinished_benchmark_fail_the_session(tmp_path):
    out = tmp_path / "out"
    _good_session(out)
    _junit(out / "gpu-tests.xml", [PASSED, FAILED])
    (out / "gpu-tests.log").write_text("gpu-session: CUDA is unusable here\n")
    (out / "gpu.json").write_text(json.dumps({"bytes": 1, "complete": False, "stages_done": ["start"]}))
    problems = _verdict(out, tests="1", bench="124")
    assert problems == [
        "GPU tests failed: tests.test_gpu::test_d",
        "GPU tests: the run did not confirm a real GPU (gpu-tests.log)",
        "benchmark: timed out before the end (gpu.json holds the stages done)",
    ]


def test_an_unusable_gpu_or_a_fatbin_that_did_not_load_fails_the_session(tmp_path):
    out = tmp_path / "out"
    _good_session(out)
    (out / "preflight.log").write_text(
        "PREFLIGHT kernels fatbin: FAILED: no sm_90\nPREFLIGHT kernels the backend takes: nvrtc (no sm_90)\n"
        "PREFLIGHT OK in 9.0 s\n"
    )
    assert _verdict(out) == [
        "kernels/convert.fatbin did not load or ran wrong on this GPU (the CUDA backend falls back)",
        "the CUDA backend does not use the shipped fatbin: nvrtc (no sm_90)",
    ]
    (out / "preflight.log").write_text("PREFLIGHT FAILED: CUDA is unusable: cudaGetDeviceCount failed\n")
    assert _verdict(out, preflight="2", tests="", bench="") == [
        "PREFLIGHT FAILED: CUDA is unusable: cudaGetDeviceCount failed",
        "GPU tests: not run (the preflight failed)",
        "benchmark: not run (the preflight failed)",
    ]


# --- the pytest plugin --------------------------------------------------------------------------------


def _pytest(tmp_path, real_gpu, **env):
    (tmp_path / "test_probe.py").write_text(
        f"REAL_GPU = {real_gpu}\n\ndef test_one():\n    pass\n\ndef test_two():\n    pass\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, PREFLIGHT, "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'j.xml'}",
         str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=60,
    )  # fmt: skip


def test_the_gpu_tests_are_refused_on_the_double(tmp_path):
    result = _pytest(tmp_path, real_gpu=False)
    assert result.returncode == 3, result.stdout
    assert "the GPU tests would run on the CuPy double" in result.stdout + result.stderr
    assert "passed" not in result.stdout


def test_the_gpu_tests_run_on_a_real_gpu_and_stop_at_their_deadline_with_a_report(tmp_path):
    result = _pytest(tmp_path, real_gpu=True)
    assert result.returncode == 0 and "gpu-session: real GPU: yes" in result.stdout, result.stdout
    result = _pytest(tmp_path, real_gpu=True, GPU_SESSION_TESTS_DEADLINE_S="0")
    assert "gpu-session: stopped after 0 s" in result.stdout, result.stdout
    assert _load_preflight().junit_counts(str(tmp_path / "j.xml"))["passed"] == 1

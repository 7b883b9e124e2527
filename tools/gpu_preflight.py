"""The Python half of tools/gpu_session.sh, one subcommand per step of a session on a lent GPU:

    python tools/gpu_preflight.py record         what the machine has: Python, packages, CuPy, CUDA
    python tools/gpu_preflight.py requirements   the project's runtime requirements, as imported
    python tools/gpu_preflight.py preflight      about a minute: is the GPU usable for this project?
    python tools/gpu_preflight.py pytest ARGS    pytest ARGS, refusing to run the GPU tests on the double
    python tools/gpu_preflight.py summary ...    the verdict of the whole session (exit 1 on any problem)

``record`` uses the standard library alone and catches everything, so it says what it can on a
machine where nothing else works. ``preflight`` stops at the first check that fails and prints
``PREFLIGHT FAILED: <reason>`` as its last line (exit 2); every check it passes is a line starting
with ``PREFLIGHT``, which the summary repeats. Nothing here imports gpuckpt or CuPy at module
level: the session's test (tests/test_gpu_session.py) runs it on machines with neither.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import re
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP = "../shared/tools/device-prep crc32c protobuf ml_dtypes"  # here, before the device call
# Distributions worth naming in the device record (the rest are listed in one line after them).
NOTABLE = [
    "cupy-cuda13x", "cupy-cuda12x", "cupy", "numpy", "protobuf", "crc32c", "ml_dtypes", "ml-dtypes",
    "pytest", "pytest-timeout", "hypothesis", "torch", "safetensors", "jax", "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime", "cuda-bindings",
]  # fmt: skip
# The runtime requirements as (import name, distribution, lowest version), read from pyproject.toml
# where it can be parsed; these are its values, for a machine where it cannot.
REQUIREMENTS = [("numpy", "numpy", "1.26"), ("google.protobuf", "protobuf", "7.35.1"),
                ("crc32c", "crc32c", "2.4"), ("ml_dtypes", "ml_dtypes", "0.5.1")]  # fmt: skip
IMPORT_NAMES = {"protobuf": "google.protobuf", "ml-dtypes": "ml_dtypes"}


def say(line: str) -> None:
    print(line, flush=True)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def requirements() -> list[tuple[str, str, str]]:
    """(import name, distribution, lowest version) for each runtime dependency in pyproject.toml."""
    try:
        import tomllib

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    except Exception:  # Python 3.10 (no tomllib) or no pyproject: the copy above
        return REQUIREMENTS
    found = []
    for dep in deps:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", dep)
        if match:
            name = match[1]
            found.append((IMPORT_NAMES.get(name.replace("_", "-"), name.replace("-", "_")), name, match[2]))
    return found or REQUIREMENTS


def check_requirements() -> list[str]:
    """One problem per requirement that is missing or too old, as imported (wheels carried in
    front of the image's own packages)."""
    problems = []
    for module_name, dist, lowest in requirements():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            problems.append(f"{dist} cannot be imported ({type(exc).__name__}: {exc})")
            continue
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "0"
        where = os.path.dirname(getattr(module, "__file__", None) or "?")
        say(f"  {dist} {version} from {where} (needs >= {lowest})")
        if _version_tuple(str(version)) < _version_tuple(lowest):
            problems.append(f"{dist} {version} is older than the {lowest} the project needs")
    return problems


# --- record ---------------------------------------------------------------------------------------


def _try(label: str, fn: Any) -> Any:
    try:
        value = fn()
    except BaseException as exc:  # noqa: B036 - a record line, whatever went wrong
        say(f"{label}: unavailable ({type(exc).__name__}: {exc})")
        return None
    if value is not None:
        say(f"{label}: {value}")
    return value


def record() -> int:
    say("## Python")
    say(f"python: {sys.version.split()[0]} at {sys.executable} ({platform.platform()})")
    say(f"PYTHONPATH: {os.environ.get('PYTHONPATH', '')}")
    say("## Python packages (installed distributions)")
    versions = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or "?"
        versions[name.lower()] = dist.version
    for name in NOTABLE:
        if name in versions:
            say(f"  {name} {versions[name]}")
    say(f"  missing: {', '.join(n for n in NOTABLE if n not in versions) or '-'}")
    say("all: " + " ".join(f"{n}=={v}" for n, v in sorted(versions.items())))
    say("## CuPy and CUDA")
    cupy = _try("cupy", lambda: importlib.import_module("cupy"))
    if cupy is None:
        return 0
    _try("cupy version", lambda: cupy.__version__)
    runtime = cupy.cuda.runtime
    _try("CUDA runtime version", lambda: runtime.runtimeGetVersion())
    _try("CUDA driver version", lambda: runtime.driverGetVersion())
    _try("NVRTC version", lambda: cupy.cuda.nvrtc.getVersion())
    count = _try("devices", lambda: runtime.getDeviceCount()) or 0
    for index in range(count):

        def describe(index: int = index) -> str:
            p = runtime.getDeviceProperties(index)
            return (
                f"{p['name'].decode()} sm_{p['major']}{p['minor']}, {p['totalGlobalMem'] / 2**30:.1f} GiB, "
                f"{p['multiProcessorCount']} SMs, PCI {p['pciBusID']:02x}:{p['pciDeviceID']:02x}"
            )

        _try(f"device {index}", describe)
    return 0


def requirements_main() -> int:
    say("## the project's runtime requirements, as this session imports them")
    problems = check_requirements()
    say("requirements: " + ("OK" if not problems else "NOT MET: " + "; ".join(problems)))
    return 1 if problems else 0


# --- preflight ------------------------------------------------------------------------------------


class Stop(Exception):
    """A preflight check failed: the message is the session's reason to stop."""


def preflight(work_dir: str, deadline_s: float) -> int:
    start = time.monotonic()
    state = {"step": "start"}

    def step(name: str) -> None:
        if time.monotonic() - start > deadline_s:
            raise Stop(f"the preflight ran past its {deadline_s:.0f} s before '{name}' (last: {state['step']})")
        state["step"] = name
        say(f"... {name} (at {time.monotonic() - start:.1f} s)")

    try:
        _preflight_checks(step, work_dir)
    except Stop as stop:
        say(f"PREFLIGHT FAILED: {stop}")
        return 2
    except BaseException as exc:  # noqa: B036 - an unexpected error is a reason too, with its trace
        traceback.print_exc(file=sys.stdout)
        say(f"PREFLIGHT FAILED: {state['step']}: {type(exc).__name__}: {exc}")
        return 2
    say(f"PREFLIGHT OK in {time.monotonic() - start:.1f} s")
    return 0


def _preflight_checks(step: Any, work_dir: str) -> None:
    step("the project's requirements")
    problems = check_requirements()
    if problems:
        raise Stop("; ".join(problems) + f" (carry the wheels: {PREP} here, then carry ['.whl'])")
    import numpy as np

    try:
        import gpuckpt
        from gpuckpt._proto import tensor_bundle_pb2  # noqa: F401 - the gencode's protobuf check
    except Exception as exc:
        raise Stop(f"gpuckpt cannot be imported: {type(exc).__name__}: {exc}") from None
    say(f"PREFLIGHT gpuckpt from {os.path.dirname(gpuckpt.__file__)}")

    step("CUDA: import cupy, count devices")
    try:
        import cupy
    except Exception as exc:
        raise Stop(f"CUDA is unusable: CuPy cannot be imported ({type(exc).__name__}: {exc})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise Stop(f"CUDA is unusable: cudaGetDeviceCount failed ({type(exc).__name__}: {exc})") from None
    if count < 1:
        raise Stop("CUDA is unusable: cudaGetDeviceCount found no device")
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name, arch = props["name"].decode(), f"sm_{props['major']}{props['minor']}"
    except Exception as exc:  # the CuPy double has no properties; a GPU whose query fails is a finding
        name, arch = f"(no properties: {type(exc).__name__})", "sm_?"
    say(f"PREFLIGHT CUDA: {count} device(s), device 0 {name} {arch}, CuPy {cupy.__version__}")

    step("CUDA: a small allocation and copies both ways, pageable and pinned")
    seed = int(time.time())  # fresh inputs each run (METHOD.md), the seed logged to reproduce them
    rng = np.random.default_rng(seed)
    host = rng.integers(0, 2**32, 1 << 20, dtype=np.uint32)
    try:
        device = cupy.asarray(host)
        if cupy.asnumpy(device).tobytes() != host.tobytes():
            raise Stop("CUDA is unusable: 4 MiB copied to the GPU and back came back different")
        pinned = cupy.cuda.alloc_pinned_memory(host.nbytes)
        staged = np.frombuffer(pinned, np.uint32, host.size)
        staged[:] = host[::-1]
        stream = cupy.cuda.Stream(non_blocking=True)
        runtime = cupy.cuda.runtime
        runtime.memcpyAsync(device.data.ptr, staged.ctypes.data, host.nbytes, runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()
        if cupy.asnumpy(device).tobytes() != host[::-1].tobytes():
            raise Stop("CUDA is unusable: a pinned cudaMemcpyAsync on a non-blocking stream gave other bytes")
        free, total = runtime.memGetInfo()
    except Stop:
        raise
    except Exception as exc:
        raise Stop(f"CUDA is unusable: a 4 MiB allocation or copy failed ({type(exc).__name__}: {exc})") from None
    say(f"PREFLIGHT CUDA: copies OK, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free (random seed {seed})")

    loaded = _check_kernels(step, cupy, np, rng, arch)
    if not loaded:
        raise Stop("no kernels: neither kernels/convert.fatbin nor the NVRTC fallback loaded (lines above)")

    step("a small restore to the GPU, against the host restore bit for bit")
    _check_restore(cupy, np, rng, work_dir)


def _check_kernels(step: Any, cupy: Any, np: Any, rng: Any, arch: str) -> list[str]:
    """Loads the kernels both ways the CUDA backend can (the shipped fatbin, NVRTC of the expanded
    sources), runs one conversion from each on fresh random float32 bit patterns and specials, and
    compares with its host twin. Returns the ways that worked."""
    from gpuckpt.host.convert import reference_convert
    from gpuckpt.kernel_sources import expanded_source, fatbin_path

    specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFBFFFFF, 1, 0x807FFFFF,
                         0x3F808000, 0x3F818000, 0x477FF000, 0x33000000], np.uint32)  # fmt: skip
    bits = np.concatenate([specials, rng.integers(0, 2**32, 1 << 18, dtype=np.uint32)])
    expected = reference_convert("f32_to_bf16", bits).view(np.uint16)

    def run(module: Any) -> str | None:
        function = module.get_function("gpuckpt_f32_to_bf16")
        src = cupy.asarray(bits)
        # Poisoned, and filled by a copy: cupy.full would compile CuPy's own kernel with NVRTC.
        dst = cupy.asarray(np.full(bits.size, 0xDEAD, np.uint16))
        function(((bits.size + 255) // 256,), (256,), (src, dst, np.uint64(bits.size)))
        cupy.cuda.runtime.deviceSynchronize()
        got = cupy.asnumpy(dst)
        wrong = np.flatnonzero(got != expected)
        if wrong.size:
            i = int(wrong[0])
            return (
                f"{wrong.size} of {bits.size} differ from the host twin (first: {bits[i]:#010x} -> {got[i]:#06x}, "
                f"host {expected[i]:#06x})"
            )
        return None

    loaded = []
    step("kernels: kernels/convert.fatbin with cupy.RawModule(path=...)")
    path = fatbin_path()
    if path is None:
        say("PREFLIGHT kernels fatbin: FAILED: kernels/convert.fatbin is missing (python tools/build_kernels.py)")
    else:
        started = time.monotonic()
        try:
            problem = run(cupy.RawModule(path=path))
        except Exception as exc:
            problem = f"did not load or run on {arch}: {type(exc).__name__}: {exc}"
        if problem:
            say(f"PREFLIGHT kernels fatbin: FAILED: {problem}")
        else:
            loaded.append("fatbin")
            say(f"PREFLIGHT kernels fatbin: OK on {arch} in {time.monotonic() - started:.2f} s (f32_to_bf16 bit-exact)")

    step("kernels: NVRTC compile of gpuckpt.kernel_sources.expanded_source() (the fallback)")
    started = time.monotonic()
    try:
        problem = run(cupy.RawModule(code=expanded_source("convert.cu"), options=("--std=c++14",)))
    except Exception as exc:
        problem = f"did not compile or run on {arch}: {type(exc).__name__}: {exc}"
    if problem:
        say(f"PREFLIGHT kernels NVRTC: FAILED: {problem}")
    else:
        loaded.append("nvrtc")
        say(f"PREFLIGHT kernels NVRTC: OK on {arch} in {time.monotonic() - started:.2f} s (f32_to_bf16 bit-exact)")

    step("kernels: which of the two the CUDA backend takes (gpuckpt.cuda.kernels.load_kernels)")
    try:
        import warnings

        from gpuckpt.cuda.kernels import load_kernels

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _module, origin = load_kernels(cupy)
        why = "; ".join(str(w.message) for w in caught)
        say(f"PREFLIGHT kernels the backend takes: {origin}" + (f" ({why})" if why else ""))
    except ImportError:
        pass  # a gpuckpt from before gpuckpt/cuda/kernels.py
    except Exception as exc:  # the restore check below fails too; this line says why first
        say(f"PREFLIGHT kernels the backend takes: none ({type(exc).__name__}: {exc})")
    return loaded


def _check_restore(cupy: Any, np: Any, rng: Any, work_dir: str) -> None:
    import ml_dtypes

    import gpuckpt

    def floats(dtype: Any, n: int) -> Any:
        width = np.dtype(dtype).itemsize
        return rng.integers(0, 2 ** (8 * width) - 1, n, dtype=f"u{width}", endpoint=True).view(dtype)

    tensors = {
        "f32": floats(np.float32, 300_000).reshape(-1, 100),  # every bit pattern kind: NaNs, subnormals
        "bf16": floats(ml_dtypes.bfloat16, 200_000),
        "f16": floats(np.float16, 65_536),
        "f64": floats(np.float64, 50_000),
        "i64": rng.integers(-(2**62), 2**62, 1000, dtype=np.int64),
        "u8": rng.integers(0, 256, 5000, dtype=np.uint8),
        "scalar": np.float32(rng.standard_normal()),
    }
    os.makedirs(work_dir, exist_ok=True)
    prefix = os.path.join(tempfile.mkdtemp(dir=work_dir), "ckpt")
    gpuckpt.save(prefix, tensors)

    def compare(device: dict, host: dict, what: str) -> None:
        if set(device) != set(host):
            raise Stop(f"{what}: the GPU restore returned {sorted(device)}, the host one {sorted(host)}")
        for name, value in host.items():
            array = device[name]
            got = cupy.asnumpy(array)
            if got.dtype != value.dtype or got.shape != value.shape or got.tobytes() != value.tobytes():
                raise Stop(
                    f"{what}: '{name}' differs from the host restore ({got.dtype}{list(got.shape)} against "
                    f"{value.dtype}{list(value.shape)}, {type(array).__module__}.{type(array).__name__})"
                )

    started = time.monotonic()
    with gpuckpt.open(prefix) as ckpt:
        host = ckpt.restore()
        compare(ckpt.restore(device="cuda"), host, "restore(device='cuda')")
        took = time.monotonic() - started
        say(f"PREFLIGHT restore: {len(host)} tensors on the GPU bit-exact with the host ({took:.2f} s)")
        for target in (np.float16, ml_dtypes.bfloat16):
            name = np.dtype(target).name
            compare(ckpt.restore(device="cuda", dtype=target), ckpt.restore(dtype=target), f"dtype={name}")
            say(f"PREFLIGHT restore dtype={name}: converted on the GPU bit-exact with the host's conversion")


# --- pytest ---------------------------------------------------------------------------------------


class RealGpuProbe:
    """A pytest plugin: after collection, every test module that says whether it found a real GPU
    (``REAL_GPU``, tests/test_gpu.py) must say yes, or the run stops before any test, so that a
    machine whose CUDA is unusable can never pass on the CuPy double. With
    ``GPU_SESSION_TESTS_DEADLINE_S`` set, no test starts after that many seconds, so pytest still
    writes its junit report before the session's ``timeout`` would kill it."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        deadline = os.environ.get("GPU_SESSION_TESTS_DEADLINE_S", "")
        self.deadline_s = float(deadline) if deadline else None

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        if self.deadline_s is not None and time.monotonic() - self.start > self.deadline_s and self.session:
            self.session.shouldstop = f"gpu-session: stopped after {self.deadline_s:.0f} s, the tests' time budget"

    def pytest_sessionstart(self, session: Any) -> None:
        self.session = session

    def pytest_collection_finish(self, session: Any) -> None:
        import pytest

        flags = {}
        for item in session.items:
            module = getattr(item, "module", None)
            if module is not None and hasattr(module, "REAL_GPU"):
                flags[module.__name__] = bool(module.REAL_GPU)
        say(f"gpu-session: REAL_GPU per module: {flags}")
        if not flags:
            pytest.exit("gpu-session: no collected module says whether it runs on a real GPU", returncode=3)
        if not all(flags.values()):
            pytest.exit("gpu-session: CUDA is unusable here, the GPU tests would run on the CuPy double", returncode=3)
        say("gpu-session: real GPU: yes")


def pytest_main(args: list[str]) -> int:
    import pytest

    return int(pytest.main(args, plugins=[RealGpuProbe()]))


# --- summary --------------------------------------------------------------------------------------


def junit_counts(path: str) -> dict[str, Any]:
    """tests, failures, errors, skipped (proper skips), xfailed, passed, and the names of the failed
    tests and skip reasons, from a pytest junit XML report."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    counts: dict[str, Any] = {"tests": len(cases), "failed": [], "skip_reasons": []}
    for key in ("failures", "errors", "skipped", "xfailed"):
        counts[key] = 0
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failures"] += 1
            counts["failed"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failed"].append(name)
        elif (skipped := case.find("skipped")) is not None:
            if skipped.get("type") == "pytest.xfail":
                counts["xfailed"] += 1
            else:
                counts["skipped"] += 1
                counts["skip_reasons"].append(skipped.get("message", ""))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"] - counts["xfailed"]
    return counts


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _rc(value: str) -> int | None:
    return int(value) if value.lstrip("-").isdigit() else None


def _rc_text(rc: int) -> str:
    return {124: "timed out", 137: "killed at its time limit", 125: "not run: the session's time budget was spent",
            127: "could not be started"}.get(rc, f"exit {rc}")  # fmt: skip


def summarize(out: str, preflight_rc: str, tests_rc: str, bench_rc: str, wheels: str) -> tuple[list[str], list[str]]:
    """(lines, problems) of the session whose files are in ``out``."""
    lines, problems = [f"wheels: {wheels}"], []
    device = _read(os.path.join(out, "device.txt"))
    if not device:
        problems.append("device.txt is missing: the device record was not written")
    record = device.splitlines()
    for i, line in enumerate(record):  # the GPU (the nvidia-smi query's first row), CuPy and CUDA
        if line.startswith("index, name") and i + 1 < len(record):
            lines.append(f"device: {record[i + 1]}")
        elif line.startswith(("cupy version:", "CUDA runtime version:", "CUDA driver version:", "requirements:")):
            lines.append(line)
    preflight_log = _read(os.path.join(out, "preflight.log"))
    lines += [line for line in preflight_log.splitlines() if line.startswith("PREFLIGHT") and "FAILED:" not in line]
    prc = _rc(preflight_rc)
    if prc != 0:
        reasons = [line for line in preflight_log.splitlines() if line.startswith("PREFLIGHT FAILED")]
        problems.append(reasons[-1] if reasons else f"PREFLIGHT FAILED: the preflight {_rc_text(prc or -1)}")
    if "PREFLIGHT kernels fatbin: FAILED" in preflight_log:
        problems.append("kernels/convert.fatbin did not load or ran wrong on this GPU (the CUDA backend falls back)")
    for line in preflight_log.splitlines():
        if line.startswith("PREFLIGHT kernels the backend takes:") and not line.endswith(": fatbin"):
            problems.append(f"the CUDA backend does not use the shipped fatbin: {line.split(': ', 1)[1]}")

    xml = os.path.join(out, "gpu-tests.xml")
    trc = _rc(tests_rc)
    if trc is None:
        problems.append("GPU tests: not run (the preflight failed)")
    elif not os.path.exists(xml):
        problems.append(f"GPU tests: {_rc_text(trc)}, no junit report (gpu-tests.log has what ran)")
    else:
        try:
            counts = junit_counts(xml)
        except ET.ParseError as exc:
            counts = None
            problems.append(f"GPU tests: the junit report cannot be read ({exc})")
        if counts is not None:
            lines.append(
                "GPU tests: {tests} collected, {passed} passed, {failures} failed, {errors} errors, "
                "{skipped} skipped, {xfailed} xfailed".format(**counts)
            )
            if counts["tests"] == 0:
                problems.append("GPU tests: none ran")
            elif counts["passed"] == 0:
                reasons = sorted(set(counts["skip_reasons"]))[:3]
                problems.append(f"GPU tests: every test was skipped or xfailed ({'; '.join(reasons) or 'no reason'})")
            if counts["failed"]:
                problems.append(f"GPU tests failed: {', '.join(counts['failed'][:10])}")
            if "gpu-session: stopped after" in _read(os.path.join(out, "gpu-tests.log")):
                problems.append(f"GPU tests: stopped at their time budget after {counts['tests']} tests")
            elif trc != 0 and not counts["failed"]:
                problems.append(f"GPU tests: pytest {_rc_text(trc)}")
        if "gpu-session: real GPU: yes" not in _read(os.path.join(out, "gpu-tests.log")):
            problems.append("GPU tests: the run did not confirm a real GPU (gpu-tests.log)")

    brc = _rc(bench_rc)
    bench_path = os.path.join(out, "gpu.json")
    if brc is None:
        problems.append("benchmark: not run (the preflight failed)")
    else:
        import json

        try:
            with open(bench_path) as f:
                bench = json.load(f)
        except (OSError, ValueError) as exc:
            bench = None
            problems.append(f"benchmark: {_rc_text(brc)}, no gpu.json ({type(exc).__name__})")
        if bench is not None:
            done = bench.get("stages_done", [])
            lines.append(f"benchmark: {bench.get('bytes', 0) / 1e9:.2f} GB, stages done: {', '.join(done)}")
            for key in sorted(k for k in bench if k.endswith("_GBps")):
                lines.append(f"  {key} {bench[key]:.2f}")
            for key, value in sorted((bench.get("ratios") or {}).items()):
                if value is not None:
                    lines.append(f"  {key} {value:.3f}")
            if bench.get("safetensors_error"):
                lines.append(f"  safetensors baseline failed: {bench['safetensors_error']}")
            if not bench.get("complete"):
                problems.append(f"benchmark: {_rc_text(brc)} before the end (gpu.json holds the stages done)")
            elif brc != 0:
                problems.append(f"benchmark: {_rc_text(brc)}")
    return lines, problems


def summary_main(args: argparse.Namespace) -> int:
    lines, problems = summarize(args.out, args.preflight_rc, args.tests_rc, args.bench_rc, args.wheels)
    for line in lines:
        say(line)
    for problem in problems:
        say(f"FAIL: {problem}")
    say(f"GPU SESSION: {'FAIL (' + str(len(problems)) + ' problems)' if problems else 'PASS'}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pytest"]:
        return pytest_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record")
    sub.add_parser("requirements")
    pre = sub.add_parser("preflight")
    pre.add_argument("--work-dir", default=tempfile.gettempdir())
    pre.add_argument("--deadline-s", type=float, default=60.0)
    summary = sub.add_parser("summary")
    summary.add_argument("--out", required=True)
    for name in ("preflight", "tests", "bench"):
        summary.add_argument(f"--{name}-rc", default="", help="the step's exit status; empty: not run")
    summary.add_argument("--wheels", default="")
    args = parser.parse_args(argv)
    if args.command == "record":
        return record()
    if args.command == "requirements":
        return requirements_main()
    if args.command == "preflight":
        return preflight(args.work_dir, args.deadline_s)
    return summary_main(args)


if __name__ == "__main__":
    sys.exit(main())

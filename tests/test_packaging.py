"""The committed protobuf modules match protos/, the package imports without CuPy or TensorFlow,
the wheel carries what it needs and works installed outside the source tree, and the lowest-versions
CI job pins exactly the lower bounds pyproject.toml declares."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_protos_match_schemas(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the protobuf modules")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = tmp_path / "gpuckpt" / "_proto"
    committed = os.path.join(ROOT, "gpuckpt", "_proto")
    names = sorted(p.name for p in generated.glob("*_pb2.py*"))
    assert names == sorted(n for n in os.listdir(committed) if "_pb2.py" in n)
    for name in names:
        assert filecmp.cmp(generated / name, os.path.join(committed, name), shallow=False), name


def test_import_and_cpu_path_need_neither_cupy_nor_tensorflow():
    code = (
        "import sys\n"
        "for blocked in ('cupy', 'tensorflow', 'torch'): sys.modules[blocked] = None\n"
        "import gpuckpt\n"
        f"ck = gpuckpt.open({os.path.join(ROOT, 'tests', 'fixtures', 'data', 'keras_adam')!r})\n"
        "assert len(ck.restore()) == 16\n"
        "try:\n"
        "    gpuckpt.open(ck.prefix, device='cuda')\n"
        "except gpuckpt.DeviceUnavailableError as e:\n"
        "    print('refused:', e)\n"
        "assert not any(m in sys.modules and sys.modules[m] is not None for m in ('cupy', 'tensorflow'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout


def test_public_api_names():
    import gpuckpt

    for name in [
        "open",
        "load_checkpoint",
        "list_variables",
        "latest_checkpoint",
        "Checkpoint",
        "CheckpointError",
        "FormatError",
        "ChecksumError",
        "TensorNotFoundError",
        "UnsupportedError",
        "DeviceUnavailableError",
        "CheckpointExistsError",
    ]:
        assert hasattr(gpuckpt, name), name
    assert issubclass(gpuckpt.FormatError, ValueError)
    assert issubclass(gpuckpt.ChecksumError, gpuckpt.FormatError)
    assert issubclass(gpuckpt.TensorNotFoundError, KeyError)
    assert issubclass(gpuckpt.UnsupportedError, NotImplementedError)
    assert issubclass(gpuckpt.DeviceUnavailableError, RuntimeError)
    assert issubclass(gpuckpt.CheckpointExistsError, FileExistsError)
    for cls in (
        gpuckpt.FormatError,
        gpuckpt.TensorNotFoundError,
        gpuckpt.UnsupportedError,
        gpuckpt.DeviceUnavailableError,
        gpuckpt.CheckpointExistsError,
    ):
        assert issubclass(cls, gpuckpt.CheckpointError)


# --- the wheel, installed outside the source tree ---------------------------------------------------

# Never copied into the build: environments, VCS data and earlier build outputs (a stale build/ or
# *.egg-info/SOURCES.txt would otherwise leak files into the wheel, or hide missing ones).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis",
    ".whl", ".bench", ".fuzz-failures",
)  # fmt: skip


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline (no index, no build isolation: the running environment's setuptools,
    which the test extra guarantees) from a copy of the working tree."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", base / "dist", src])  # fmt: skip
    (built,) = (base / "dist").glob("gpuckpt-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment outside the source tree with the wheel installed in it; its python."""
    env = tmp_path_factory.mktemp("env") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env])
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    # The dependencies (numpy, ml_dtypes, protobuf, crc32c) come from the running environment: a .pth
    # line appends its site-packages to the fresh one's sys.path, after the fresh one. .pth files are
    # processed only in site directories, so the running environment's own .pth files (the editable
    # install's finder hook among them) stay inactive there; the tests check gpuckpt.__file__ anyway.
    deps = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    deps += [p for p in site.getsitepackages() if p not in deps and os.path.isdir(p)]
    Path(purelib, "_gpuckpt_test_deps.pth").write_text("".join(p + "\n" for p in deps))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    return python


def test_wheel_holds_every_tracked_file(wheel_names):
    try:
        listed = subprocess.run(["git", "ls-files", "gpuckpt", "kernels"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip(f"not a git checkout: {listed.stderr.strip()[:200]}")
    tracked = {re.sub(r"^kernels/", "gpuckpt/kernels/", name) for name in listed.stdout.split()}
    assert "gpuckpt/cuda/__init__.py" in tracked
    assert sorted(tracked - wheel_names) == []


def test_wheel_holds_kernels_samples_and_nothing_outside_the_package(wheel_names):
    for required in [
        "gpuckpt/cuda/__init__.py",
        "gpuckpt/cuda/device.py",
        "gpuckpt/kernels/__init__.py",
        "gpuckpt/kernels/convert.cu",
        "gpuckpt/kernels/convert.cuh",
        "gpuckpt/kernels/conversions.def",
        "gpuckpt/_proto/tensor_bundle_pb2.py",
        "gpuckpt/_proto/tensor_bundle_pb2.pyi",
        "gpuckpt/py.typed",
        "gpuckpt/samples/keras_adam/checkpoint",
        "gpuckpt/samples/keras_adam/ckpt-2.index",
        "gpuckpt/samples/keras_adam/ckpt-2.data-00000-of-00001",
    ]:
        assert required in wheel_names, required
    for kernel_file in os.listdir(os.path.join(ROOT, "kernels")):  # compiled kernels too, once there are any
        if kernel_file.endswith((".cu", ".cuh", ".def", ".fatbin")):
            assert f"gpuckpt/kernels/{kernel_file}" in wheel_names, kernel_file
    stray = sorted(n for n in wheel_names if not n.startswith(("gpuckpt/", "gpuckpt-0")))
    assert stray == [], "files outside the gpuckpt package (a kernels/ or tests/ top-level package?)"


def test_installed_wheel_imports_the_gpu_backend(installed, tmp_path):
    code = (
        "import gpuckpt, gpuckpt.cuda, gpuckpt.cli, gpuckpt.kernel_sources as k\n"
        "print(gpuckpt.__file__); print(gpuckpt.cuda.__file__); print(k.kernel_dir())\n"
        "assert '__global__' in k.read_source('convert.cu')\n"
        "try:\n"
        "    with gpuckpt.open(gpuckpt.cli.SAMPLE, device='cuda') as ck:\n"
        "        ck.restore()\n"
        "    print('restored on a GPU')\n"
        "except gpuckpt.DeviceUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    out = _run([installed, "-I", "-c", code], cwd=tmp_path).stdout
    env = str(installed.parent.parent)
    package, cuda, kernels = out.splitlines()[:3]
    for path in (package, cuda, kernels):
        assert path.startswith(env + os.sep), (path, env)
    assert os.path.commonpath([package, ROOT]) != ROOT
    assert "refused:" in out or "restored on a GPU" in out


def test_installed_wheel_runs_the_sample_job(installed, tmp_path):
    env = str(installed.parent.parent)
    for command in ([installed, "-I", "-m", "gpuckpt"], [installed.parent / "gpuckpt"]):
        out = _run(command, cwd=tmp_path).stdout
        sample = out.split(":", 1)[0]
        assert sample.startswith(env + os.sep) and sample.endswith("keras_adam/ckpt-2"), out[:500]
        assert "restored 16 tensors" in out, out[-500:]


# --- the lowest-versions CI job --------------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1)).lower()


def test_lowest_constraints_pin_exactly_the_declared_lower_bounds():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        specifiers = requirement.split(";")[0]
        lower = re.search(r"(?:>=|==)\s*([0-9][^,\s]*)", specifiers)  # an exact pin is its own lower bound
        assert lower, f"{requirement!r}: every runtime and test dependency needs a lower bound"
        declared[_name(requirement)] = lower.group(1)
    pinned = {}
    with open(os.path.join(ROOT, "constraints", "lowest.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([0-9][^\s;]*)", line)
                assert match, f"constraints/lowest.txt: {line!r} is not an exact pin"
                pinned[_name(match.group(1))] = match.group(2)
    assert pinned == declared


def test_ci_runs_the_readme_test_command_verbatim_then_the_lowest_versions():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    commands = re.search(r"```sh\n(.*?)```", readme, re.S).group(1).splitlines()
    assert "pytest" in commands[1], commands
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert commands[1] in ci
    assert "-c constraints/lowest.txt" in ci and ".venv-lowest/bin/python -m pytest" in ci

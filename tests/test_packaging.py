"""The committed protobuf modules match protos/, the package imports without CuPy or TensorFlow,
and the wheel carries what it needs."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

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
    ]:
        assert hasattr(gpuckpt, name), name
    assert issubclass(gpuckpt.FormatError, ValueError)
    assert issubclass(gpuckpt.ChecksumError, gpuckpt.FormatError)
    assert issubclass(gpuckpt.TensorNotFoundError, KeyError)
    assert issubclass(gpuckpt.UnsupportedError, NotImplementedError)
    assert issubclass(gpuckpt.DeviceUnavailableError, RuntimeError)
    for cls in (
        gpuckpt.FormatError,
        gpuckpt.TensorNotFoundError,
        gpuckpt.UnsupportedError,
        gpuckpt.DeviceUnavailableError,
    ):
        assert issubclass(cls, gpuckpt.CheckpointError)


def test_wheel_carries_kernel_sources_protos_and_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), ROOT],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-300:]}")
    import zipfile

    (wheel,) = tmp_path.glob("gpuckpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "gpuckpt/kernels/convert.cu",
        "gpuckpt/kernels/convert.cuh",
        "gpuckpt/kernels/conversions.def",
        "gpuckpt/_proto/tensor_bundle_pb2.py",
        "gpuckpt/py.typed",
        "gpuckpt/samples/keras_adam/ckpt-2.index",
    ]:
        assert required in names, required

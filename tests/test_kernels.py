"""The GPU conversion arithmetic, checked on the host bit for bit against numpy and ml_dtypes.

The element functions of kernels/convert.cuh are compiled for the host (tests/harness/) and run on
every 8- and 16-bit input and millions of float32/float64 inputs (NaN payloads, infinities,
subnormals, exact ties). The CUDA sources are compiled for sm_80 and sm_90 with nvcc: the system's
where there is one, else the one from NVIDIA's wheels that the dev extra installs."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")

TYPES = {
    "f16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "f32": np.float32,
    "f64": np.float64,
    "f8e4m3fn": ml_dtypes.float8_e4m3fn,
    "f8e5m2": ml_dtypes.float8_e5m2,
}


def conversions() -> list[str]:
    with open(os.path.join(KERNELS, "conversions.def")) as f:
        return [line[2 : line.index(",")] for line in f if line.startswith("X(")]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host harness")
    library = tmp_path_factory.mktemp("harness") / "convert_host.so"
    source = os.path.join(ROOT, "tests", "harness", "convert_host.cpp")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(library), source], check=True)
    return ctypes.CDLL(str(library))


def run(harness, name: str, source: np.ndarray, target_type) -> np.ndarray:
    out = np.empty(source.shape, dtype=np.dtype(target_type))
    function = getattr(harness, f"gpuckpt_{name}")
    function(ctypes.c_void_p(source.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_size_t(source.size))
    return out


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.dtype.itemsize}")


def inputs(source: str, rng: np.random.Generator) -> np.ndarray:
    """Bit patterns to test for a source type: all of them for 8 and 16 bits; for 32 and 64 bits,
    random patterns plus every exponent with ties, near-ties and NaN payloads for each target."""
    dtype = np.dtype(TYPES[source])
    width = dtype.itemsize * 8
    if width <= 16:
        return np.arange(2**width, dtype=f"u{dtype.itemsize}").view(dtype)
    unsigned = np.dtype(f"u{dtype.itemsize}").type
    mbits = 23 if width == 32 else 52
    patterns = [rng.integers(0, 2**width, 2_000_000, dtype=np.uint64).astype(unsigned)]
    exponents = np.arange(2 ** (width - mbits - 1), dtype=np.uint64)
    for dropped in {mbits - 10, mbits - 7, mbits - 23} - {0}:  # bits dropped when narrowing to f16, bf16, f32
        if dropped <= 0:
            continue
        half = np.uint64(1) << np.uint64(dropped - 1)
        for low in (half, half - np.uint64(1), half + np.uint64(1), np.uint64(0)):
            upper = rng.integers(0, 2 ** (mbits - dropped), exponents.size, dtype=np.uint64) << np.uint64(dropped)
            for sign in (0, 1):
                value = (np.uint64(sign) << np.uint64(width - 1)) | (exponents << np.uint64(mbits)) | upper | low
                patterns.append(value.astype(unsigned))
    return np.concatenate(patterns).view(dtype)


@pytest.mark.parametrize("name", conversions())
def test_conversion_matches_numpy_and_ml_dtypes(harness, name):
    source, target = name.split("_to_")
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    values = inputs(source, rng)
    ours = run(harness, name, bits(values), TYPES[target])
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = values.astype(TYPES[target])
    mismatch = np.nonzero(bits(ours) != bits(theirs))[0]
    assert mismatch.size == 0, (
        f"{name}: {mismatch.size} of {values.size} differ, e.g. input {bits(values)[mismatch[0]]:#x}: "
        f"ours {bits(ours)[mismatch[0]]:#x}, reference {bits(theirs)[mismatch[0]]:#x}"
    )


@pytest.mark.parametrize("width", [2, 4, 8])
def test_byte_swaps(harness, width):
    data = np.random.default_rng(width).integers(0, 2**63, 1000, dtype=np.uint64).view(np.uint8)
    values = data.view(f"u{width}").copy()
    getattr(harness, f"gpuckpt_swap{width}")(ctypes.c_void_p(values.ctypes.data), ctypes.c_size_t(values.size))
    np.testing.assert_array_equal(values, data.view(f"u{width}").byteswap())


def _cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program: the system's (on PATH), else the one from NVIDIA's wheels (dev
    dependencies: nvidia-cuda-nvcc, nvidia-cuda-cuobjdump)."""
    import glob
    import site

    found = shutil.which(name)
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        found = found or next(iter(sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))), None)
    return found


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(tmp_path, arch):
    nvcc = _cuda_tool("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed (pip install -e '.[dev]' brings NVIDIA's nvcc wheel)")
    out = tmp_path / f"convert_{arch}.cubin"
    result = subprocess.run(
        [
            nvcc,
            f"-arch={arch}",
            "-cubin",
            "-Werror",
            "all-warnings",
            "-I",
            KERNELS,
            "-o",
            str(out),
            os.path.join(KERNELS, "convert.cu"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is not None:
        symbols = subprocess.run([cuobjdump, "-symbols", str(out)], capture_output=True, text=True, check=True)
        for name in conversions():
            assert f"gpuckpt_{name}" in symbols.stdout


def _load_nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (a dev dependency) or the system, else None."""
    import glob
    import site

    candidates = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    candidates += ["libnvrtc.so"]
    for path in candidates:
        if "builtins" in path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc_as_cupy_rawmodule_does(arch):
    """The runtime path: NVRTC (what cupy.RawModule uses) compiles the same source text the CUDA
    backend builds, with its #line prefix and include path, without system headers."""
    nvrtc = _load_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc is not installed (pip install nvidia-cuda-nvrtc)")
    from gpuckpt.kernel_sources import kernel_dir, read_source

    source = ('#line 1 "convert.cu"\n' + read_source("convert.cu")).encode()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"convert.cu", 0, None, None) == 0
    options = [f"-I{kernel_dir()}".encode(), b"--std=c++14", f"--gpu-architecture={arch}".encode()]
    array = (ctypes.c_char_p * len(options))(*options)
    status = nvrtc.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    ptx_size = ctypes.c_size_t()
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(ptx_size))
    ptx = ctypes.create_string_buffer(ptx_size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode(errors="replace")
    for name in conversions() + ["swap2", "swap4", "swap8"]:
        assert f".entry gpuckpt_{name}(".encode() in ptx.value, name

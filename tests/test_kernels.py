"""The conversion arithmetic of the GPU kernels and of the host, checked bit for bit against an
independent reference of the project's rule (tests/float_reference.py), never against whatever the
installed numpy or ml_dtypes happen to do.

The element functions of kernels/convert.cuh are compiled for the host (tests/harness/) and run on
every 8- and 16-bit input and millions of float32/float64 inputs (NaN payloads, infinities,
subnormals, exact ties and their neighbours), the same inputs go through gpuckpt/host/floats.py,
and the two must agree with the reference and with each other. numpy and ml_dtypes are compared
only where their documented behaviour is the same rule, and only on non-NaN values. The CUDA
sources are compiled for sm_80 and sm_90 with nvcc: the system's where there is one, else the one
from NVIDIA's wheels that the dev extra installs."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import zlib

import float_reference
import numpy as np
import pytest

from gpuckpt.host.floats import FORMATS, convert_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")


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


def run(harness, name: str, source: np.ndarray) -> np.ndarray:
    """The kernel's element function applied to the bit patterns ``source``."""
    target = FORMATS[name.split("_to_")[1]]
    out = np.empty(source.shape, dtype=f"u{target.width // 8}")
    function = getattr(harness, f"gpuckpt_{name}")
    function(ctypes.c_void_p(source.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_size_t(source.size))
    return out


def inputs(source: str) -> np.ndarray:
    """Bit patterns to test for a source format: all of them for 8 and 16 bits; for 32 and 64 bits,
    random patterns plus, at every exponent, exact ties, their neighbours and zero low bits for
    each narrower format, with random upper bits and NaN payloads. Seeded from the name (crc32, not
    ``hash``, which changes from run to run), so a failure reproduces."""
    fmt = FORMATS[source]
    unsigned = np.dtype(f"u{fmt.width // 8}")
    if fmt.width <= 16:
        return np.arange(2**fmt.width, dtype=unsigned)
    rng = np.random.default_rng(zlib.crc32(source.encode()))
    patterns = [rng.integers(0, 2**fmt.width, 2_000_000, dtype=np.uint64, endpoint=False).astype(unsigned)]
    exponents = np.arange(2**fmt.ebits, dtype=np.uint64)
    for narrower in ("f32", "f16", "bf16"):
        dropped = fmt.mbits - FORMATS[narrower].mbits
        if dropped <= 0:
            continue
        half = np.uint64(1) << np.uint64(dropped - 1)
        for low in (half, half - np.uint64(1), half + np.uint64(1), np.uint64(0), np.uint64(1)):
            for _ in range(4):
                upper = rng.integers(0, 2 ** (fmt.mbits - dropped), exponents.size, dtype=np.uint64)
                for sign in (0, 1):
                    value = (np.uint64(sign) << np.uint64(fmt.width - 1)) | (exponents << np.uint64(fmt.mbits))
                    patterns.append((value | (upper << np.uint64(dropped)) | low).astype(unsigned))
    return np.concatenate(patterns)


@pytest.fixture(scope="module")
def cases():
    return {source: inputs(source) for source in FORMATS}


@pytest.mark.parametrize("name", conversions())
def test_kernel_and_host_follow_the_rule(harness, cases, name):
    source, target = name.split("_to_")
    bits = cases[source]
    kernel = run(harness, name, bits)
    problem = float_reference.check(source, target, bits, kernel)
    assert problem is None, f"kernel {name}: {problem}"
    host = convert_bits(source, target, bits)
    assert host.dtype == kernel.dtype
    differ = np.flatnonzero(host != kernel)
    assert differ.size == 0, f"host {name}: {differ.size} differ from the kernel, e.g. input {int(bits[differ[0]]):#x}"


def test_inputs_cover_the_hard_cases(cases):
    """The 64-bit inputs hold what a double rounding gets wrong: values just above a bfloat16 tie
    whose float32 rounding lands exactly on the tie (0x394010000569e44f was one that ml_dtypes
    0.5 and this project's kernel once rounded the wrong way)."""
    f64 = cases["f64"]
    low = f64 & np.uint64((1 << 45) - 1)
    assert np.count_nonzero(low == np.uint64(1 << 44) + np.uint64(1)) > 1000  # just above a bf16 tie
    assert np.count_nonzero(low == np.uint64(1 << 44)) > 1000  # exact ties
    assert float_reference.is_nan(FORMATS["f64"], f64).sum() > 1000
    example = np.array([0x394010000569E44F], dtype=np.uint64)
    assert convert_bits("f64", "bf16", example)[0] == 0x0A01  # through float32 it would be 0x0a00
    assert float_reference.check("f64", "bf16", example, np.array([0x0A01], dtype=np.uint16)) is None


def _same_rule_reference():
    """numpy and ml_dtypes conversions whose documented behaviour is this rule for non-NaN values:
    numpy's float64->float32 is a C cast (IEEE 754 round to nearest even, subnormals kept as long
    as nothing set flush-to-zero); numpy's half conversions (npy_half.c) round to nearest even on
    bit patterns; ml_dtypes' float32->bfloat16 rounds to nearest even and its float8 and bfloat16
    widenings are exact."""
    import ml_dtypes

    return {
        "f64_to_f32": (np.float64, np.float32),
        "f64_to_f16": (np.float64, np.float16),
        "f32_to_f16": (np.float32, np.float16),
        "f16_to_f32": (np.float16, np.float32),
        "f32_to_f64": (np.float32, np.float64),
        "f32_to_bf16": (np.float32, ml_dtypes.bfloat16),
        "bf16_to_f32": (ml_dtypes.bfloat16, np.float32),
        "f8e4m3fn_to_f32": (ml_dtypes.float8_e4m3fn, np.float32),
        "f8e5m2_to_f32": (ml_dtypes.float8_e5m2, np.float32),
    }


@pytest.mark.parametrize("name", sorted(_same_rule_reference()))
def test_agrees_with_numpy_and_ml_dtypes_where_they_document_the_same_rule(cases, name):
    source, target = name.split("_to_")
    source_type, target_type = _same_rule_reference()[name]
    bits = cases[source]
    finite = ~float_reference.is_nan(FORMATS[source], bits)
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = bits[finite].view(source_type).astype(target_type).view(f"u{FORMATS[target].width // 8}")
    ours = convert_bits(source, target, bits[finite])
    differ = np.flatnonzero(ours != theirs)
    assert differ.size == 0, f"{name}: {differ.size} differ, e.g. input {int(bits[finite][differ[0]]):#x}"


def test_reference_is_not_vacuous():
    """The reference catches the mistakes it exists for: flushing a subnormal, rounding a tie up,
    rounding twice, and losing a NaN's payload or its quiet bit."""
    f32 = FORMATS["f32"]
    subnormal = np.array([0x00000001], dtype=np.uint32)
    assert float_reference.check("f32", "f64", subnormal, np.array([0], dtype=np.uint64)) is not None
    tie = np.array([0x3F808000], dtype=np.uint32)  # 1.00390625: halfway between two bfloat16 values
    assert float_reference.check("f32", "bf16", tie, np.array([0x3F81], dtype=np.uint16)) is not None
    assert float_reference.check("f32", "bf16", tie, np.array([0x3F80], dtype=np.uint16)) is None
    double_rounded = np.array([0x394010000569E44F], dtype=np.uint64)
    assert float_reference.check("f64", "bf16", double_rounded, np.array([0x0A00], dtype=np.uint16)) is not None
    signaling = np.array([0x7F800001], dtype=np.uint32)
    assert float_reference.check("f32", "f64", signaling, np.array([0x7FF0000020000000], dtype=np.uint64)) is not None
    assert float_reference.check("f32", "f64", signaling, np.array([0x7FF8000020000000], dtype=np.uint64)) is None
    assert f32.infinity == 0x7F800000


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
    """The fallback path: NVRTC (what cupy.RawModule(code=...) uses) compiles the expanded source
    the CUDA backend builds when the shipped fatbin cannot load, with no include path and no
    system headers."""
    nvrtc = _load_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc is not installed (pip install nvidia-cuda-nvrtc)")
    from gpuckpt.kernel_sources import expanded_source

    source = expanded_source("convert.cu").encode()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"convert.cu", 0, None, None) == 0
    options = [b"--std=c++14", f"--gpu-architecture={arch}".encode()]
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


def test_shipped_fatbin_matches_the_sources():
    """kernels/convert.fatbin was built from the kernels/ sources as they are now: its manifest's
    hash of the expanded sources matches, and where the pinned nvcc is installed (the dev extra),
    rebuilding gives the same bytes. An edit to convert.cuh without `python tools/build_kernels.py`
    fails here."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_kernels

    assert build_kernels.check(build_kernels.find_tool("nvcc")) == []


def test_shipped_fatbin_covers_every_architecture_and_kernel():
    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump is not installed (pip install -e '.[dev]' brings NVIDIA's wheel)")
    fatbin = os.path.join(KERNELS, "convert.fatbin")
    listing = subprocess.run([cuobjdump, "-lelf", "-lptx", fatbin], capture_output=True, text=True, check=True).stdout
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"):
        assert f".{arch}.cubin" in listing, arch
    assert "sm_120.ptx" in listing  # PTX for GPUs newer than the newest cubin
    symbols = subprocess.run([cuobjdump, "-symbols", fatbin], capture_output=True, text=True, check=True).stdout
    for name in conversions() + ["swap2", "swap4", "swap8"]:
        assert symbols.count(f"gpuckpt_{name}") >= 7, name


def test_expanded_source_inlines_every_local_include():
    """What NVRTC compiles when the fatbin cannot load: the whole text, headers inlined, so CuPy's
    cache (keyed by the source string) sees an edit to any of them."""
    from gpuckpt.kernel_sources import expanded_source, read_source

    text = expanded_source("convert.cu")
    assert '#include "' not in text
    assert read_source("convert.cuh").splitlines()[-3] in text
    assert "X(f64_to_bf16, uint64_t, uint16_t, f64_to_bf16)" in text
    assert text.startswith('#line 1 "convert.cu"')

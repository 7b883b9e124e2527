"""Turning a tensor's stored bytes into its numpy value: the reference that every backend matches."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..dtypes import DTypeInfo


def fix_in_place(array: np.ndarray, info: DTypeInfo, big_endian: bool) -> None:
    """Make freshly copied file bytes in ``array`` (native dtype) hold the right values.

    Byte-swaps each element (each component, for complex types) of a big-endian bundle
    (FORMAT.md 4.5), and clears the unused high bits of the 4- and 2-bit types, which TF stores one
    per byte (FORMAT.md 3.7); ml_dtypes keeps those bits zero too.
    """
    if array.size == 0:
        return
    flat = array.reshape(-1)
    if big_endian and info.swap_bytes:
        flat.view(np.dtype(f"u{info.swap_bytes}")).byteswap(inplace=True)
    if info.narrow_bits:
        flat.view(np.uint8)[...] &= (1 << info.narrow_bits) - 1


#: The numpy types behind the short names of kernels/conversions.def.
KERNEL_TYPES = {
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "f8e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "f8e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def kernel_for(source: np.dtype, target: np.dtype) -> str | None:
    """The conversion kernel from ``source`` to ``target`` (None if they are the same; KeyError if
    no kernel converts them)."""
    if source == target:
        return None
    names = {dtype: name for name, dtype in KERNEL_TYPES.items()}
    kernel = f"{names[source]}_to_{names[target]}"
    if kernel not in conversion_names():
        raise KeyError(kernel)
    return kernel


def conversion_names() -> tuple[str, ...]:
    """The conversions the kernels implement, read from kernels/conversions.def."""
    global _CONVERSIONS
    if _CONVERSIONS is None:
        from ..kernel_sources import read_source

        lines = read_source("conversions.def").splitlines()
        _CONVERSIONS = tuple(line[2 : line.index(",")] for line in lines if line.startswith("X("))
    return _CONVERSIONS


_CONVERSIONS: tuple[str, ...] | None = None


def reference_convert(kernel: str, raw: np.ndarray) -> np.ndarray:
    """The numpy twin of a conversion kernel: ``raw`` bytes of the source type, converted exactly
    as numpy/ml_dtypes ``astype`` does (the kernels match it bit for bit: tests/test_kernels.py)."""
    source, target = kernel.split("_to_")
    with np.errstate(invalid="ignore", over="ignore"):
        return raw.view(KERNEL_TYPES[source]).astype(KERNEL_TYPES[target])

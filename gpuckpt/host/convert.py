"""Turning a tensor's stored bytes into its numpy value: the reference that every backend matches."""

from __future__ import annotations

import numpy as np

from ..dtypes import DTypeInfo, numpy_dtype
from ..errors import UnsupportedError
from .floats import FORMATS, convert_bits


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


#: The numpy types (as :func:`~gpuckpt.dtypes.numpy_dtype` names them) behind the short names of
#: kernels/conversions.def.
KERNEL_TYPE_NAMES = {
    "f16": "float16",
    "bf16": "ml_dtypes.bfloat16",
    "f32": "float32",
    "f64": "float64",
    "f8e4m3fn": "ml_dtypes.float8_e4m3fn",
    "f8e5m2": "ml_dtypes.float8_e5m2",
}
_SHORT_NAMES = {name.removeprefix("ml_dtypes."): short for short, name in KERNEL_TYPE_NAMES.items()}


def kernel_for(source: np.dtype, target: np.dtype) -> str | None:
    """The conversion kernel from ``source`` to ``target`` (None if they are the same; KeyError if
    no kernel converts them)."""
    if source == target:
        return None
    kernel = f"{_SHORT_NAMES[np.dtype(source).name]}_to_{_SHORT_NAMES[np.dtype(target).name]}"
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
    """The host twin of a conversion kernel: ``raw`` (an array of the source type, or its bytes)
    converted by the project's rule (gpuckpt/host/floats.py), as an array of the target type. The
    kernels give the same bits (tests/test_kernels.py)."""
    source, target = kernel.split("_to_")
    source_width = FORMATS[source].width // 8
    bits = np.ascontiguousarray(raw).view(f"u{source_width}")
    return convert_bits(source, target, bits).view(numpy_dtype(KERNEL_TYPE_NAMES[target]))


def check_conversion(source: np.dtype, target: np.dtype, where: str) -> str | None:
    """The kernel converting ``source`` to ``target`` (None: the same type), or UnsupportedError
    ending with ``where`` (the file and tensor)."""
    try:
        return kernel_for(source, target)
    except KeyError:
        raise UnsupportedError(
            f"no conversion from {source} to {target} (dtype= converts float16, bfloat16, float32, float64, "
            f"float8_e4m3fn and float8_e5m2 to float16, bfloat16, float32 and float64): {where}"
        ) from None


def convert(array: np.ndarray, target: np.dtype, where: str) -> np.ndarray:
    """``array`` converted to ``target`` by the project's rule (itself when the types agree)."""
    kernel = check_conversion(array.dtype, target, where)
    return array if kernel is None else reference_convert(kernel, array).reshape(array.shape)

"""Turning a tensor's stored bytes into its numpy value: the reference that every backend matches."""

from __future__ import annotations

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

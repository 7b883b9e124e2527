"""CRC-32C and TensorFlow's masking of stored CRCs (FORMAT.md 0.3).

Backed by the ``crc32c`` package: hardware-accelerated (SSE4.2 / ARMv8) and it releases the GIL on
large buffers, so several reader threads checksum in parallel. It accepts any buffer (bytes, mmap
slices, memoryviews of numpy arrays), so no copy is made to checksum.
"""

from __future__ import annotations

from typing import Any

import crc32c as _crc32c

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (0 is the CRC of the empty string)."""
    return _crc32c.crc32c(data, crc)


def mask(crc: int) -> int:
    """TensorFlow's masked form of a CRC, as stored in files."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32

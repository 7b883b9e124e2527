"""CRC-32C and TensorFlow's masking of stored CRCs (FORMAT.md 0.3).

Backed by the ``crc32c`` package: hardware-accelerated (SSE4.2 / ARMv8) and it releases the GIL on
large buffers, so several reader threads checksum in parallel. It accepts any buffer (bytes, mmap
slices, memoryviews of numpy arrays), so no copy is made to checksum.
"""

from __future__ import annotations

import threading
from typing import Any

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (0 is the CRC of the empty string)."""
    return (_backend or _load_backend())(data, crc)


_backend: Any = None


def _load_backend() -> Any:
    """The ``crc32c`` package's function, imported on first use: the package reads its own version
    from importlib.metadata at import, ~20 ms that ``import gpuckpt`` should not pay."""
    global _backend
    from crc32c import crc32c as backend

    _backend = backend
    return backend


def mask(crc: int) -> int:
    """TensorFlow's masked form of a CRC, as stored in files."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


# ------------------------------------------------------------------------------------------------
# Combining CRCs of consecutive pieces: crc32c(a + b) from crc32c(a), crc32c(b) and len(b), so the
# pieces of one large tensor can be checksummed by several threads at once. The CRC register is a
# vector over GF(2); appending n zero bytes to a message is a linear operator on it (a 32x32 bit
# matrix, kept as its 32 columns), computed once per length and cached.

_POLY = 0x82F63B78  # CRC-32C, reflected
_operators: dict[int, tuple[int, ...]] = {}


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    result = 0
    column = 0
    while vector:
        if vector & 1:
            result ^= matrix[column]
        vector >>= 1
        column += 1
    return result


def _compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator "b, then a"."""
    return tuple(_apply(a, column) for column in b)


def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    cached = _operators.get(nbytes)
    if cached is not None:
        return cached
    one_bit = (_POLY,) + tuple(1 << i for i in range(31))  # shift the register by one zero bit
    step = _compose(one_bit, one_bit)
    step = _compose(step, step)
    step = _compose(step, step)  # one zero byte
    result = tuple(1 << i for i in range(32))  # identity
    n = nbytes
    while n:
        if n & 1:
            result = _compose(step, result)
        n >>= 1
        if n:
            step = _compose(step, step)
    if len(_operators) < 64:
        _operators[nbytes] = result
    return result


class PartChecksums:
    """The CRCs of consecutive parts ``[start, end)`` of one byte range, recorded by several threads
    in any order; whoever records the last one is told so, and ``combined()`` is the whole's CRC."""

    def __init__(self, bounds: list[tuple[int, int]]) -> None:
        self.bounds = bounds
        self._crcs = [0] * len(bounds)
        self._remaining = len(bounds)
        self._lock = threading.Lock()

    def record(self, part: int, crc: int) -> bool:
        """Record a part's CRC; True for the caller that recorded the last part."""
        with self._lock:
            self._crcs[part] = crc
            self._remaining -= 1
            return self._remaining == 0

    def combined(self) -> int:
        crc = self._crcs[0]
        for (start, end), part_crc in zip(self.bounds[1:], self._crcs[1:], strict=True):
            crc = crc32c_combine(crc, part_crc, end - start)
        return crc


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``."""
    if length_b == 0:
        return crc_a
    return _apply(_zeros_operator(length_b), crc_a) ^ crc_b

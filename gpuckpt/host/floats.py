"""Conversions between floating types, defined by this project and computed on bit patterns.

The rule (the same as kernels/convert.cuh, which the GPU runs; tests/test_kernels.py checks both
against an independent float64 reference on every 8- and 16-bit input and millions of 32- and
64-bit ones):

* finite values are rounded once, to nearest with ties to even (IEEE 754 roundTiesToEven);
  subnormal inputs and results are kept (never flushed to zero); a result too large for the target
  is infinity; signed zeros and infinities keep their sign;
* a NaN stays a NaN with its sign, made quiet (the target's top mantissa bit set), carrying the
  leading bits of its payload (cut when narrowing, padded with zeros when widening), as IEEE 754
  6.2.3 recommends and as x86 and CUDA hardware convert between float32 and float64;
  float8_e4m3fn has one NaN and no payload: it becomes the target's quiet NaN with that sign.

Only integer numpy operations are used (and ``frexp`` of integers below 2**53, to count their bits,
which is exact), so neither the floating-point environment (flush-to-zero set by some native
library) nor the installed numpy or ml_dtypes version can change a result.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating format: 1 sign bit, ``ebits`` exponent bits, ``mbits`` mantissa bits."""

    name: str
    ebits: int
    mbits: int
    has_infinity: bool = True  # IEEE-like: exponent all ones is infinity or NaN

    @property
    def width(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def infinity(self) -> int:
        return ((1 << self.ebits) - 1) << self.mbits


FORMATS = {
    f.name: f
    for f in (
        FloatFormat("f64", 11, 52),
        FloatFormat("f32", 8, 23),
        FloatFormat("f16", 5, 10),
        FloatFormat("bf16", 8, 7),
        FloatFormat("f8e5m2", 5, 2),
        # OCP float8 E4M3: no infinity; S.1111.111 is the only NaN, so 448 is the largest value.
        FloatFormat("f8e4m3fn", 4, 3, has_infinity=False),
    )
}

_U64 = np.uint64
_CHUNK = 1 << 16  # elements converted at a time, so the intermediate arrays stay in cache


def convert_bits(source: str, target: str, bits: np.ndarray) -> np.ndarray:
    """Convert ``bits`` (unsigned integers holding values of format ``source``) to the bit
    patterns of format ``target``, as unsigned integers of the target's width."""
    src, dst = FORMATS[source], FORMATS[target]
    if not dst.has_infinity:  # overflow and NaN would need that format's own encodings
        raise ValueError(f"no conversion to {target}: it has no infinity (only wider targets are defined)")
    flat = np.ascontiguousarray(bits).reshape(-1)
    if src.width <= 16:  # every input is in a table of at most 65,536 entries
        return _table(source, target)[flat].reshape(bits.shape)
    out = np.empty(flat.size, dtype=f"u{dst.width // 8}")
    for start in range(0, flat.size, _CHUNK):
        piece = flat[start : start + _CHUNK]
        result = out[start : start + _CHUNK]
        special = _convert_normal(src, dst, piece, result)
        if special.size:
            result[special] = _convert(src, dst, piece[special].astype(_U64))
    return out.reshape(bits.shape)


def _convert_normal(src: FloatFormat, dst: FloatFormat, u: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Convert the elements of ``u`` (32- or 64-bit patterns) whose source and result are both
    normal numbers into ``out``, with integer arithmetic in the source's width (the exponent is
    re-biased, the mantissa rounded by the add-and-shift of round-to-nearest-even); return the
    indices of the other elements (zeros, subnormals, infinities, NaNs), which ``_convert`` does."""
    unsigned = u.dtype.type
    magnitude = u & unsigned((1 << (src.width - 1)) - 1)
    rebias = (src.bias - dst.bias) << src.mbits  # may be negative when widening
    smallest = max(rebias, 0) + (1 << src.mbits)  # both the source and the result are normal
    special = np.flatnonzero((magnitude < unsigned(smallest)) | (magnitude >= unsigned(src.infinity)))
    sign = (u >> unsigned(src.width - 1)).astype(out.dtype) << out.dtype.type(dst.width - 1)
    if dst.mbits < src.mbits:
        drop = src.mbits - dst.mbits
        magnitude -= unsigned(rebias)
        magnitude += ((magnitude >> unsigned(drop)) & unsigned(1)) + unsigned((1 << (drop - 1)) - 1)
        magnitude >>= unsigned(drop)
        np.minimum(magnitude, unsigned(dst.infinity), out=magnitude)  # overflow: infinity
        out[...] = magnitude
    else:
        widened = magnitude.astype(out.dtype) << out.dtype.type(dst.mbits - src.mbits)
        widened += out.dtype.type((dst.bias - src.bias) << dst.mbits)
        out[...] = widened
    out |= sign
    return special


@functools.cache
def _table(source: str, target: str) -> np.ndarray:
    src, dst = FORMATS[source], FORMATS[target]
    table = _convert(src, dst, np.arange(1 << src.width, dtype=_U64)).astype(f"u{dst.width // 8}")
    table.flags.writeable = False
    return table


def _convert(src: FloatFormat, dst: FloatFormat, u: np.ndarray) -> np.ndarray:
    """The conversion of uint64 bit patterns, as uint64 bit patterns of ``dst``."""
    sign = (u >> _U64(src.width - 1)) << _U64(dst.width - 1)
    exp = (u >> _U64(src.mbits)) & _U64((1 << src.ebits) - 1)
    mant = u & _U64((1 << src.mbits) - 1)
    top = _U64((1 << src.ebits) - 1)
    if src.has_infinity:
        is_nan = (exp == top) & (mant != 0)
        is_inf = (exp == top) & (mant == 0)
    else:
        is_nan = (exp == top) & (mant == _U64((1 << src.mbits) - 1))
        is_inf = np.zeros_like(is_nan)

    # A finite value is m * 2**q, with m the significand as an integer (implicit bit included).
    m = np.where(exp != 0, mant | _U64(1 << src.mbits), mant)
    q = np.maximum(exp.astype(np.int64), 1) - (src.bias + src.mbits)
    _, length = np.frexp(m.astype(np.float64))  # bit length of m: exact, m < 2**53
    top_bit = q + length.astype(np.int64) - 1  # the value lies in [2**top_bit, 2**(top_bit + 1))
    lowest_lsb = 1 - dst.bias - dst.mbits  # the target's subnormal quantum
    lsb = np.maximum(top_bit - dst.mbits, lowest_lsb)
    shift = lsb - q

    # Round m * 2**-shift to an integer, ties to even; shifts past 63 give 0 (m < 2**53).
    right = np.minimum(np.maximum(shift, 0), 63).astype(_U64)
    left = np.maximum(-shift, 0).astype(_U64)
    kept = m >> right
    rest = m & ((_U64(1) << right) - _U64(1))
    half = (_U64(1) << right) >> _U64(1)
    round_up = (right > 0) & ((rest > half) | ((rest == half) & ((kept & _U64(1)) == 1)))
    kept = np.where(shift > 0, kept + round_up.astype(_U64), m << left)
    # kept * 2**lsb encodes as the field (lsb - lowest_lsb) above kept: kept's leading bit (or a
    # rounding carry) adds one to the exponent, and at lsb == lowest_lsb a kept below 2**mbits is
    # the subnormal encoding.
    magnitude = ((lsb - lowest_lsb).astype(_U64) << _U64(dst.mbits)) + kept
    magnitude = np.minimum(magnitude, _U64(dst.infinity))  # overflow: infinity
    magnitude = np.where(m == 0, _U64(0), magnitude)

    if src.has_infinity:
        payload = mant << _U64(dst.mbits - src.mbits) if dst.mbits >= src.mbits else mant >> _U64(src.mbits - dst.mbits)
    else:
        payload = np.zeros_like(mant)
    quiet_nan = _U64(dst.infinity | (1 << (dst.mbits - 1))) | payload
    magnitude = np.where(is_nan, quiet_nan, np.where(is_inf, _U64(dst.infinity), magnitude))
    return sign | magnitude

"""An independent reference for the project's floating conversions, in float64 arithmetic.

gpuckpt/host/floats.py and kernels/convert.cuh compute conversions with integer operations on bit
fields. This module computes the same rule another way, so the tests compare two derivations and
never the installed numpy or ml_dtypes:

* a value is decoded into float64 with ``ldexp`` (every value of every format here is exactly a
  float64), rounded with float64 arithmetic that is exact (scaling by powers of two, ``floor``,
  subtraction of the integer part), and compared as a float64, with the sign of zero;
* NaNs are checked field by field: sign, quiet bit, payload.
"""

from __future__ import annotations

import numpy as np

from gpuckpt.host.floats import FORMATS, FloatFormat


def decode(fmt: FloatFormat, bits: np.ndarray) -> np.ndarray:
    """The values of ``bits`` as float64 (NaN for every NaN)."""
    u = bits.astype(np.uint64)
    sign = np.where((u >> np.uint64(fmt.width - 1)) & np.uint64(1), -1.0, 1.0)
    exp = ((u >> np.uint64(fmt.mbits)) & np.uint64((1 << fmt.ebits) - 1)).astype(np.int64)
    mant = (u & np.uint64((1 << fmt.mbits) - 1)).astype(np.float64)
    top = (1 << fmt.ebits) - 1
    significand = np.where(exp == 0, mant, mant + 2.0**fmt.mbits)
    with np.errstate(over="ignore"):  # the all-ones exponent, replaced below
        value = np.ldexp(significand, np.maximum(exp, 1) - fmt.bias - fmt.mbits)
    if fmt.has_infinity:
        value = np.where(exp == top, np.where(mant == 0, np.inf, np.nan), value)
    else:
        value = np.where((exp == top) & (mant == 2.0**fmt.mbits - 1), np.nan, value)
    return sign * value


def is_nan(fmt: FloatFormat, bits: np.ndarray) -> np.ndarray:
    return np.isnan(decode(fmt, bits))


def round_to(fmt: FloatFormat, x: np.ndarray) -> np.ndarray:
    """``x`` (float64, no NaNs) rounded to ``fmt`` by roundTiesToEven, subnormals kept, overflow to
    infinity; as float64 values (with the sign of zero kept)."""
    assert fmt.has_infinity, "every target format has infinities"
    magnitude = np.abs(x)
    finite = np.isfinite(magnitude) & (magnitude > 0)
    safe = np.where(finite, magnitude, 1.0)
    _, exponent = np.frexp(safe)  # safe = f * 2**exponent, 0.5 <= f < 1
    lsb = np.maximum(exponent - 1 - fmt.mbits, 1 - fmt.bias - fmt.mbits)
    scaled = np.ldexp(safe, -lsb)  # exact: a power-of-two scaling of a float64
    whole = np.floor(scaled)
    fraction = scaled - whole  # exact
    odd = np.fmod(whole, 2.0) == 1.0
    whole = whole + ((fraction > 0.5) | ((fraction == 0.5) & odd))
    with np.errstate(over="ignore"):  # beyond float64: an overflow either way
        rounded = np.ldexp(whole, lsb)
    largest = np.ldexp(2.0 ** (fmt.mbits + 1) - 1, (1 << fmt.ebits) - 2 - fmt.bias - fmt.mbits)
    rounded = np.where(rounded > largest, np.inf, rounded)
    rounded = np.where(finite, rounded, magnitude)
    return np.copysign(rounded, x)


def expected_nan_bits(src: FloatFormat, dst: FloatFormat, bits: np.ndarray) -> np.ndarray:
    """The rule for NaNs: sign kept, quiet bit set, payload's leading bits kept (none for
    float8_e4m3fn, whose one NaN has no payload)."""
    u = bits.astype(np.uint64)
    sign = (u >> np.uint64(src.width - 1)) << np.uint64(dst.width - 1)
    payload = u & np.uint64((1 << src.mbits) - 1)
    if not src.has_infinity:
        payload = np.zeros_like(payload)
    elif dst.mbits >= src.mbits:
        payload = payload << np.uint64(dst.mbits - src.mbits)
    else:
        payload = payload >> np.uint64(src.mbits - dst.mbits)
    return sign | np.uint64(dst.infinity | (1 << (dst.mbits - 1))) | payload


def check(source: str, target: str, bits: np.ndarray, result: np.ndarray) -> str | None:
    """None if ``result`` is the conversion of ``bits`` by the rule, else a description of the first
    differences."""
    src, dst = FORMATS[source], FORMATS[target]
    nan = is_nan(src, bits)
    want = round_to(dst, decode(src, bits[~nan]))
    got = decode(dst, result[~nan])
    same = (got == want) & (np.signbit(got) == np.signbit(want))
    problems = []
    if not same.all():
        bad = np.flatnonzero(~same)
        i = bad[0]
        value = decode(src, bits[~nan][i : i + 1])[0]
        problems.append(
            f"{bad.size} values differ, e.g. input {int(bits[~nan][i]):#x} ({value!r}): "
            f"got {got[i]!r} ({int(result[~nan][i]):#x}), want {want[i]!r}"
        )
    want_nan = expected_nan_bits(src, dst, bits[nan])
    got_nan = result[nan].astype(np.uint64)
    if not (got_nan == want_nan).all():
        bad = np.flatnonzero(got_nan != want_nan)
        i = bad[0]
        problems.append(
            f"{bad.size} NaNs differ, e.g. input {int(bits[nan][i]):#x}: "
            f"got {int(got_nan[i]):#x}, want {int(want_nan[i]):#x}"
        )
    return "; ".join(problems) or None

// Element conversions between TensorFlow's floating types, on bit patterns only.
//
// Shared by the CUDA kernels (convert.cu) and a host test harness (tests/harness/convert_host.cpp)
// that checks every one bit for bit against an independent float64 reference and against the
// host implementation of the same rule (gpuckpt/host/floats.py): every 8- and 16-bit input, and
// millions of float32/float64 inputs with NaN payloads, infinities, subnormals and rounding ties.
// No floating-point arithmetic is used, so device flush-to-zero modes and fused operations cannot
// change a result, and host and device agree by construction.
//
// The rule (README, "Conversions"): finite values are rounded once, to nearest with ties to even;
// subnormals are kept; overflow gives infinity; a NaN stays a NaN with its sign, quieted (top
// mantissa bit set), carrying the leading bits of its payload (cut or zero-padded). float8_e4m3fn
// has a single NaN, which becomes the target's quiet NaN with its sign.
#pragma once
#ifdef __CUDACC_RTC__  // NVRTC (cupy.RawModule) has no C headers
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#ifdef __CUDACC__
#define GPUCKPT_HD __host__ __device__ __forceinline__
#else
#define GPUCKPT_HD static inline
#endif

namespace gpuckpt {

// Round the finite nonzero magnitude m * 2^(e - src_mbits) (the leading 1 of m at bit src_mbits)
// to a binary format with ebits exponent and mbits mantissa bits; returns the magnitude's bits
// (infinity on overflow, zero or a subnormal on underflow). Requires src_mbits > mbits.
GPUCKPT_HD uint64_t narrow_magnitude(uint64_t m, int e, int src_mbits, int ebits, int mbits) {
  const int bias = (1 << (ebits - 1)) - 1;
  const int biased = e + bias;
  int shift = src_mbits - mbits;
  if (biased <= 0) shift += 1 - biased;  // a subnormal result: drop more bits
  if (shift > src_mbits + 1) return 0;   // below half the smallest subnormal
  uint64_t kept = m >> shift;
  const uint64_t rest = m & ((1ull << shift) - 1);
  const uint64_t half = 1ull << (shift - 1);
  if (rest > half || (rest == half && (kept & 1))) kept++;
  // A normal result's kept has its leading 1 at bit mbits; adding it onto (biased - 1) << mbits
  // sets the exponent and lets a rounding carry move into it. A subnormal's exponent field is 0.
  uint64_t out = biased <= 0 ? kept : ((uint64_t)(biased - 1) << mbits) + kept;
  const uint64_t infinity = (uint64_t)((1 << ebits) - 1) << mbits;
  return out >= infinity ? infinity : out;
}

// Unpack a binary value's magnitude as (m, e) with m's leading 1 at bit mbits (subnormals normalized).
GPUCKPT_HD void unpack(uint64_t exp_field, uint64_t mant, int bias, int mbits, uint64_t* m, int* e) {
  if (exp_field == 0) {
    int shift = 0;
    while (!(mant & (1ull << mbits))) {
      mant <<= 1;
      shift++;
    }
    *m = mant;
    *e = 1 - bias - shift;
  } else {
    *m = mant | (1ull << mbits);
    *e = (int)exp_field - bias;
  }
}

// ---- to float16 ----
GPUCKPT_HD uint16_t f32_to_f16(uint32_t u) {
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t exp = (u >> 23) & 0xffu, mant = u & 0x7fffffu;
  if (exp == 0xffu) return sign | (mant ? (uint16_t)(0x7e00u | (mant >> 13)) : 0x7c00u);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 127, 23, &m, &e);
  return sign | (uint16_t)narrow_magnitude(m, e, 23, 5, 10);
}

GPUCKPT_HD uint16_t f64_to_f16(uint64_t u) {
  const uint16_t sign = (uint16_t)((u >> 48) & 0x8000u);
  const uint64_t exp = (u >> 52) & 0x7ffu, mant = u & 0xfffffffffffffull;
  if (exp == 0x7ffu) return sign | (mant ? (uint16_t)(0x7e00u | (mant >> 42)) : 0x7c00u);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 1023, 52, &m, &e);
  return sign | (uint16_t)narrow_magnitude(m, e, 52, 5, 10);
}

// ---- to float32 ----
GPUCKPT_HD uint32_t f64_to_f32(uint64_t u) {
  const uint32_t sign = (uint32_t)(u >> 32) & 0x80000000u;
  const uint64_t exp = (u >> 52) & 0x7ffu, mant = u & 0xfffffffffffffull;
  if (exp == 0x7ffu) return mant ? (sign | 0x7fc00000u | (uint32_t)(mant >> 29)) : (sign | 0x7f800000u);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 1023, 52, &m, &e);
  return sign | (uint32_t)narrow_magnitude(m, e, 52, 8, 23);
}

GPUCKPT_HD uint32_t f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return sign | (mant ? 0x7fc00000u | (mant << 13) : 0x7f800000u);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 15, 10, &m, &e);
  return sign | ((uint32_t)(e + 127) << 23) | (uint32_t)((m & 0x3ffu) << 13);
}

GPUCKPT_HD uint32_t bf16_to_f32(uint16_t b) {  // bfloat16 is the top half of a float32
  return ((uint32_t)b << 16) | ((b & 0x7fffu) > 0x7f80u ? 0x00400000u : 0u);
}

// ---- to float64 ----
GPUCKPT_HD uint64_t f32_to_f64(uint32_t u) {
  const uint64_t sign = (uint64_t)(u & 0x80000000u) << 32;
  const uint32_t exp = (u >> 23) & 0xffu, mant = u & 0x7fffffu;
  if (exp == 0xffu) return mant ? (sign | 0x7ff8000000000000ull | ((uint64_t)mant << 29)) : (sign | 0x7ff0000000000000ull);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 127, 23, &m, &e);
  return sign | ((uint64_t)(e + 1023) << 52) | ((m & 0x7fffffull) << 29);
}

GPUCKPT_HD uint64_t f16_to_f64(uint16_t h) {
  const uint64_t sign = (uint64_t)(h & 0x8000u) << 48;
  if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) return sign | 0x7ff8000000000000ull | ((uint64_t)(h & 0x3ffu) << 42);
  return f32_to_f64(f16_to_f32(h));  // exact for every non-NaN
}

GPUCKPT_HD uint64_t bf16_to_f64(uint16_t b) { return f32_to_f64(bf16_to_f32(b)); }

// ---- to bfloat16 ----
GPUCKPT_HD uint16_t f32_to_bf16(uint32_t u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // same exponent range: round the low half
}

GPUCKPT_HD uint16_t f64_to_bf16(uint64_t u) {  // rounded once (through float32 would round twice)
  const uint16_t sign = (uint16_t)((u >> 48) & 0x8000u);
  const uint64_t exp = (u >> 52) & 0x7ffu, mant = u & 0xfffffffffffffull;
  if (exp == 0x7ffu) return sign | (mant ? (uint16_t)(0x7fc0u | (mant >> 45)) : 0x7f80u);
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 1023, 52, &m, &e);
  return sign | (uint16_t)narrow_magnitude(m, e, 52, 8, 7);
}

GPUCKPT_HD uint16_t f16_to_bf16(uint16_t h) { return f32_to_bf16(f16_to_f32(h)); }  // f16->f32 is exact

GPUCKPT_HD uint16_t bf16_to_f16(uint16_t b) { return f32_to_f16(bf16_to_f32(b)); }  // bf16->f32 is exact

// ---- from float8 (exact) ----
GPUCKPT_HD uint32_t f8e4m3fn_to_f32(uint8_t v) {
  const uint32_t sign = (uint32_t)(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xfu, mant = v & 0x7u;
  if (exp == 0xfu && mant == 0x7u) return sign | 0x7fc00000u;  // the only NaN; e4m3fn has no infinity
  if (exp == 0 && mant == 0) return sign;
  uint64_t m;
  int e;
  unpack(exp, mant, 7, 3, &m, &e);
  return sign | ((uint32_t)(e + 127) << 23) | (uint32_t)((m & 0x7u) << 20);
}

GPUCKPT_HD uint32_t f8e5m2_to_f32(uint8_t v) {
  return f16_to_f32((uint16_t)((uint16_t)v << 8));  // e5m2 is the top byte of a float16
}

GPUCKPT_HD uint16_t f8e4m3fn_to_f16(uint8_t v) {
  if ((v & 0x7fu) == 0x7fu) return (uint16_t)(((uint16_t)(v & 0x80u) << 8) | 0x7e00u);
  return f32_to_f16(f8e4m3fn_to_f32(v));
}

GPUCKPT_HD uint16_t f8e5m2_to_f16(uint8_t v) {
  return (uint16_t)(((uint16_t)v << 8) | ((v & 0x7fu) > 0x7cu ? 0x0200u : 0u));  // a NaN is quieted
}

GPUCKPT_HD uint16_t f8e4m3fn_to_bf16(uint8_t v) { return f32_to_bf16(f8e4m3fn_to_f32(v)); }
GPUCKPT_HD uint16_t f8e5m2_to_bf16(uint8_t v) { return f32_to_bf16(f8e5m2_to_f32(v)); }
GPUCKPT_HD uint64_t f8e4m3fn_to_f64(uint8_t v) { return f32_to_f64(f8e4m3fn_to_f32(v)); }
GPUCKPT_HD uint64_t f8e5m2_to_f64(uint8_t v) { return f32_to_f64(f8e5m2_to_f32(v)); }

// ---- byte order ----
GPUCKPT_HD uint16_t swap2(uint16_t v) { return (uint16_t)((v << 8) | (v >> 8)); }
GPUCKPT_HD uint32_t swap4(uint32_t v) {
  return (v << 24) | ((v << 8) & 0x00ff0000u) | ((v >> 8) & 0x0000ff00u) | (v >> 24);
}
GPUCKPT_HD uint64_t swap8(uint64_t v) { return ((uint64_t)swap4((uint32_t)v) << 32) | swap4((uint32_t)(v >> 32)); }

}  // namespace gpuckpt

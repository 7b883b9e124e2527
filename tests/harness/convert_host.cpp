// Host build of the conversion functions the CUDA kernels use (kernels/convert.cuh), so the tests
// can check them against numpy/ml_dtypes without a GPU. Built by tests/test_kernels.py with g++.
#include <stddef.h>
#include <string.h>

#include "../../kernels/convert.cuh"

// Apply conversion `name` to n elements: extern "C" gpuckpt_<name>(src, dst, n), as on the device.
#define X(name, src_t, dst_t, fn)                                             \
  extern "C" void gpuckpt_##name(const src_t* src, dst_t* dst, size_t n) {   \
    for (size_t i = 0; i < n; i++) dst[i] = gpuckpt::fn(src[i]);              \
  }
#include "../../kernels/conversions.def"
#undef X

extern "C" void gpuckpt_swap2(uint16_t* d, size_t n) { for (size_t i = 0; i < n; i++) d[i] = gpuckpt::swap2(d[i]); }
extern "C" void gpuckpt_swap4(uint32_t* d, size_t n) { for (size_t i = 0; i < n; i++) d[i] = gpuckpt::swap4(d[i]); }
extern "C" void gpuckpt_swap8(uint64_t* d, size_t n) { for (size_t i = 0; i < n; i++) d[i] = gpuckpt::swap8(d[i]); }

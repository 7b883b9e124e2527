// CUDA kernels: dtype conversion of restored tensors on the device, and byte swapping for
// big-endian bundles. Raw bytes are copied to the GPU first, then converted here, so the host to
// device copy stays a plain DMA. The element functions live in convert.cuh (checked on the host,
// bit for bit, against the project's conversion rule); these kernels only apply them with
// grid-stride loops. Shipped compiled as convert.fatbin (tools/build_kernels.py) and loaded once
// per device by gpuckpt/cuda/kernels.py through cupy.RawModule(path=...); where that cannot load,
// NVRTC compiles the expanded source (gpuckpt/kernel_sources.py), whose #line directives point here.
#include "convert.cuh"

#define X(name, src_t, dst_t, fn)                                                          \
  extern "C" __global__ void gpuckpt_##name(const src_t* __restrict__ src,                \
                                            dst_t* __restrict__ dst, unsigned long long n) { \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; \
         i += (unsigned long long)gridDim.x * blockDim.x) {                                \
      dst[i] = gpuckpt::fn(src[i]);                                                        \
    }                                                                                      \
  }
#include "conversions.def"
#undef X

#define SWAP(bytes, type, fn)                                                              \
  extern "C" __global__ void gpuckpt_swap##bytes(type* __restrict__ data, unsigned long long n) { \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; \
         i += (unsigned long long)gridDim.x * blockDim.x) {                                \
      data[i] = gpuckpt::fn(data[i]);                                                      \
    }                                                                                      \
  }
SWAP(2, uint16_t, swap2)
SWAP(4, uint32_t, swap4)
SWAP(8, uint64_t, swap8)
#undef SWAP

// What the CUDA kernels of csrc/ share: the CUDA runtime (or, with FA_CUDA_SIM, the CPU simulator of
// cuda_sim.h), the launch helpers, dynamic shared memory, and deterministic warp and block sums.
#pragma once

#include <cstddef>
#include <utility>

#include "fa_common.h"

#if defined(FA_CUDA_SIM)
#include "cuda_sim.h"
#define FA_DYNAMIC_SHARED(type, name) type* name = ::fa_sim::dynamic_shared<type>()
#define FA_UNROLL
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define FA_DYNAMIC_SHARED(type, name)                            \
  extern __shared__ __align__(128) unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
// Loops over a thread's register arrays: unrolled, so that the arrays stay in registers.
#define FA_UNROLL _Pragma("unroll")
#endif

namespace fa {

template <typename T>
struct NoDeduce {
  using type = T;
};

// Above 48 KB of dynamic shared memory a kernel must opt in; returns a cudaError_t.
template <typename Kernel>
int allow_shared_memory(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes <= 48 * 1024) return 0;
  return static_cast<int>(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shared_bytes)));
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...); returns a cudaError_t.
template <typename... Params>
int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, void* stream,
           typename NoDeduce<Params>::type... args) {
  const int err = allow_shared_memory(kernel, shared_bytes);
  if (err != 0) return err;
#if defined(FA_CUDA_SIM)
  (void)stream;
  return static_cast<int>(fa_sim::launch(false, grid, block, shared_bytes, [=] { kernel(args...); }));
#else
  kernel<<<grid, block, shared_bytes, static_cast<cudaStream_t>(stream)>>>(args...);
  return static_cast<int>(cudaGetLastError());
#endif
}

// A cooperative launch (every CTA resident at once, grid-wide barriers allowed).
template <typename... Params>
int launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, void* stream,
                       typename NoDeduce<Params>::type... args) {
#if defined(FA_CUDA_SIM)
  (void)stream;
  return static_cast<int>(fa_sim::launch(true, grid, block, shared_bytes, [=] { kernel(args...); }));
#else
  void* params[] = {static_cast<void*>(&args)...};
  return static_cast<int>(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, params,
                                                      shared_bytes, static_cast<cudaStream_t>(stream)));
#endif
}

// A launch in thread-block clusters of `cluster` CTAs along x (sm_90; above 8 non-portable sizes are
// allowed first).
template <typename... Params>
int launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, void* stream, int cluster,
                   typename NoDeduce<Params>::type... args) {
  const int err = allow_shared_memory(kernel, shared_bytes);
  if (err != 0) return err;
#if defined(FA_CUDA_SIM)
  (void)stream;
  return static_cast<int>(fa_sim::launch(false, grid, block, shared_bytes, [=] { kernel(args...); }, cluster));
#else
  if (cluster > 8) {
    const int allowed = static_cast<int>(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                              cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    if (allowed != 0) return allowed;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, args...));
#endif
}

// Σ over the 32 lanes of a warp, the same bits in every lane (a fixed butterfly).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Σ over the CTA (blockDim.x a multiple of 32, at most 1024), the same bits in every thread and for
// every run: warp sums, then the warps' sums added in warp order. `scratch` holds 33 floats of shared
// memory; every thread of the CTA must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    scratch[32] = total;
  }
  __syncthreads();
  const float total = scratch[32];
  __syncthreads();  // scratch is free again when this returns
  return total;
}

// 16 bytes moved in one access (128-bit loads and stores); the address must be 16-byte aligned.
struct alignas(16) Vec16 {
  uint32_t word[4];
};
#if defined(FA_CUDA_SIM)
inline Vec16 load16(const void* address) {  // a misaligned access fails the launch, and goes on here
  fa_sim::check_vector_access(address);
  Vec16 value;
  std::memcpy(&value, address, sizeof(value));
  return value;
}
inline void store16(void* address, Vec16 value) {
  fa_sim::check_vector_access(address);
  std::memcpy(address, &value, sizeof(value));
}
#else
__device__ __forceinline__ Vec16 load16(const void* address) { return *reinterpret_cast<const Vec16*>(address); }
__device__ __forceinline__ void store16(void* address, Vec16 value) { *reinterpret_cast<Vec16*>(address) = value; }
#endif

// One warp's 16×16 float tile on the tensor cores: C += A B for a 16×16 A (row-major) and a 16×16 B
// (column-major), both of a 16-bit type (Half or BFloat16) in shared memory, products exact and sums
// in float. Every lane of the warp calls each member together (wmma's rules): operands 32-byte
// aligned, leading dimensions a multiple of 8 elements (of 4 for the float store).
#if defined(FA_CUDA_SIM)
template <typename T>
class WarpTile {  // the simulator: lane 0 holds the tile and does the work; the warp meets around it
 public:
  void zero() {
    for (float& v : acc_) v = 0.0f;
  }
  void multiply_add(const T* a, int64_t lda, const T* b, int64_t ldb) {
    fa_sim::check_tile_operand(a, lda, 8);
    fa_sim::check_tile_operand(b, ldb, 8);
    fa_sim::sync_warp();
    if (fa_sim::current().lane == 0) {
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
          float sum = acc_[i * 16 + j];
          for (int k = 0; k < 16; ++k) sum += to_float(a[i * lda + k]) * to_float(b[j * ldb + k]);
          acc_[i * 16 + j] = sum;
        }
    }
    fa_sim::sync_warp();
  }
  void store(float* c, int64_t ldc) const {
    fa_sim::check_tile_operand(c, ldc, 4);
    fa_sim::sync_warp();
    if (fa_sim::current().lane == 0)
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) c[i * ldc + j] = acc_[i * 16 + j];
    fa_sim::sync_warp();
  }

 private:
  float acc_[256];
};
#else
template <typename T>
struct WmmaElement;
template <>
struct WmmaElement<Half> {
  using type = __half;
};
template <>
struct WmmaElement<BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
class WarpTile {
  using E = typename WmmaElement<T>::type;

 public:
  __device__ void zero() { nvcuda::wmma::fill_fragment(acc_, 0.0f); }
  __device__ void multiply_add(const T* a, int64_t lda, const T* b, int64_t ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, E, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, E, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::load_matrix_sync(fa, reinterpret_cast<const E*>(a), static_cast<unsigned>(lda));
    nvcuda::wmma::load_matrix_sync(fb, reinterpret_cast<const E*>(b), static_cast<unsigned>(ldb));
    nvcuda::wmma::mma_sync(acc_, fa, fb, acc_);
  }
  __device__ void store(float* c, int64_t ldc) const {
    nvcuda::wmma::store_matrix_sync(c, acc_, static_cast<unsigned>(ldc), nvcuda::wmma::mem_row_major);
  }

 private:
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc_;
};
#endif

}  // namespace fa

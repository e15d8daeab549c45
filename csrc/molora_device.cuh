// Device helpers shared by the kernels: element conversion, 16-byte vector loads with a scalar fallback,
// routing reads that never trust an id, and deterministic reductions. Plain CUDA C++, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "molora_launch.h"

namespace molora {
namespace dev {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T starting at p, as floats. VEC * sizeof(T) is 16 (one 128-bit load; p must be 16-byte
// aligned, which the launchers check) or VEC == 1 (scalar fallback, any alignment).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(__ldg(p));
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  }
}

// The adapter of pair p, or -1 when the slot is empty or the id is outside [0, N).
__device__ __forceinline__ int32_t adapter_of(const Routing& r, int64_t p) {
  const int64_t e = r.ids_int64 ? __ldg(static_cast<const int64_t*>(r.ids) + p)
                                : static_cast<int64_t>(__ldg(static_cast<const int32_t*>(r.ids) + p));
  return (e >= 0 && e < r.num_adapters) ? static_cast<int32_t>(e) : -1;
}

__device__ __forceinline__ float weight_of(const Routing& r, int64_t p) {
  switch (r.weights_dtype) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(r.weights)[p]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(r.weights)[p]);
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(r.weights)[p]);
    default:
      return static_cast<const float*>(r.weights)[p];
  }
}

// Adapter e's real rank (e valid), clamped into [0, R]; R when the routing carries no ranks.
__device__ __forceinline__ int32_t rank_of(const Routing& r, int32_t e, int32_t R) {
  if (r.ranks == nullptr) return R;
  const int32_t v = __ldg(r.ranks + e);
  return v < 0 ? 0 : (v > R ? R : v);
}

// Probability x scaling of pair p routed to adapter e (e valid).
__device__ __forceinline__ float coef_of(const Routing& r, int64_t p, int32_t e) {
  return weight_of(r, p) * __ldg(r.scale + e);
}

// Butterfly sum over the `width` lanes of an aligned lane group (width a power of two <= 32). Every lane of the
// warp must call it. The order of additions is fixed, so the result is deterministic.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum each of N per-thread values over the block; afterwards red[j] holds the total of value j. `red` needs
// (THREADS / 32) * N floats. All threads must call it. Deterministic (fixed order).
template <int N, int THREADS>
__device__ __forceinline__ void block_sum(float (&acc)[N], float* red) {
  constexpr int kWarps = THREADS / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float s = warp_sum(acc[j]);
    if (lane == 0) red[warp * N + j] = s;
  }
  __syncthreads();
  if (threadIdx.x < N) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * N + threadIdx.x];
    red[kWarps * N + threadIdx.x] = s;
  }
  __syncthreads();
}

// Write one output element: overwrite, or add in float32 and round once.
template <typename T>
__device__ __forceinline__ void store_out(T* __restrict__ p, float v, bool accumulate) {
  *p = from_float<T>(accumulate ? to_float(*p) + v : v);
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dev

// Host helpers shared by the launchers.
namespace host {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether 16-byte vector loads of T are legal for rows starting at `base` + i * stride_j (all strides in
// elements) over `len` contiguous elements.
template <typename T>
inline bool can_vectorize(const void* base, int64_t len, int64_t s0, int64_t s1 = 0) {
  constexpr int64_t vec = 16 / sizeof(T);
  return aligned16(base) && len % vec == 0 && s0 % vec == 0 && s1 % vec == 0;
}

inline unsigned grid_dim_yz(int64_t n) { return static_cast<unsigned>(n < 65535 ? (n < 1 ? 1 : n) : 65535); }
inline unsigned grid_dim_x(int64_t n) {
  return static_cast<unsigned>(n < 2147483647 ? (n < 1 ? 1 : n) : 2147483647);
}

// Launch a kernel (dynamic shared memory is never used). One place for every launch, so a host-side
// harness that defines MOLORA_HOST_LAUNCH can run the same kernels without the <<<>>> syntax.
#ifndef MOLORA_HOST_LAUNCH
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
}
#else
using ::molora_host_launch::launch;
#endif

// Dispatch on the element type: calls f(T{}) with T one of float, __half, __nv_bfloat16.
template <typename F>
inline int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace host
}  // namespace molora

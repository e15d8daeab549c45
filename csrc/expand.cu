// Expand: out[t, j] (+)= sum_k sum_r lora_b[e_k, j, r] * h[t * K + k, r]   (non-empty slots only),
// and the fused decode kernel that computes h in shared memory first.
//
// Both reduce over the K slots inside one thread, then over the rank across an aligned group of G lanes
// (G a power of two, G * VEC >= R where possible) with a butterfly shuffle, so each output element is the
// fixed-order sum of its K slots: deterministic, no atomics. A block covers a tile of output rows for a few
// consecutive tokens; rows of B[e] for consecutive j are contiguous, so a group reads one 16-byte vector per
// lane and the block streams a contiguous slab of B[e]. Consecutive tokens routed to the same adapter hit L1.
// Every output element of the tile is written, including tokens whose slots are all empty (overwrite mode).
// Ranks: each slot's rank loop stops at its adapter's real rank r_e (dev::rank_of); the last, partial vector
// before r_e is read element by element, so no lora_b column or h entry at or beyond r_e is read.
#include "molora_device.cuh"

namespace molora {
namespace {

using dev::ceil_div;

constexpr int kThreads = 256;

// Smallest power of two >= ceil(R / vec), at most 32.
inline int group_width(int64_t rank, int vec) {
  const int64_t need = ceil_div(rank, vec);
  int g = 1;
  while (g < dev::kWarp && g < need) g <<= 1;
  return g;
}

// out[t, rows of this block] for a token whose per-slot adapters are `e` and whose h rows are `hrow(k)`.
template <typename T, int VEC, typename Slot, typename HRow>
__device__ __forceinline__ void expand_rows(const ExpandProblem& prob, int64_t t, Slot slot, HRow hrow,
                                            int64_t j, int group, int lane) {
  const int32_t R = prob.rank;
  const T* __restrict__ bs = static_cast<const T*>(prob.b);
  const bool row_ok = j < prob.hidden_out;
  float acc = 0.f;
  if (row_ok) {
    for (int k = 0; k < prob.route.top_k; ++k) {
      const int32_t e = slot(k);
      if (e < 0) continue;
      const T* br = bs + e * prob.b_stride_n + j * prob.b_stride_o;
      const float* hr = hrow(k);
      const int32_t re = dev::rank_of(prob.route, e, R);
      for (int64_t r = static_cast<int64_t>(lane) * VEC; r < re; r += static_cast<int64_t>(group) * VEC) {
        if (r + VEC <= re) {
          float bv[VEC];
          dev::load_vec<T, VEC>(br + r, bv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc = fmaf(bv[v], hr[r + v], acc);
        } else {  // the partial vector that ends at r_e (only with ranks: R itself is a multiple of VEC here)
          for (int64_t v = r; v < re; ++v) acc = fmaf(dev::to_float(br[v]), hr[v], acc);
        }
      }
    }
  }
  acc = dev::group_sum(acc, group);  // every lane of the warp takes part
  if (row_ok && lane == 0) {
    T* o = static_cast<T*>(prob.out) + t * prob.out_row_stride + j;
    dev::store_out<T>(o, acc, prob.accumulate);
  }
}

constexpr int kMaxSlotsSmem = 64;  // slot ids cached in shared memory; larger K reads them from global

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(ExpandProblem prob, const float* __restrict__ h, int group, int tokens_per_block) {
  __shared__ int32_t ids_smem[kMaxSlotsSmem];
  const int K = prob.route.top_k;
  const int32_t R = prob.rank;
  const int groups = kThreads / group;
  const int g = threadIdx.x / group, lane = threadIdx.x % group;
  const int64_t row_tiles = ceil_div(prob.hidden_out, groups);
  const int64_t token_tiles = ceil_div(prob.route.num_tokens, tokens_per_block);
  for (int64_t tt = blockIdx.y; tt < token_tiles; tt += gridDim.y) {
    for (int64_t rt = blockIdx.x; rt < row_tiles; rt += gridDim.x) {
      const int64_t j = rt * groups + g;
      for (int i = 0; i < tokens_per_block; ++i) {
        const int64_t t = tt * tokens_per_block + i;
        if (t >= prob.route.num_tokens) break;  // block-uniform
        __syncthreads();
        if (K <= kMaxSlotsSmem && threadIdx.x < K) ids_smem[threadIdx.x] = dev::adapter_of(prob.route, t * K + threadIdx.x);
        __syncthreads();
        auto hrow = [&](int k) { return h + (t * K + k) * R; };
        // Very large K (rare) resolves ids from global memory instead of the shared cache.
        auto slot = [&](int k) { return K <= kMaxSlotsSmem ? ids_smem[k] : dev::adapter_of(prob.route, t * K + k); };
        expand_rows<T, VEC>(prob, t, slot, hrow, j, group, lane);
      }
    }
  }
}

constexpr int kFusedMaxRankSlots = 2048;  // K * R floats of h in shared memory (8 KiB)
constexpr int kFusedMaxTiles = 16;        // output tiles per token: bounds the redundant shrink work

// One block per (token, output tile). Phase 1: each warp takes (slot, rank row) pairs round-robin and forms
// the dot product over H_in with 16-byte loads and a warp reduction, writing coef * dot into shared memory
// (zeros for empty slots). Phase 2: expand this block's output rows from shared memory.
template <typename T, int VEC_IN, int VEC_OUT>
__global__ void __launch_bounds__(kThreads) fused_kernel(ShrinkProblem sp, ExpandProblem ep, int group) {
  __shared__ float h_smem[kFusedMaxRankSlots];
  __shared__ int32_t ids_smem[kMaxSlotsSmem];
  __shared__ float coef_smem[kMaxSlotsSmem];
  __shared__ int32_t rank_smem[kMaxSlotsSmem];
  const int K = sp.route.top_k;
  const int32_t R = sp.rank;
  const int64_t H = sp.hidden_in;
  const int warp = threadIdx.x / dev::kWarp, lane32 = threadIdx.x % dev::kWarp;
  constexpr int kWarps = kThreads / dev::kWarp;
  const T* __restrict__ xs = static_cast<const T*>(sp.x);
  const T* __restrict__ as = static_cast<const T*>(sp.a);
  const int groups = kThreads / group;
  const int g = threadIdx.x / group, lane = threadIdx.x % group;
  const int64_t row_tiles = ceil_div(ep.hidden_out, groups);

  for (int64_t t = blockIdx.y; t < sp.route.num_tokens; t += gridDim.y) {
    __syncthreads();
    if (threadIdx.x < K) {
      const int64_t p = t * K + threadIdx.x;
      const int32_t e = dev::adapter_of(sp.route, p);
      ids_smem[threadIdx.x] = e;
      coef_smem[threadIdx.x] = e >= 0 ? dev::coef_of(sp.route, p, e) : 0.f;
      rank_smem[threadIdx.x] = e >= 0 ? dev::rank_of(sp.route, e, R) : 0;
    }
    __syncthreads();
    const T* xr = xs + t * sp.x_row_stride;
    for (int q = warp; q < K * R; q += kWarps) {
      const int k = q / R, r = q % R;
      const int32_t e = ids_smem[k];  // warp-uniform
      float acc = 0.f;
      if (e >= 0 && r < rank_smem[k]) {  // rows beyond the adapter's rank are zeros, never computed
        const T* ar = as + e * sp.a_stride_n + r * sp.a_stride_r;
        for (int64_t i = static_cast<int64_t>(lane32) * VEC_IN; i < H; i += int64_t{dev::kWarp} * VEC_IN) {
          float xv[VEC_IN], av[VEC_IN];
          dev::load_vec<T, VEC_IN>(xr + i, xv);
          dev::load_vec<T, VEC_IN>(ar + i, av);
#pragma unroll
          for (int v = 0; v < VEC_IN; ++v) acc = fmaf(av[v], xv[v], acc);
        }
        acc = dev::warp_sum(acc);
      }
      if (lane32 == 0) h_smem[q] = r < rank_smem[k] ? coef_smem[k] * acc : 0.f;
    }
    __syncthreads();
    auto hrow = [&](int k) { return static_cast<const float*>(h_smem) + k * R; };
    auto slot = [&](int k) { return ids_smem[k]; };
    for (int64_t rt = blockIdx.x; rt < row_tiles; rt += gridDim.x) {
      expand_rows<T, VEC_OUT>(ep, t, slot, hrow, rt * groups + g, group, lane);
    }
  }
}

template <typename T>
int launch_expand_typed(const ExpandProblem& prob, const float* h, cudaStream_t stream) {
  const int64_t T_ = prob.route.num_tokens;
  if (T_ == 0 || prob.hidden_out == 0) return 0;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = host::can_vectorize<T>(prob.b, prob.rank, prob.b_stride_n, prob.b_stride_o);
  const int group = group_width(prob.rank, vec ? kVec : 1);
  const int groups = kThreads / group;
  // Decode: one token per block, many blocks across H_out. Prefill: a few tokens per block, so consecutive
  // tokens that share an adapter reuse its B rows from L1.
  const int tokens_per_block = T_ <= 64 ? 1 : 4;
  const dim3 grid(host::grid_dim_x(ceil_div(prob.hidden_out, groups)),
                  host::grid_dim_yz(ceil_div(T_, tokens_per_block)));
  if (vec) {
    host::launch(expand_kernel<T, kVec>, grid, kThreads, stream, prob, h, group, tokens_per_block);
  } else {
    host::launch(expand_kernel<T, 1>, grid, kThreads, stream, prob, h, group, tokens_per_block);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_fused_typed(const ShrinkProblem& sp, const ExpandProblem& ep, cudaStream_t stream) {
  const int64_t T_ = sp.route.num_tokens;
  if (T_ == 0 || ep.hidden_out == 0) return 0;
  if (int64_t{sp.route.top_k} * sp.rank > kFusedMaxRankSlots || sp.route.top_k > kMaxSlotsSmem) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_in = host::can_vectorize<T>(sp.x, sp.hidden_in, sp.x_row_stride) &&
                      host::can_vectorize<T>(sp.a, sp.hidden_in, sp.a_stride_n, sp.a_stride_r);
  const bool vec_out = host::can_vectorize<T>(ep.b, ep.rank, ep.b_stride_n, ep.b_stride_o);
  const int group = group_width(ep.rank, vec_out ? kVec : 1);
  const int64_t tiles = ceil_div(ep.hidden_out, kThreads / group);
  const dim3 grid(static_cast<unsigned>(tiles < kFusedMaxTiles ? tiles : kFusedMaxTiles), host::grid_dim_yz(T_));
  if (vec_in && vec_out) {
    host::launch(fused_kernel<T, kVec, kVec>, grid, kThreads, stream, sp, ep, group);
  } else if (vec_in) {
    host::launch(fused_kernel<T, kVec, 1>, grid, kThreads, stream, sp, ep, group);
  } else if (vec_out) {
    host::launch(fused_kernel<T, 1, kVec>, grid, kThreads, stream, sp, ep, group);
  } else {
    host::launch(fused_kernel<T, 1, 1>, grid, kThreads, stream, sp, ep, group);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_expand(const ExpandProblem& prob, const float* h, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return host::dispatch_dtype(prob.dtype, [&](auto tag) { return launch_expand_typed<decltype(tag)>(prob, h, s); });
}

int launch_fused(const ShrinkProblem& sp, const ExpandProblem& ep, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return host::dispatch_dtype(sp.dtype, [&](auto tag) { return launch_fused_typed<decltype(tag)>(sp, ep, s); });
}

int64_t fused_max_rank_slots() { return kFusedMaxRankSlots; }

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

#ifndef MOLORA_CUDA_ARCHS_STR
#define MOLORA_CUDA_ARCHS_STR "unknown"
#endif
const char* compiled_archs() { return MOLORA_CUDA_ARCHS_STR; }

}  // namespace molora

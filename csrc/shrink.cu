// Shrink: h[p, r] = w[p] * scale[e] * dot(lora_a[e, r, :], x[t, :]),  p = t * K + k,  e = topk_ids[t, k];
// h[p, :] = 0 for empty slots. Two paths, chosen by the caller from shapes:
//
//  * per pair (BGMV-style, decode sizes): one block per (pair, tile of kRowsPP rank rows). Every thread walks
//    H_in with 16-byte loads, keeps kRowsPP partial dot products, and the block reduces them with warp
//    shuffles and a fixed-order pass over the warps. Reads A[e] straight from global memory (L2-resident
//    when tokens share adapters).
//  * segmented (SGMV-style, prefill sizes): the routing plan groups pairs by adapter, so a block takes kTileM
//    consecutive pairs of one adapter's segment and kTileR rank rows, stages x rows and A[e] rows through
//    shared memory in kChunk-wide slices of H_in, and reuses each A element for kTileM pairs. The extra
//    segment N holds the empty pairs and writes their zeros. Blocks walk one flat tile axis (see
//    segment_tile_base): its length, P / kTileM + N + 1, depends on shapes only (CUDA-graph safe), and at
//    most about N + 1 of its tiles are idle, whatever the routing.
//
// Ranks: both paths stop at the adapter's real rank r_e (dev::rank_of): a rank tile at or beyond r_e writes its
// zeros without reading A or x, and rows r >= r_e inside a tile are never loaded.
//
// No atomics: every h element is written by exactly one thread, after a fixed-order reduction.
#include "molora_device.cuh"

namespace molora {
namespace {

using dev::ceil_div;

constexpr int kThreadsPP = 256;
constexpr int kRowsPP = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPP) shrink_per_pair_kernel(ShrinkProblem prob, float* __restrict__ h) {
  __shared__ float red[(kThreadsPP / dev::kWarp + 1) * kRowsPP];
  const Routing& route = prob.route;
  const int64_t num_pairs = route.num_tokens * route.top_k;
  const int32_t R = prob.rank;
  const int64_t H = prob.hidden_in;
  const int64_t row_tiles = ceil_div(R, kRowsPP);
  const T* __restrict__ xs = static_cast<const T*>(prob.x);
  const T* __restrict__ as = static_cast<const T*>(prob.a);

  for (int64_t p = blockIdx.x; p < num_pairs; p += gridDim.x) {
    const int32_t e = dev::adapter_of(route, p);  // block-uniform
    const int64_t t = p / route.top_k;
    const float coef = e >= 0 ? dev::coef_of(route, p, e) : 0.f;
    const int32_t re = e >= 0 ? dev::rank_of(route, e, R) : 0;  // block-uniform
    for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      const int64_t r0 = rt * kRowsPP;
      if (r0 >= re) {  // empty slot, or the whole tile is padding
        if (threadIdx.x < kRowsPP && r0 + threadIdx.x < R) h[p * R + r0 + threadIdx.x] = 0.f;
        continue;
      }
      float acc[kRowsPP];
#pragma unroll
      for (int j = 0; j < kRowsPP; ++j) acc[j] = 0.f;
      const T* xr = xs + t * prob.x_row_stride;
      const T* ar = as + e * prob.a_stride_n + r0 * prob.a_stride_r;
      for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < H; i += int64_t{kThreadsPP} * VEC) {
        float xv[VEC];
        dev::load_vec<T, VEC>(xr + i, xv);
#pragma unroll
        for (int j = 0; j < kRowsPP; ++j) {
          if (r0 + j < re) {
            float av[VEC];
            dev::load_vec<T, VEC>(ar + j * prob.a_stride_r + i, av);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[j] = fmaf(av[v], xv[v], acc[j]);
          }
        }
      }
      dev::block_sum<kRowsPP, kThreadsPP>(acc, red);
      constexpr int kTotal = (kThreadsPP / dev::kWarp) * kRowsPP;
      if (threadIdx.x < kRowsPP && r0 + threadIdx.x < R) {
        h[p * R + r0 + threadIdx.x] = r0 + threadIdx.x < re ? coef * red[kTotal + threadIdx.x] : 0.f;
      }
      __syncthreads();  // `red` is reused by the next tile
    }
  }
}

constexpr int kThreadsSeg = 256;
constexpr int kTileM = 32;   // pairs per block
constexpr int kTileR = 16;   // rank rows per block
constexpr int kChunk = 64;   // H_in slice staged in shared memory
constexpr int kPerThread = kTileM * kTileR / kThreadsSeg;
static_assert(kThreadsSeg % kTileR == 0 && kPerThread * kThreadsSeg == kTileM * kTileR, "tile shape");

// The flat tile axis of the segmented shrink. Segment s (s < N: adapter s; s == N: the unrouted pairs) owns the
// pairs [lo_s, hi_s) of the plan, with lo_s = seg_offsets[s], hi_s = seg_offsets[s + 1] (hi_N = P), and takes
// the cdiv(hi_s - lo_s, kTileM) tiles starting at
//
//     base(s) = floor(lo_s / kTileM) + s.
//
// For a well-formed plan (lo nondecreasing, lo_0 = 0, lo_N <= P) these ranges are disjoint and ordered:
// floor(lo / M) + cdiv(hi - lo, M) <= floor(hi / M) + 1, so the last tile of segment s ends at or before
// base(s + 1); and the last segment ends by floor(P / M) + N + 1, the axis length. So a tile index b belongs
// to the largest s with base(s) <= b (base is strictly increasing in s), or to no one when b falls in the gap
// of at most one tile that each segment may leave. Why this and not an exact prefix of tile counts: base(s)
// is closed-form from one offset, so a block finds its segment with a binary search over seg_offsets --
// ceil(log2(N + 2)) block-uniform loads, no shared-memory scan, no barrier, any N -- at the price of at most
// N + 1 idle blocks per rank tile, which exit after the search. (A linear scan costs O(N) per block and an
// exact prefix needs a block-wide scan of N + 1 counts in every block.)
//
// Offsets are clamped into [0, P], so a malformed plan can only leave pairs unwritten or write zeros, never
// form an address outside [0, P).

// seg_offsets[s] (s in [0, N]; index N is the start of the unrouted segment), clamped into [0, P].
__device__ __forceinline__ int64_t clamped_offset(const Routing& route, int32_t s, int64_t num_pairs) {
  const int64_t v = __ldg(route.seg_offsets + s);
  return v < 0 ? 0 : (v > num_pairs ? num_pairs : v);
}

__device__ __forceinline__ int64_t segment_tile_base(const Routing& route, int32_t s, int64_t num_pairs) {
  return clamped_offset(route, s, num_pairs) / kTileM + s;
}

// Number of tiles on the flat axis: an upper bound on sum_s cdiv(len_s, kTileM) for any well-formed plan.
__host__ __device__ constexpr int64_t segmented_tiles(int64_t num_pairs, int32_t num_adapters) {
  return num_pairs / kTileM + num_adapters + 1;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsSeg) shrink_segmented_kernel(ShrinkProblem prob, float* __restrict__ h) {
  __shared__ float xs_tile[kTileM][kChunk + 1];
  __shared__ float as_tile[kTileR][kChunk + 1];
  __shared__ int64_t pair_of[kTileM];
  __shared__ float coef_of[kTileM];
  __shared__ bool owned[kTileM];  // the pair's adapter is this segment's: write coef * acc, else 0

  const Routing& route = prob.route;
  const int64_t num_pairs = route.num_tokens * route.top_k;
  const int32_t N = route.num_adapters;
  const int32_t R = prob.rank;
  const int64_t H = prob.hidden_in;
  const int64_t row_tiles = ceil_div(R, kTileR);
  const int64_t tiles = segmented_tiles(num_pairs, N);
  const T* __restrict__ xs = static_cast<const T*>(prob.x);
  const T* __restrict__ as = static_cast<const T*>(prob.a);
  const int tid = threadIdx.x;
  const int my_r = tid % kTileR;
  const int my_m0 = tid / kTileR;
  constexpr int kMStep = kThreadsSeg / kTileR;

  // One block per tile of the flat axis (the launcher makes gridDim.x == tiles). Every thread runs the same
  // search on the same addresses, so seg, lo, hi and mt are block-uniform: the whole block returns early, or
  // none of it does and every barrier below is reached by all threads.
  const int64_t b = blockIdx.x;
  if (b >= tiles || segment_tile_base(route, 0, num_pairs) > b) return;  // the latter: a malformed plan only
  // The largest seg in [0, N] with base(seg) <= b.
  int32_t seg = 0, top = N;
  while (seg < top) {
    const int32_t mid = seg + (top - seg + 1) / 2;
    if (segment_tile_base(route, mid, num_pairs) <= b) {
      seg = mid;
    } else {
      top = mid - 1;
    }
  }
  const int64_t lo = clamped_offset(route, seg, num_pairs);
  int64_t hi = seg < N ? clamped_offset(route, seg + 1, num_pairs) : num_pairs;
  hi = hi < lo ? lo : hi;
  const int64_t mt = b - (lo / kTileM + seg);  // >= 0: base(seg) <= b
  if (mt * kTileM >= hi - lo) return;          // the gap tile after segment seg: nothing to do
  const int64_t m0 = lo + mt * kTileM;
  const int32_t re = seg < N ? dev::rank_of(route, seg, R) : 0;  // block-uniform
  const int count = static_cast<int>(hi - m0 < kTileM ? hi - m0 : kTileM);
  // The per-pair adapter comes from topk_ids, not from the plan: ids the plan did not route (or a stale
  // plan) can only ever produce zeros (selected, not multiplied by 0, so a non-finite A[seg] or x stays
  // out), never an out-of-range address.
  if (tid < kTileM) {
    int64_t p = -1;
    float c = 0.f;
    bool own = false;
    if (tid < count) {
      p = __ldg(route.sorted_pairs + m0 + tid);
      if (p < 0 || p >= num_pairs) p = -1;
      const int32_t e = p >= 0 ? dev::adapter_of(route, p) : -1;
      own = e >= 0 && e == seg;
      if (own) c = dev::coef_of(route, p, e);
    }
    pair_of[tid] = p;
    coef_of[tid] = c;
    owned[tid] = own;
  }
  __syncthreads();
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kTileR;
    float acc[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;
    if (r0 < re) {  // block-uniform: every barrier inside is reached by all threads or by none
      const T* a_base = as + static_cast<int64_t>(seg) * prob.a_stride_n;
      for (int64_t c0 = 0; c0 < H; c0 += kChunk) {
        constexpr int kVecs = kChunk / VEC;
        for (int idx = tid; idx < kTileM * kVecs; idx += kThreadsSeg) {
          const int m = idx / kVecs, c = (idx % kVecs) * VEC;
          float v[VEC];
          const int64_t p = pair_of[m];
          if (p >= 0 && c0 + c < H) {
            dev::load_vec<T, VEC>(xs + (p / route.top_k) * prob.x_row_stride + c0 + c, v);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) xs_tile[m][c + i] = v[i];
        }
        for (int idx = tid; idx < kTileR * kVecs; idx += kThreadsSeg) {
          const int r = idx / kVecs, c = (idx % kVecs) * VEC;
          float v[VEC];
          if (r0 + r < re && c0 + c < H) {
            dev::load_vec<T, VEC>(a_base + (r0 + r) * prob.a_stride_r + c0 + c, v);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) as_tile[r][c + i] = v[i];
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < kChunk; ++c) {
          const float av = as_tile[my_r][c];
#pragma unroll
          for (int i = 0; i < kPerThread; ++i) acc[i] = fmaf(xs_tile[my_m0 + i * kMStep][c], av, acc[i]);
        }
        __syncthreads();
      }
    }
    if (r0 + my_r < R) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int m = my_m0 + i * kMStep;
        const int64_t p = m < count ? pair_of[m] : -1;
        if (p >= 0) h[p * R + r0 + my_r] = owned[m] && r0 + my_r < re ? coef_of[m] * acc[i] : 0.f;
      }
    }
  }
}

template <typename T>
int launch_shrink_typed(const ShrinkProblem& prob, float* h, int32_t path, cudaStream_t stream) {
  const int64_t num_pairs = prob.route.num_tokens * prob.route.top_k;
  if (num_pairs == 0 || prob.rank == 0) return 0;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = host::can_vectorize<T>(prob.x, prob.hidden_in, prob.x_row_stride) &&
                   host::can_vectorize<T>(prob.a, prob.hidden_in, prob.a_stride_n, prob.a_stride_r);
  if (path == kShrinkSegmented) {
    // One block per tile of the flat axis (and rank tile): from shapes only, never from the plan's contents.
    // The axis fits in gridDim.x for any real problem (P < 2^31 with an int32 plan, so it exceeds 2^31 - 1
    // only for N > 2^31 - 2^26 - 2 adapters); refuse rather than skip tiles.
    const int64_t tiles = segmented_tiles(num_pairs, prob.route.num_adapters);
    if (tiles > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(tiles), host::grid_dim_yz(ceil_div(prob.rank, kTileR)));
    if (vec) {
      host::launch(shrink_segmented_kernel<T, kVec>, grid, kThreadsSeg, stream, prob, h);
    } else {
      host::launch(shrink_segmented_kernel<T, 1>, grid, kThreadsSeg, stream, prob, h);
    }
  } else {
    const dim3 grid(host::grid_dim_x(num_pairs), host::grid_dim_yz(ceil_div(prob.rank, kRowsPP)));
    if (vec) {
      host::launch(shrink_per_pair_kernel<T, kVec>, grid, kThreadsPP, stream, prob, h);
    } else {
      host::launch(shrink_per_pair_kernel<T, 1>, grid, kThreadsPP, stream, prob, h);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_shrink(const ShrinkProblem& prob, float* h, int32_t path, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return host::dispatch_dtype(prob.dtype, [&](auto tag) { return launch_shrink_typed<decltype(tag)>(prob, h, path, s); });
}

}  // namespace molora

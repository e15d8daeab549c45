// Host-side interface between the torch binding (bindings.cpp) and the CUDA kernels (*.cu).
//
// This header is plain C++: no torch and no CUDA headers. The kernels take raw pointers, sizes in elements,
// strides in elements and an opaque stream handle, so the .cu files compile without any torch header (the
// CPU torch wheel ships incomplete c10/cuda headers) and the binding compiles without any CUDA header.
//
// Shapes (T tokens, K slots, N adapters, R padded rank, P = T * K pairs, pair p = t * K + k):
//   x [T, H_in] (row stride x_row_stride, unit inner stride)     lora_a [N, R, H_in] (unit inner stride)
//   lora_b [N, H_out, R] (unit inner stride)                      h [P, R] float32, contiguous
//   topk_ids [T, K] int32|int64 contiguous                        topk_weights [T, K] contiguous, any float
//   scale [N] float32                                             out [T, H_out] (unit inner stride)
//   sorted_pairs [P] int32, seg_offsets [N + 1] int32 (molora_ops.plan)
//   ranks [N] int32 or null: adapter e's real rank r_e (clamped into [0, R]); null means r_e = R for every e
// Ids outside [0, N) are empty slots: they are never used to form an address. Every kernel bounds its rank loops
// by r_e: lora_a rows and lora_b columns r >= r_e (padding) are never read, h[p, r] is written as 0 there by the
// shrink and never read by the expand.
#pragma once

#include <cstdint>

namespace molora {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Routing {
  const void* ids = nullptr;  // [T, K]
  bool ids_int64 = false;
  const void* weights = nullptr;  // [T, K]; unused by expand
  DType weights_dtype = DType::kFloat32;
  const float* scale = nullptr;  // [N]; unused by expand
  const int32_t* sorted_pairs = nullptr;  // [P]; used by the segmented shrink only
  const int32_t* seg_offsets = nullptr;   // [N + 1]
  const int32_t* ranks = nullptr;         // [N] real ranks, or null (all R)
  int64_t num_tokens = 0;
  int32_t top_k = 1;
  int32_t num_adapters = 1;
};

struct ShrinkProblem {
  Routing route;
  DType dtype = DType::kFloat32;  // of x and lora_a
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* a = nullptr;
  int64_t a_stride_n = 0, a_stride_r = 0;
  int32_t rank = 1;
  int64_t hidden_in = 0;
};

struct ExpandProblem {
  Routing route;
  DType dtype = DType::kFloat32;  // of lora_b and out
  const void* b = nullptr;
  int64_t b_stride_n = 0, b_stride_o = 0;
  void* out = nullptr;
  int64_t out_row_stride = 0;
  int32_t rank = 1;
  int64_t hidden_out = 0;
  bool accumulate = false;
};

// Kernel paths. Chosen by the caller from shapes only (never from routing values), so a CUDA graph captured
// for a shape replays the same kernels whatever the routing.
enum ShrinkPath : int32_t { kShrinkPerPair = 1, kShrinkSegmented = 2 };

// Each launcher returns 0 on success or a cudaError_t value; error_string() turns that into text. The value
// is cudaGetLastError() after the launch, so it can also be an earlier asynchronous error of the device.
// h is [P, R] float32. Every element of h is written (zeros for empty slots).
int launch_shrink(const ShrinkProblem& p, float* h, int32_t path, void* stream);
// out (+)= sum_k lora_b[e] @ h[t, k]. Every element of out is written when accumulate is false.
int launch_expand(const ExpandProblem& p, const float* h, void* stream);
// One launch for decode sizes: each block recomputes the token's h (K * R floats in shared memory) and
// expands one output tile. `s` and `e` describe the same routing.
int launch_fused(const ShrinkProblem& s, const ExpandProblem& e, void* stream);
// Largest K * R the fused kernel accepts (its shared-memory budget).
int64_t fused_max_rank_slots();

const char* error_string(int code);
// "sm_80 sm_86 ..." as compiled into this library (from the build).
const char* compiled_archs();

}  // namespace molora

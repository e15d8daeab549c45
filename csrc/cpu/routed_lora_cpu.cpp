// The CPU kernels of the routing runtime's "fused" strategy (molora_ops/impl/cpu_fused.py): the routed pairs'
// shrink and expand without a [pairs, H] intermediate, in parallel over torch's intra-op threads.
//
// Shapes are static (a function of T, K, N and the block size only), so the ops trace under torch.compile with
// fake implementations and no data-dependent sizes: the pair arrays hold S = T * K entries, of which the first
// P = offsets[N] are the routed pairs (plan order); the rest are padding no kernel reads.
//
// Semantics are routed_lora's (molora_ops/reference.py), on the routed pairs of one forward only (an empty slot has
// no pair, so it reads nothing and adds nothing):
//   shrink:  u[i, c] = coef[i] * A[e(i), c, :] . x[tok[i], :]       for c < bound[e(i)]; 0 for bound[e] <= c < R
//   expand_: out[tok, :] += alpha[e] * B[e, :, :r_e] @ u[row, rank_start : rank_start + r_e]   for each pair
// where e(i) is the adapter whose segment [offsets[e], offsets[e + 1]) holds row i. Compute dtype: float32, or
// float64 for float64 tensors (every tensor of a call has one dtype; the caller casts).
//
// Work and determinism:
//   * shrink: one work item per chunk of at most kShrinkChunk rows of one adapter: the chunk's x rows are gathered
//     into a per-thread buffer (reused from call to call, so no fresh pages) and multiplied by A[e]^T with one GEMM
//     (ATen's, i.e. MKL / the torch CPU BLAS) straight into u's rows.
//   * expand_: one work item per block of tokens. Its pairs are grouped by adapter (expand order: block, adapter,
//     then plan row); for each adapter, the pairs' u rows (times alpha) are gathered, one GEMM forms their
//     [m, H_out] outputs in a per-thread buffer that stays in cache, and those rows are added into out. Every out
//     row is written by one thread, adding its pairs in a fixed order (adapter, then plan row): deterministic.
//   Every index is checked before it is used in an address (a bad one raises, validation on or off).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kShrinkChunk = 128;
constexpr int64_t kOuterCols = 256;

// A per-thread scratch buffer (one per element type and slot), grown as needed and never shrunk: after the first
// forward its pages stay mapped, so a call does not pay page faults for its temporaries.
template <typename scalar_t, int slot>
scalar_t* scratch(int64_t n) {
  thread_local std::vector<scalar_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "molora_cpu: ", name, " must be a CPU tensor, got ", t.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t len) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(), "molora_cpu: ", name,
              " must be a contiguous 1-D int64 tensor, got ", t.scalar_type(), " ", t.sizes());
  if (len >= 0) TORCH_CHECK(t.size(0) == len, "molora_cpu: ", name, " must have ", len, " entries, got ", t.size(0));
}

// Each adapter's rank bound (R when ranks is None), each checked to lie in [0, R].
std::vector<int64_t> bounds_of(const c10::optional<at::Tensor>& ranks, int64_t n, int64_t r) {
  std::vector<int64_t> out(n, r);
  if (!ranks.has_value()) return out;
  const at::Tensor rk = ranks->to(at::kLong).contiguous();
  TORCH_CHECK(rk.dim() == 1 && rk.size(0) == n, "molora_cpu: ranks must be [", n, "], got ", rk.sizes());
  const int64_t* p = rk.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e) {
    TORCH_CHECK(p[e] >= 0 && p[e] <= r, "molora_cpu: ranks[", e, "] = ", p[e], " is outside [0, ", r, "]");
    out[e] = p[e];
  }
  return out;
}

// Segment offsets [n + 1], checked to be non-decreasing from 0 to at most `total`.
std::vector<int64_t> offsets_of(const at::Tensor& offsets, int64_t n, int64_t total, const char* name) {
  check_index(offsets, name, n + 1);
  const int64_t* p = offsets.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[n] <= total, "molora_cpu: ", name, " must run from 0 to at most ", total, ", got ",
              p[0], " .. ", p[n]);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], "molora_cpu: ", name, " must be non-decreasing (entry ", i, ")");
  return std::vector<int64_t>(p, p + n + 1);
}

// Worker threads do not inherit the caller's inference mode, so every operand of a GEMM made there is a plain
// tensor over raw memory (from_blob), never a view of an argument (which may be an inference tensor).
at::TensorOptions plain_options(const at::Tensor& like) {
  return at::TensorOptions().dtype(like.scalar_type()).device(at::kCPU);
}

template <typename scalar_t>
void shrink_impl(const at::Tensor& x, const at::Tensor& a, const at::Tensor& tokens, const std::vector<int64_t>& off,
                 const at::Tensor& coef, const std::vector<int64_t>& bound, at::Tensor& u) {
  const int64_t num_tokens = x.size(0), h_in = x.size(1), rank = a.size(1), n = a.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const scalar_t* cp = coef.data_ptr<scalar_t>();
  scalar_t* up = u.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1);
  const at::TensorOptions opts = plain_options(x);
  struct Item { int64_t e, lo, hi; };
  std::vector<Item> items;
  for (int64_t e = 0; e < n; ++e)
    if (bound[e] > 0)
      for (int64_t lo = off[e]; lo < off[e + 1]; lo += kShrinkChunk)
        items.push_back({e, lo, std::min(lo + kShrinkChunk, off[e + 1])});
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t w = begin; w < end; ++w) {
      const Item it = items[w];
      const int64_t m = it.hi - it.lo, r = bound[it.e];
      scalar_t* g = scratch<scalar_t, 0>(m * h_in);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t t = tok[it.lo + j];
        TORCH_CHECK(t >= 0 && t < num_tokens, "molora_cpu: tokens[", it.lo + j, "] = ", t, " is outside [0, ",
                    num_tokens, ")");
        std::memcpy(g + j * h_in, xp + t * h_in, h_in * sizeof(scalar_t));
      }
      at::Tensor dst = at::from_blob(up + it.lo * rank, {m, r}, {rank, 1}, opts);
      at::Tensor at_e = at::from_blob(const_cast<scalar_t*>(ap) + it.e * sa0, {h_in, r}, {1, sa1}, opts);  // A[e, :r]^T
      at::mm_out(dst, at::from_blob(g, {m, h_in}, opts), at_e);
      for (int64_t j = 0; j < m; ++j) {
        scalar_t* row = up + (it.lo + j) * rank;
        const scalar_t c = cp[it.lo + j];
        for (int64_t k = 0; k < r; ++k) row[k] *= c;
      }
    }
  });
}

template <typename scalar_t>
void expand_impl(at::Tensor& out, const at::Tensor& u, int64_t rank_start, const at::Tensor& b,
                 const at::Tensor& order, const at::Tensor& tokens, const std::vector<int64_t>& boff, int64_t blocks,
                 const scalar_t* alpha, const std::vector<int64_t>& bound) {
  const int64_t num_tokens = out.size(0), h_out = out.size(1), ldo = out.stride(0), n = b.size(0);
  const int64_t num_rows = u.size(0), ldu = u.size(1);
  const scalar_t* up = u.data_ptr<scalar_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const int64_t sb0 = b.stride(0), sb1 = b.stride(1), sb2 = b.stride(2);
  const at::TensorOptions opts = plain_options(out);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t e = 0; e < n; ++e) {
        const int64_t lo = boff[blk * n + e], hi = boff[blk * n + e + 1], m = hi - lo, r = bound[e];
        if (m == 0 || r == 0) continue;
        const scalar_t s = alpha == nullptr ? scalar_t(1) : alpha[e];
        scalar_t* ut = scratch<scalar_t, 1>(m * r);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t row = ord[lo + j];
          TORCH_CHECK(row >= 0 && row < num_rows, "molora_cpu: order[", lo + j, "] = ", row, " is outside [0, ",
                      num_rows, ")");
          const scalar_t* src = up + row * ldu + rank_start;
          for (int64_t k = 0; k < r; ++k) ut[j * r + k] = src[k] * s;
        }
        scalar_t* y = scratch<scalar_t, 2>(m * h_out);
        at::Tensor bt_e = at::from_blob(const_cast<scalar_t*>(bp) + e * sb0, {r, h_out}, {sb2, sb1}, opts);  // B[e, :, :r]^T
        at::Tensor yt = at::from_blob(y, {m, h_out}, opts);
        at::mm_out(yt, at::from_blob(ut, {m, r}, opts), bt_e);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t t = tok[lo + j];
          TORCH_CHECK(t >= 0 && t < num_tokens, "molora_cpu: tokens[", lo + j, "] = ", t, " is outside [0, ",
                      num_tokens, ")");
          scalar_t* dst = op + t * ldo;
          const scalar_t* src = y + j * h_out;
          for (int64_t c = 0; c < h_out; ++c) dst[c] += src[c];
        }
      }
    }
  });
}

void check_float(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, "molora_cpu: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// u [S, R]: see the file comment (rows >= P are 0). x [T, H_in] contiguous float32/float64; lora_a [N, R, H_in] with
// unit stride along H_in; tokens [S] int64 (plan order); offsets [N + 1] int64 (offsets[N] = P <= S); coef [S]
// (x's dtype); ranks None or [N] int (bounds in [0, R]).
at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& tokens, const at::Tensor& offsets,
                  const at::Tensor& coef, const c10::optional<at::Tensor>& ranks) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "molora_cpu: x must be a contiguous [T, H_in] tensor, got ",
              x.sizes());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "molora_cpu: x must be float32 or float64, got ", dt);
  check_float(x, "x", dt);
  check_float(lora_a, "lora_a", dt);
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == x.size(1) && lora_a.stride(2) == 1,
              "molora_cpu: lora_a must be [N, R, ", x.size(1), "] with unit stride along H_in, got ", lora_a.sizes());
  const int64_t n = lora_a.size(0), rank = lora_a.size(1);
  check_index(tokens, "tokens", -1);
  const int64_t pairs = tokens.size(0);
  const std::vector<int64_t> off = offsets_of(offsets, n, pairs, "offsets");
  check_float(coef, "coef", dt);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == pairs && coef.is_contiguous(), "molora_cpu: coef must be [",
              pairs, "] contiguous, got ", coef.sizes());
  const std::vector<int64_t> bound = bounds_of(ranks, n, rank);
  at::Tensor u = ranks.has_value() ? at::zeros({pairs, rank}, x.options()) : at::empty({pairs, rank}, x.options());
  const char* poison = std::getenv("MOLORA_POISON_OUTPUTS");  // tests: every element must be written
  if (!ranks.has_value() && poison != nullptr && std::string(poison) == "1") u.fill_(NAN);
  if (!ranks.has_value() && off[n] < pairs) u.narrow(0, off[n], pairs - off[n]).zero_();  // the padding rows
  if (off[n] == 0 || rank == 0) return u;
  AT_DISPATCH_FLOATING_TYPES(dt, "molora_cpu_shrink", [&] { shrink_impl<scalar_t>(x, lora_a, tokens, off, coef, bound, u); });
  return u;
}

// out [T, H_out] (unit stride along H_out) += the expand of u [S, R_u] columns [rank_start, rank_start + R_i) through
// lora_b [N, H_out, R_i]; order [S] (u's rows in expand order), tokens [S] (their tokens), block_offsets
// [blocks * N + 1] (the expand-order rows of block blk and adapter e are [block_offsets[blk * N + e], ... + 1);
// the last entry is P <= S);
// alpha None or [N] (a per-adapter factor: the scaling); ranks None or [N] int (bounds in [0, R_i]).
void expand_(at::Tensor out, const at::Tensor& u, int64_t rank_start, const at::Tensor& lora_b, const at::Tensor& order,
             const at::Tensor& tokens, const at::Tensor& block_offsets, const c10::optional<at::Tensor>& alpha,
             const c10::optional<at::Tensor>& ranks) {
  const at::ScalarType dt = out.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "molora_cpu: out must be float32 or float64, got ", dt);
  check_float(out, "out", dt);
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "molora_cpu: out must be [T, H_out] with unit stride along "
              "H_out, got sizes ", out.sizes(), " strides ", out.strides());
  check_float(u, "u", dt);
  check_float(lora_b, "lora_b", dt);
  TORCH_CHECK(u.dim() == 2 && u.is_contiguous(), "molora_cpu: u must be a contiguous [P, R] tensor, got ", u.sizes());
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(1) == out.size(1), "molora_cpu: lora_b must be [N, ", out.size(1),
              ", R_i], got ", lora_b.sizes());
  const int64_t n = lora_b.size(0), r_i = lora_b.size(2);
  TORCH_CHECK(rank_start >= 0 && rank_start + r_i <= u.size(1), "molora_cpu: rank_start ", rank_start, " + R_i ",
              r_i, " exceeds u's ", u.size(1), " columns");
  const int64_t pairs = u.size(0);
  check_index(order, "order", pairs);
  check_index(tokens, "tokens", pairs);
  TORCH_CHECK(block_offsets.dim() == 1 && block_offsets.size(0) >= 1 && (block_offsets.size(0) - 1) % n == 0,
              "molora_cpu: block_offsets must be [blocks * ", n, " + 1], got ", block_offsets.sizes());
  const int64_t blocks = (block_offsets.size(0) - 1) / n;
  const std::vector<int64_t> boff = offsets_of(block_offsets, blocks * n, pairs, "block_offsets");
  const std::vector<int64_t> bound = bounds_of(ranks, n, r_i);
  at::Tensor al;
  if (alpha.has_value()) {
    al = alpha->to(dt).contiguous();
    TORCH_CHECK(al.dim() == 1 && al.size(0) == n, "molora_cpu: alpha must be [", n, "], got ", al.sizes());
  }
  if (boff.back() == 0 || out.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(dt, "molora_cpu_expand", [&] {
    expand_impl<scalar_t>(out, u, rank_start, lora_b, order, tokens, boff, blocks,
                          alpha.has_value() ? al.data_ptr<scalar_t>() : nullptr, bound);
  });
}

template <typename scalar_t>
void outer_impl(const at::Tensor& left, const at::Tensor& src, const at::Tensor& tokens, const std::vector<int64_t>& off,
                at::Tensor& out) {
  const int64_t n = out.size(0), f = out.size(1), d = out.size(2), num_tokens = src.size(0);
  const scalar_t* lp = left.data_ptr<scalar_t>();
  const scalar_t* sp = src.data_ptr<scalar_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const at::TensorOptions opts = plain_options(src);
  struct Item { int64_t e, d0, d1; };
  std::vector<Item> items;
  for (int64_t e = 0; e < n; ++e)
    if (off[e + 1] > off[e])
      for (int64_t d0 = 0; d0 < d; d0 += kOuterCols) items.push_back({e, d0, std::min(d0 + kOuterCols, d)});
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t w = begin; w < end; ++w) {
      const Item it = items[w];
      const int64_t dc = it.d1 - it.d0;
      at::Tensor dst = at::from_blob(op + it.e * f * d + it.d0, {f, dc}, {d, 1}, opts);
      for (int64_t lo = off[it.e]; lo < off[it.e + 1]; lo += kShrinkChunk) {
        const int64_t m = std::min(kShrinkChunk, off[it.e + 1] - lo);
        scalar_t* g = scratch<scalar_t, 3>(m * dc);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t t = tok[lo + j];
          TORCH_CHECK(t >= 0 && t < num_tokens, "molora_cpu: tokens[", lo + j, "] = ", t, " is outside [0, ",
                      num_tokens, ")");
          std::memcpy(g + j * dc, sp + t * d + it.d0, dc * sizeof(scalar_t));
        }
        at::Tensor lt = at::from_blob(const_cast<scalar_t*>(lp) + lo * f, {f, m}, {1, f}, opts);  // left rows^T
        at::addmm_out(dst, dst, lt, at::from_blob(g, {m, dc}, opts), lo == off[it.e] ? 0 : 1, 1);
      }
    }
  });
}

// out [N, F, D]: out[e] = sum over adapter e's plan rows i of left[i]^T src[tokens[i]] (left [S, F] contiguous, src
// [T, D] contiguous, tokens [S], offsets [N + 1] with offsets[N] <= S); zeros for an adapter without rows. The
// weight gradients of the backward (dA from du and x, dB from h and dy). Work items: (adapter, chunk of D columns),
// each summing its rows chunk by chunk in plan order: deterministic.
at::Tensor outer(const at::Tensor& left, const at::Tensor& src, const at::Tensor& tokens, const at::Tensor& offsets) {
  const at::ScalarType dt = src.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "molora_cpu: src must be float32 or float64, got ", dt);
  check_float(src, "src", dt);
  check_float(left, "left", dt);
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous(), "molora_cpu: src must be a contiguous [T, D] tensor, got ",
              src.sizes());
  TORCH_CHECK(left.dim() == 2 && left.is_contiguous(), "molora_cpu: left must be a contiguous [S, F] tensor, got ",
              left.sizes());
  check_index(tokens, "tokens", left.size(0));
  const int64_t n = offsets.numel() - 1;
  TORCH_CHECK(n >= 1, "molora_cpu: offsets must have N + 1 >= 2 entries, got ", offsets.numel());
  const std::vector<int64_t> off = offsets_of(offsets, n, left.size(0), "offsets");
  at::Tensor out = at::zeros({n, left.size(1), src.size(1)}, src.options());
  if (off[n] == 0 || out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "molora_cpu_outer", [&] { outer_impl<scalar_t>(left, src, tokens, off, out); });
  return out;
}

// The routed pairs of one forward, sorted on the host in O(T * K + blocks * N) (two counting sorts); static shapes
// (S = T * K): tokens [S], coef [S] (weights' dtype), offsets [N + 1], order [S], etokens [S], block_offsets
// [blocks * N + 1], slots [S] (t * K + k of each plan row), adapters [S] (its adapter); blocks = ceil(T / block),
// at least 1. Plan order is (adapter, slot, token); the expand order is
// (token block, adapter, plan row). Entries >= P are 0. topk_ids [T, K] int32/int64 (ids outside [0, N) are empty
// slots), weights [T, K] float32/float64 (the compute dtype); block >= 1 tokens per expand item.
std::vector<at::Tensor> prepare(const at::Tensor& topk_ids, const at::Tensor& weights, int64_t num_adapters,
                                int64_t block) {
  check_cpu(topk_ids, "topk_ids");
  check_cpu(weights, "topk_weights");
  TORCH_CHECK(topk_ids.dim() == 2 && (topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt),
              "molora_cpu: topk_ids must be a [T, K] int32 or int64 tensor, got ", topk_ids.scalar_type(), " ",
              topk_ids.sizes());
  TORCH_CHECK(weights.sizes() == topk_ids.sizes() &&
              (weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble),
              "molora_cpu: topk_weights must be float32 or float64 of topk_ids' shape ", topk_ids.sizes(), ", got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(num_adapters >= 1 && block >= 1, "molora_cpu: num_adapters and block must be >= 1, got ",
              num_adapters, " and ", block);
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor w = weights.contiguous();
  const int64_t num_tokens = ids.size(0), top_k = ids.size(1), n = num_adapters, slots = num_tokens * top_k;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const auto lng = at::TensorOptions().dtype(at::kLong);
  // plan order: (adapter, slot, token)
  std::vector<int64_t> count(n + 1, 0);
  for (int64_t i = 0; i < slots; ++i)
    if (idp[i] >= 0 && idp[i] < n) ++count[idp[i] + 1];
  for (int64_t e = 0; e < n; ++e) count[e + 1] += count[e];
  at::Tensor offsets = at::empty({n + 1}, lng), tokens = at::zeros({slots}, lng), slot_of = at::zeros({slots}, lng);
  std::copy(count.begin(), count.end(), offsets.data_ptr<int64_t>());
  int64_t* tp = tokens.data_ptr<int64_t>();
  int64_t* sp = slot_of.data_ptr<int64_t>();  // t * K + k of each pair
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t k = 0; k < top_k; ++k)
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t e = idp[t * top_k + k];
      if (e >= 0 && e < n) {
        tp[fill[e]] = t;
        sp[fill[e]++] = t * top_k + k;
      }
    }
  at::Tensor coef = w.view(-1).index_select(0, slot_of);
  if (count[n] < slots) coef.narrow(0, count[n], slots - count[n]).zero_();
  at::Tensor adapter = at::zeros({slots}, lng);
  int64_t* adp = adapter.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = count[e]; i < count[e + 1]; ++i) adp[i] = e;
  // expand order: (token block, adapter, plan row)
  const int64_t blocks = std::max<int64_t>(1, (num_tokens + block - 1) / block);
  std::vector<int64_t> bcount(blocks * n + 1, 0);
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = count[e]; i < count[e + 1]; ++i) ++bcount[(tp[i] / block) * n + e + 1];
  for (int64_t j = 0; j < blocks * n; ++j) bcount[j + 1] += bcount[j];
  at::Tensor block_offsets = at::empty({blocks * n + 1}, lng), order = at::zeros({slots}, lng),
             etokens = at::zeros({slots}, lng);
  std::copy(bcount.begin(), bcount.end(), block_offsets.data_ptr<int64_t>());
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* ep = etokens.data_ptr<int64_t>();
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = count[e]; i < count[e + 1]; ++i) {
      const int64_t key = (tp[i] / block) * n + e;
      op[bcount[key]] = i;
      ep[bcount[key]++] = tp[i];
    }
  return {tokens, coef, offsets, order, etokens, block_offsets, slot_of, adapter};
}

// The maximal runs of plan rows lo..hi-1 inside one adapter's segment whose tokens are t..t+hi-lo-1, as [runs, 4]
// int64 (e, lo, hi, t), or [0, 4] when they average fewer than min_run pairs (or there are no pairs). Its size
// depends on the routing: eager only.
at::Tensor token_runs(const at::Tensor& tokens, const at::Tensor& offsets, int64_t min_run) {
  check_index(tokens, "tokens", -1);
  TORCH_CHECK(min_run >= 1, "molora_cpu: min_run must be >= 1, got ", min_run);
  const int64_t n = offsets.numel() - 1;
  TORCH_CHECK(n >= 1, "molora_cpu: offsets must have N + 1 >= 2 entries, got ", offsets.numel());
  const std::vector<int64_t> off = offsets_of(offsets, n, tokens.size(0), "offsets");
  const int64_t* tp = tokens.data_ptr<int64_t>();
  std::vector<int64_t> runs;  // flattened (e, lo, hi, t)
  for (int64_t e = 0; e < n; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i)
      if (i == off[e] || tp[i] != tp[i - 1] + 1)
        runs.insert(runs.end(), {e, i, i + 1, tp[i]});  // a new run
      else
        runs[runs.size() - 2] = i + 1;  // the current run grows
  const int64_t num_runs = static_cast<int64_t>(runs.size()) / 4, pairs = off[n];
  const auto lng = at::TensorOptions().dtype(at::kLong);
  if (pairs == 0 || num_runs * min_run > pairs) return at::empty({0, 4}, lng);
  return at::from_blob(runs.data(), {num_runs, 4}, lng).clone();
}

}  // namespace

TORCH_LIBRARY(molora_cpu, m) {
  m.def("prepare(Tensor topk_ids, Tensor topk_weights, int num_adapters, int block) -> Tensor[]");
  m.def("token_runs(Tensor tokens, Tensor offsets, int min_run) -> Tensor");
  m.def("outer(Tensor left, Tensor src, Tensor tokens, Tensor offsets) -> Tensor");
  m.def("shrink(Tensor x, Tensor lora_a, Tensor tokens, Tensor offsets, Tensor coef, Tensor? ranks=None) -> Tensor");
  m.def("expand_(Tensor(a!) out, Tensor u, int rank_start, Tensor lora_b, Tensor order, Tensor tokens, "
        "Tensor block_offsets, Tensor? alpha=None, Tensor? ranks=None) -> ()");
}

TORCH_LIBRARY_IMPL(molora_cpu, CPU, m) {
  m.impl("prepare", &prepare);
  m.impl("token_runs", &token_runs);
  m.impl("outer", &outer);
  m.impl("shrink", &shrink);
  m.impl("expand_", &expand_);
}

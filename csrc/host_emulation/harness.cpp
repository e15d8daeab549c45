// Runs the CUDA kernels of csrc/ on the CPU (see cuda_runtime.h here) against a float64 reference.
// Built and run by tests/test_cuda_backend.py::test_kernels_under_host_emulation; by hand:
//
//   D=csrc/host_emulation; I="-I$D -Icsrc -I/usr/local/cuda/include"
//   for f in shrink expand; do g++ -std=c++20 -O1 -DMOLORA_HOST_LAUNCH $I -x c++ -c csrc/$f.cu -o /tmp/$f.o; done
//   g++ -std=c++20 -O1 $I $D/harness.cpp /tmp/shrink.o /tmp/expand.o -o /tmp/emu && /tmp/emu
//
// Every case runs the three kernel paths (per-pair shrink, segmented shrink, fused) in overwrite and
// accumulate mode, with empty slots, ids outside [0, N), duplicate ids, odd sizes, unaligned rows and padded
// strides. Output rows are padded with NaN sentinels that must survive, and outputs start as NaN so an element
// a kernel forgot to write shows up. The segmented shrink's flat tile axis is covered by cases with many
// segments, empty segments (segment 0 included), N much larger than P, all slots empty, and many tiles per
// segment; it also runs with a stale plan (built for other routing), which must give exactly the value for
// pairs whose stale segment is their adapter and zeros for all others, and must not write past h. Poisoned
// cases put a NaN in one adapter's A and an Inf in another's B: exactly the outputs the reference makes
// non-finite may be non-finite (the tokens routed there), every other one must match.
// Mixed-rank cases give each adapter a real rank in [0, R] (0 and R included) and fill its padding (A rows and
// B columns at or beyond it) with NaN, and the h the expand reads with NaN there too: padding that a kernel
// reads shows up as a NaN in its output.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "molora_launch.h"

using namespace molora;

namespace {

std::mt19937 rng(1234);
float randn() {
  static std::normal_distribution<float> d;
  return d(rng);
}
float randu() {
  static std::uniform_real_distribution<float> d(0, 1);
  return d(rng);
}

template <typename T>
T cvt(float v);
template <>
float cvt<float>(float v) { return v; }
template <>
__half cvt<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
double back(float v) { return v; }
double back(__half v) { return __half2float(v); }
double back(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() { return DType::kFloat32; }
template <>
DType dtype_of<__half>() { return DType::kFloat16; }
template <>
DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

int failures = 0;
int checks = 0;

void expect(bool ok, const char* tag, const char* what, double value) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: %s (%g)\n", tag, what, value);
  }
}

struct Case {
  int T, K, N, R, H_in, H_out;
  int pad = 0;       // extra elements per row: strides that are not a multiple of the vector width
  int offset = 0;    // element offset of every base pointer: unaligned rows, scalar loads
  bool ids64 = true;
  bool weights64 = false;
  int id_step = 1;       // > 1: ids only from adapters id_step - 1, 2 * id_step - 1, ...: empty segments between
  float empty = 0.15f;   // fraction of empty slots (-1); another 5% get an id outside [0, N)
  unsigned paths = 7;    // bit 0: per-pair, bit 1: segmented, bit 2: fused (the emulation is slow for big grids)
  bool poison = false;   // NaN in A of the first token's adapter, +Inf in B of another adapter
  bool mixed_ranks = false;  // per-adapter ranks in [0, R], NaN padding beyond them (never to be read)
};

// |got - want|, with a non-finite `want` matched by any non-finite `got` (0) and a non-finite `got` where
// `want` is finite a failure (1e30).
double diff(double got, double want) {
  if (!std::isfinite(want)) return std::isfinite(got) ? 1e30 : 0.0;
  return std::isfinite(got) ? std::fabs(got - want) : 1e30;
}

template <typename T>
void run(const Case& c, const char* tag) {
  const int P = c.T * c.K, R = c.R, N = c.N;
  const int64_t xs = c.H_in + c.pad, as_r = c.H_in + c.pad, as_n = as_r * R;
  const int64_t bs_o = R + c.pad, bs_n = bs_o * c.H_out, os = c.H_out + c.pad;
  std::vector<T> x(c.offset + c.T * xs), a(c.offset + N * as_n), b(c.offset + N * bs_n);
  std::vector<double> xd(size_t(c.T) * c.H_in), ad(size_t(N) * R * c.H_in), bd(size_t(N) * c.H_out * R);
  for (int t = 0; t < c.T; ++t)
    for (int i = 0; i < c.H_in; ++i) {
      const T v = cvt<T>(randn());
      x[c.offset + t * xs + i] = v;
      xd[size_t(t) * c.H_in + i] = back(v);
    }
  for (int e = 0; e < N; ++e)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < c.H_in; ++i) {
        const T v = cvt<T>(randn() / std::sqrt(float(c.H_in)));
        a[c.offset + e * as_n + r * as_r + i] = v;
        ad[(size_t(e) * R + r) * c.H_in + i] = back(v);
      }
  for (int e = 0; e < N; ++e)
    for (int j = 0; j < c.H_out; ++j)
      for (int r = 0; r < R; ++r) {
        const T v = cvt<T>(randn() / std::sqrt(float(R)));
        b[c.offset + e * bs_n + j * bs_o + r] = v;
        bd[(size_t(e) * c.H_out + j) * R + r] = back(v);
      }
  std::vector<int32_t> ranks(N, R);
  if (c.mixed_ranks) {
    for (int e = 0; e < N; ++e) {
      ranks[e] = e % 4 == 0 ? 0 : (e % 4 == 1 ? R : 1 + int(rng() % R));
      for (int r = ranks[e]; r < R; ++r) {
        for (int i = 0; i < c.H_in; ++i) {
          a[c.offset + e * as_n + r * as_r + i] = cvt<T>(NAN);
          ad[(size_t(e) * R + r) * c.H_in + i] = 0.0;
        }
        for (int j = 0; j < c.H_out; ++j) {
          b[c.offset + e * bs_n + j * bs_o + r] = cvt<T>(NAN);
          bd[(size_t(e) * c.H_out + j) * R + r] = 0.0;
        }
      }
    }
  }
  std::vector<int64_t> ids(P);
  std::vector<int32_t> ids32(P);
  std::vector<float> w(P), scale(N);
  std::vector<double> w64(P);
  for (int p = 0; p < P; ++p) {
    const float u = randu();
    const int64_t routed = c.id_step == 1 ? int64_t(rng() % N)
                                          : int64_t(c.id_step - 1) + c.id_step * int64_t(rng() % (N / c.id_step));
    int64_t e = u < c.empty ? -1 : (u < c.empty + 0.05f ? N + 7 : routed);  // empty, out of range, routed
    if (p % c.K == 1 && randu() < 0.3f) e = ids[p - 1];                     // duplicate within the token
    ids[p] = e;
    ids32[p] = int32_t(e);
    w[p] = randu() + 0.05f;
    w64[p] = w[p];
  }
  for (int e = 0; e < N; ++e) scale[e] = randu() + 0.5f;
  if (c.poison) {
    const int64_t e_nan = ids[0] >= 0 && ids[0] < N ? ids[0] : 0, e_inf = (e_nan + 1) % N;
    a[c.offset + e_nan * as_n + (R - 1) * as_r + c.H_in / 2] = cvt<T>(NAN);
    ad[(size_t(e_nan) * R + R - 1) * c.H_in + c.H_in / 2] = NAN;
    b[c.offset + e_inf * bs_n + (c.H_out / 3) * bs_o + R / 2] = cvt<T>(INFINITY);
    bd[(size_t(e_inf) * c.H_out + c.H_out / 3) * R + R / 2] = INFINITY;
  }
  // The routing plan, as molora_ops.plan builds it: a stable sort by adapter, unrouted pairs last.
  auto make_plan = [&](const std::vector<int64_t>& route_ids, std::vector<int32_t>& sorted, std::vector<int32_t>& seg) {
    sorted.resize(P);
    seg.assign(N + 1, 0);
    std::iota(sorted.begin(), sorted.end(), 0);
    auto key = [&](int p) { return (route_ids[p] >= 0 && route_ids[p] < N) ? route_ids[p] : int64_t(N); };
    std::stable_sort(sorted.begin(), sorted.end(), [&](int p, int q) { return key(p) < key(q); });
    for (int p = 0; p < P; ++p)
      for (int64_t e = key(p) + 1; e <= N; ++e) ++seg[e];
  };
  std::vector<int32_t> sorted, seg;
  make_plan(ids, sorted, seg);
  // A stale plan: about half of the pairs moved to another adapter (or made empty) before it was built.
  std::vector<int64_t> stale_ids = ids;
  for (int p = 0; p < P; ++p)
    if (randu() < 0.5f) stale_ids[p] = randu() < 0.2f ? -1 : int64_t(rng() % N);
  std::vector<int32_t> stale_sorted, stale_seg;
  make_plan(stale_ids, stale_sorted, stale_seg);

  std::vector<double> h_ref(size_t(P) * R, 0.0), out_ref(size_t(c.T) * c.H_out, 0.0);
  for (int p = 0; p < P; ++p) {
    const int64_t e = ids[p];
    if (e < 0 || e >= N) continue;
    for (int r = 0; r < R; ++r) {
      double s = 0;
      for (int i = 0; i < c.H_in; ++i) s += ad[(size_t(e) * R + r) * c.H_in + i] * xd[size_t(p / c.K) * c.H_in + i];
      h_ref[size_t(p) * R + r] = s * double(w[p] * scale[e]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t e = ids[p];
    if (e < 0 || e >= N) continue;
    for (int j = 0; j < c.H_out; ++j) {
      double s = 0;
      for (int r = 0; r < R; ++r) s += bd[(size_t(e) * c.H_out + j) * R + r] * h_ref[size_t(p) * R + r];
      out_ref[size_t(p / c.K) * c.H_out + j] += s;
    }
  }

  Routing route;
  route.ids = c.ids64 ? static_cast<const void*>(ids.data()) : static_cast<const void*>(ids32.data());
  route.ids_int64 = c.ids64;
  route.weights = c.weights64 ? static_cast<const void*>(w64.data()) : static_cast<const void*>(w.data());
  route.weights_dtype = c.weights64 ? DType::kFloat64 : DType::kFloat32;
  route.scale = scale.data();
  route.sorted_pairs = sorted.data();
  route.seg_offsets = seg.data();
  route.num_tokens = c.T;
  route.top_k = c.K;
  route.num_adapters = N;
  route.ranks = c.mixed_ranks ? ranks.data() : nullptr;
  ShrinkProblem sp;
  sp.route = route;
  sp.dtype = dtype_of<T>();
  sp.x = x.data() + c.offset;
  sp.x_row_stride = xs;
  sp.a = a.data() + c.offset;
  sp.a_stride_n = as_n;
  sp.a_stride_r = as_r;
  sp.rank = R;
  sp.hidden_in = c.H_in;
  ExpandProblem ep;
  ep.route = route;
  ep.dtype = dtype_of<T>();
  ep.b = b.data() + c.offset;
  ep.b_stride_n = bs_n;
  ep.b_stride_o = bs_o;
  ep.rank = R;
  ep.hidden_out = c.H_out;
  ep.out_row_stride = os;

  const double tol = dtype_of<T>() == DType::kFloat32 ? 1e-5 : (dtype_of<T>() == DType::kFloat16 ? 2e-3 : 1.6e-2);
  const bool fused_ok = int64_t(c.K) * R <= fused_max_rank_slots() && c.K <= 64;
  for (int path = 0; path < 3; ++path) {
    if (!(c.paths >> path & 1)) continue;
    char name[160];
    std::snprintf(name, sizeof name, "%s [%s]", tag, path == 0 ? "per-pair" : path == 1 ? "segmented" : "fused");
    std::vector<T> out(size_t(c.T) * os, cvt<T>(NAN)), acc(size_t(c.T) * os, cvt<T>(NAN));
    for (int t = 0; t < c.T; ++t)
      for (int j = 0; j < c.H_out; ++j) acc[size_t(t) * os + j] = cvt<T>(0.5f);
    if (path < 2) {
      std::vector<float> h(size_t(P) * R + R, NAN);  // R NaN sentinels after h
      expect(launch_shrink(sp, h.data(), path == 0 ? kShrinkPerPair : kShrinkSegmented, nullptr) == 0, name,
             "shrink launch", 0);
      double err = 0;
      for (size_t i = 0; i < h_ref.size(); ++i) err = std::max(err, diff(h[i], h_ref[i]));
      expect(err <= 1e-4, name, "shrink max abs err", err);
      expect(std::all_of(h.begin() + h_ref.size(), h.end(), [](float v) { return std::isnan(v); }), name,
             "shrink wrote past h", 0);
      if (path == 1) {
        // Stale plan: a pair's value is kept only where its stale segment is its adapter; every other pair is 0.
        ShrinkProblem stale = sp;
        stale.route.sorted_pairs = stale_sorted.data();
        stale.route.seg_offsets = stale_seg.data();
        std::fill(h.begin(), h.end(), NAN);
        expect(launch_shrink(stale, h.data(), kShrinkSegmented, nullptr) == 0, name, "stale shrink launch", 0);
        double stale_err = 0;
        for (int p = 0; p < P; ++p) {
          const bool kept = stale_ids[p] >= 0 && stale_ids[p] < N && stale_ids[p] == ids[p];
          for (int r = 0; r < R; ++r) {
            const double want = kept ? h_ref[size_t(p) * R + r] : 0.0, got = h[size_t(p) * R + r];
            stale_err = std::max(stale_err, diff(got, want));
          }
        }
        expect(stale_err <= 1e-4, name, "stale plan: max abs err", stale_err);
        expect(std::all_of(h.begin() + h_ref.size(), h.end(), [](float v) { return std::isnan(v); }), name,
               "stale plan: shrink wrote past h", 0);
      }
      h.resize(h_ref.size());
      for (size_t i = 0; i < h.size(); ++i) {
        const int64_t e = ids[i / R];
        const bool padding = c.mixed_ranks && e >= 0 && e < N && int(i % R) >= ranks[e];
        h[i] = padding ? NAN : float(h_ref[i]);  // the expand must not read h beyond the adapter's rank
      }
      ep.out = out.data();
      ep.accumulate = false;
      expect(launch_expand(ep, h.data(), nullptr) == 0, name, "expand launch", 0);
      ep.out = acc.data();
      ep.accumulate = true;
      expect(launch_expand(ep, h.data(), nullptr) == 0, name, "expand launch", 0);
    } else {
      ep.out = out.data();
      ep.accumulate = false;
      const int rc = launch_fused(sp, ep, nullptr);
      if (!fused_ok) {
        expect(rc != 0, name, "fused must refuse K * R beyond its shared memory", rc);
        continue;
      }
      expect(rc == 0, name, "fused launch", rc);
      ep.out = acc.data();
      ep.accumulate = true;
      expect(launch_fused(sp, ep, nullptr) == 0, name, "fused launch", 0);
    }
    double err = 0, err_acc = 0;
    bool pad_ok = true;
    int finite_rows = 0;
    for (int t = 0; t < c.T; ++t) {
      bool finite = true;
      for (int j = 0; j < c.H_out; ++j) {
        const double ref = out_ref[size_t(t) * c.H_out + j];
        const double o = back(out[size_t(t) * os + j]), s = back(acc[size_t(t) * os + j]);
        err = std::max(err, diff(o, ref) / (1 + (std::isfinite(ref) ? std::fabs(ref) : 0.0)));
        err_acc = std::max(err_acc, diff(s - 0.5, ref) / (1.5 + (std::isfinite(ref) ? std::fabs(ref) : 0.0)));
        finite = finite && std::isfinite(ref);
      }
      finite_rows += finite;
      for (int j = c.H_out; j < os; ++j) pad_ok = pad_ok && std::isnan(back(out[size_t(t) * os + j]));
    }
    if (c.poison) expect(finite_rows > 0 && finite_rows < c.T, name, "poisoned case has finite and non-finite rows", finite_rows);
    expect(err <= tol, name, "overwrite max rel err", err);
    expect(err_acc <= tol, name, "accumulate max rel err", err_acc);
    expect(pad_ok, name, "wrote outside the output rows", 0);
    std::printf("%-5s %-48s out %.2e  acc %.2e\n", err <= tol && err_acc <= tol ? "ok" : "FAIL", name, err, err_acc);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "--full";
  //            T   K  N   R  H_in H_out pad off ids64 w64
  run<float>({3, 2, 5, 7, 123, 77}, "f32 odd sizes");
  run<__half>({3, 2, 5, 16, 128, 64, 0, 0, false}, "f16 vector loads, int32 ids");
  run<__nv_bfloat16>({5, 3, 4, 8, 72, 40, 0, 0, true, true}, "bf16 vector loads, f64 weights");
  run<__half>({4, 2, 3, 16, 136, 72, 1, 1}, "f16 unaligned rows, padded strides");
  run<float>({2, 1, 2, 40, 33, 300}, "f32 R=40, several tiles");
  run<__half>({9, 4, 6, 1, 64, 33}, "f16 R=1");
  run<__nv_bfloat16>({0, 2, 3, 8, 64, 64}, "bf16 T=0");
  run<float>({2, 70, 3, 4, 16, 24}, "f32 K=70 (ids beyond the shared cache)");
  // The segmented shrink's flat tile axis: N >> P (most segments empty, ~N idle tiles), empty segments between
  // routed ones, all slots empty (one segment: the unrouted one), many tiles per segment.
  Case many_adapters{20, 1, 300, 8, 64, 32};
  run<float>(many_adapters, "f32 N=300, P=20");
  Case sparse{37, 3, 40, 16, 72, 24, 0, 0, false};
  sparse.id_step = 3;
  run<__half>(sparse, "f16 N=40, every 3rd adapter routed");
  Case all_empty{33, 2, 7, 20, 64, 16};
  all_empty.empty = 1.0f;
  run<float>(all_empty, "f32 all slots empty");
  Case big{300, 4, 6, 20, 40, 16};
  big.id_step = 2;
  big.paths = 2;
  run<__nv_bfloat16>(big, "bf16 P=1200, ~10 tiles per segment");
  // Non-finite adapters: the segmented shrink's tiles mix tokens (and, with the stale plan, pairs of other
  // adapters); none of them may see another adapter's NaN or Inf.
  Case poisoned_f32{37, 2, 5, 20, 72, 40};
  poisoned_f32.poison = true;
  run<float>(poisoned_f32, "f32 NaN in one A, Inf in another B");
  Case poisoned_f16{45, 3, 6, 16, 128, 64, 0, 0, false};
  poisoned_f16.poison = true;
  run<__half>(poisoned_f16, "f16 NaN in one A, Inf in another B");
  // Mixed ranks (0, R, and ranks that end inside a 16-byte vector), NaN padding: no kernel may read it.
  Case mixed_f32{7, 3, 9, 16, 72, 40};
  mixed_f32.mixed_ranks = true;
  run<float>(mixed_f32, "f32 mixed ranks, NaN padding");
  Case mixed_f16{9, 2, 8, 24, 128, 64, 0, 0, false};
  mixed_f16.mixed_ranks = true;
  run<__half>(mixed_f16, "f16 mixed ranks, NaN padding");
  Case mixed_bf16{5, 2, 6, 64, 64, 48, 1, 1};
  mixed_bf16.mixed_ranks = true;
  run<__nv_bfloat16>(mixed_bf16, "bf16 mixed ranks R=64, unaligned rows");
  Case mixed_big{150, 3, 12, 20, 40, 16};
  mixed_big.mixed_ranks = true;
  mixed_big.paths = 2;
  run<float>(mixed_big, "f32 mixed ranks, P=450 segmented");
  if (full) {
    run<float>({40, 2, 3, 20, 130, 50}, "f32 T=40 R=20");
    run<float>({1, 3, 4, 64, 2049, 20}, "f32 T=1 H_in=2049");
    run<__half>({37, 2, 40, 32, 256, 96}, "f16 N=40, many segments");
  }
  std::printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "all ok", checks, failures);
  return failures != 0;
}

// Torch binding for the CUDA kernels: CUDA-dispatch-key implementations of the molora::cuda_* ops.
//
// The op schemas are defined in Python (molora_ops/impl/cuda_backend.py) before this library is loaded, so
// the ops exist whether or not it was built; here we only register kernels for the CUDA key. Only CPU-side
// torch headers are used (the CPU torch wheel lacks parts of c10/cuda and ATen/cuda): the current CUDA
// stream comes from c10's device-guard interface, which the CUDA build of torch implements at runtime.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <utility>

#include "molora_launch.h"

namespace {

molora::DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return molora::DType::kFloat32;
    case at::kHalf:
      return molora::DType::kFloat16;
    case at::kBFloat16:
      return molora::DType::kBFloat16;
    case at::kDouble:
      return molora::DType::kFloat64;
    default:
      TORCH_CHECK(false, "molora cuda: ", name, " has unsupported dtype ", t.scalar_type());
  }
}

using Named = std::pair<const at::Tensor*, const char*>;

void check_devices(const at::Device& device, std::initializer_list<Named> tensors) {
  TORCH_CHECK(device.is_cuda(), "molora cuda: tensors must be on a CUDA device, got ", device);
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->device() == device, "molora cuda: ", name, " is on ", t->device(), " but the inputs are on ", device);
  }
}

void check_inner_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "molora cuda: ", name, " needs a unit stride in its last dim");
}

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

// The launchers return cudaGetLastError() after the launch, which also reports (and clears) an error left by
// earlier asynchronous work on the device, e.g. a kernel of another library that faulted: say so, rather
// than blame this launch.
void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "molora cuda: CUDA error after launching the ", what,
              " kernel (it may come from an earlier asynchronous failure on this device): ", molora::error_string(code));
}

molora::Routing routing(const at::Tensor& topk_ids, const at::Tensor* topk_weights, const at::Tensor* scale,
                        const at::Tensor* sorted_pairs, const at::Tensor* seg_offsets, int64_t num_adapters) {
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.is_contiguous(), "molora cuda: topk_ids must be contiguous [T, K]");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "molora cuda: topk_ids must be int32 or int64");
  TORCH_CHECK(topk_ids.size(1) >= 1, "molora cuda: K must be >= 1");
  molora::Routing r;
  r.ids = topk_ids.data_ptr();
  r.ids_int64 = topk_ids.scalar_type() == at::kLong;
  r.num_tokens = topk_ids.size(0);
  r.top_k = static_cast<int32_t>(topk_ids.size(1));
  r.num_adapters = static_cast<int32_t>(num_adapters);
  if (topk_weights != nullptr) {
    TORCH_CHECK(topk_weights->sizes() == topk_ids.sizes() && topk_weights->is_contiguous(),
                "molora cuda: topk_weights must be contiguous with topk_ids' shape");
    r.weights = topk_weights->data_ptr();
    r.weights_dtype = element_type(*topk_weights, "topk_weights");
  }
  if (scale != nullptr) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == num_adapters,
                "molora cuda: scale must be a contiguous [N] float32 tensor");
    r.scale = scale->data_ptr<float>();
  }
  if (sorted_pairs != nullptr) {
    TORCH_CHECK(sorted_pairs->scalar_type() == at::kInt && sorted_pairs->is_contiguous() &&
                    sorted_pairs->numel() == topk_ids.numel(),
                "molora cuda: sorted_pairs must be a contiguous [T * K] int32 tensor");
    TORCH_CHECK(seg_offsets->scalar_type() == at::kInt && seg_offsets->is_contiguous() &&
                    seg_offsets->numel() == num_adapters + 1,
                "molora cuda: seg_offsets must be a contiguous [N + 1] int32 tensor");
    r.sorted_pairs = sorted_pairs->data_ptr<int32_t>();
    r.seg_offsets = seg_offsets->data_ptr<int32_t>();
  }
  return r;
}

// The optional per-adapter ranks ([N] int32 contiguous, on `device`) into the routing; none: every adapter has R.
void attach_ranks(molora::Routing& r, const std::optional<at::Tensor>& ranks, const at::Device& device) {
  if (!ranks.has_value()) return;
  const at::Tensor& t = *ranks;
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 1 && t.numel() == r.num_adapters,
              "molora cuda: ranks must be a contiguous [N] int32 tensor");
  TORCH_CHECK(t.device() == device, "molora cuda: ranks is on ", t.device(), " but the inputs are on ", device);
  r.ranks = t.data_ptr<int32_t>();
}

molora::ShrinkProblem shrink_problem(const at::Tensor& x, const at::Tensor& lora_a, molora::Routing route) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_a.size(2) == x.size(1), "molora cuda: bad x / lora_a shapes");
  TORCH_CHECK(x.scalar_type() == lora_a.scalar_type(), "molora cuda: x and lora_a dtypes differ");
  TORCH_CHECK(x.size(0) == route.num_tokens, "molora cuda: x and topk_ids disagree on T");
  check_inner_contiguous(x, "x");
  check_inner_contiguous(lora_a, "lora_a");
  molora::ShrinkProblem p;
  p.route = route;
  p.dtype = element_type(x, "x");
  TORCH_CHECK(p.dtype != molora::DType::kFloat64, "molora cuda: float64 is not supported by the CUDA kernels");
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.a = lora_a.data_ptr();
  p.a_stride_n = lora_a.stride(0);
  p.a_stride_r = lora_a.stride(1);
  p.rank = static_cast<int32_t>(lora_a.size(1));
  p.hidden_in = x.size(1);
  return p;
}

molora::ExpandProblem expand_problem(const at::Tensor& lora_b, const at::Tensor& out, bool accumulate,
                                     molora::Routing route) {
  TORCH_CHECK(lora_b.dim() == 3 && out.dim() == 2 && out.size(1) == lora_b.size(1), "molora cuda: bad lora_b / out");
  TORCH_CHECK(out.scalar_type() == lora_b.scalar_type(), "molora cuda: out and lora_b dtypes differ");
  TORCH_CHECK(out.size(0) == route.num_tokens, "molora cuda: out and topk_ids disagree on T");
  check_inner_contiguous(lora_b, "lora_b");
  check_inner_contiguous(out, "out");
  molora::ExpandProblem p;
  p.route = route;
  p.dtype = element_type(lora_b, "lora_b");
  TORCH_CHECK(p.dtype != molora::DType::kFloat64, "molora cuda: float64 is not supported by the CUDA kernels");
  p.b = lora_b.data_ptr();
  p.b_stride_n = lora_b.stride(0);
  p.b_stride_o = lora_b.stride(1);
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(0);
  p.rank = static_cast<int32_t>(lora_b.size(2));
  p.hidden_out = lora_b.size(1);
  p.accumulate = accumulate;
  return p;
}

void cuda_shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& topk_ids,
                 const at::Tensor& topk_weights, const at::Tensor& scale, const at::Tensor& sorted_pairs,
                 const at::Tensor& seg_offsets, const at::Tensor& h, int64_t path,
                 const std::optional<at::Tensor>& ranks) {
  const at::Device device = x.device();
  check_devices(device, {{&lora_a, "lora_a"}, {&topk_ids, "topk_ids"}, {&topk_weights, "topk_weights"},
                         {&scale, "scale"}, {&sorted_pairs, "sorted_pairs"}, {&seg_offsets, "seg_offsets"}, {&h, "h"}});
  auto route = routing(topk_ids, &topk_weights, &scale, &sorted_pairs, &seg_offsets, lora_a.size(0));
  attach_ranks(route, ranks, device);
  const auto prob = shrink_problem(x, lora_a, route);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == topk_ids.numel() * lora_a.size(1),
              "molora cuda: h must be a contiguous [T, K, R] float32 tensor");
  TORCH_CHECK(path == molora::kShrinkPerPair || path == molora::kShrinkSegmented, "molora cuda: bad shrink path ", path);
  c10::DeviceGuard guard(device);
  check_launch(molora::launch_shrink(prob, h.data_ptr<float>(), static_cast<int32_t>(path), current_stream(device)),
               "shrink");
}

void cuda_expand(const at::Tensor& h, const at::Tensor& lora_b, const at::Tensor& topk_ids, const at::Tensor& out,
                 bool accumulate, const std::optional<at::Tensor>& ranks) {
  const at::Device device = h.device();
  check_devices(device, {{&lora_b, "lora_b"}, {&topk_ids, "topk_ids"}, {&out, "out"}});
  auto route = routing(topk_ids, nullptr, nullptr, nullptr, nullptr, lora_b.size(0));
  attach_ranks(route, ranks, device);
  const auto prob = expand_problem(lora_b, out, accumulate, route);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == topk_ids.numel() * lora_b.size(2),
              "molora cuda: h must be a contiguous [T, K, R] float32 tensor");
  c10::DeviceGuard guard(device);
  check_launch(molora::launch_expand(prob, h.data_ptr<float>(), current_stream(device)), "expand");
}

void cuda_routed_lora_fused(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& scale,
                            const at::Tensor& out, bool accumulate, const std::optional<at::Tensor>& ranks) {
  const at::Device device = x.device();
  check_devices(device, {{&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&topk_ids, "topk_ids"},
                         {&topk_weights, "topk_weights"}, {&scale, "scale"}, {&out, "out"}});
  auto route = routing(topk_ids, &topk_weights, &scale, nullptr, nullptr, lora_a.size(0));
  attach_ranks(route, ranks, device);
  const auto sp = shrink_problem(x, lora_a, route);
  const auto ep = expand_problem(lora_b, out, accumulate, route);
  TORCH_CHECK(lora_b.size(0) == lora_a.size(0) && lora_b.size(2) == lora_a.size(1), "molora cuda: lora_a / lora_b");
  TORCH_CHECK(topk_ids.size(1) * lora_a.size(1) <= molora::fused_max_rank_slots() && topk_ids.size(1) <= 64,
              "molora cuda: K * R too large for the fused kernel");
  c10::DeviceGuard guard(device);
  check_launch(molora::launch_fused(sp, ep, current_stream(device)), "fused routed_lora");
}

}  // namespace

TORCH_LIBRARY_IMPL(molora, CUDA, m) {
  m.impl("cuda_shrink", &cuda_shrink);
  m.impl("cuda_expand", &cuda_expand);
  m.impl("cuda_routed_lora_fused", &cuda_routed_lora_fused);
}

// Plain C symbol for ctypes: which architectures this library was built for.
extern "C" __attribute__((visibility("default"))) const char* molora_cuda_archs() { return molora::compiled_archs(); }

"""The `triton` backend: adapter-segmented shrink, token-major expand, and a fused decode path.

The three device functions of the backend contract (molora_ops/impl/__init__.py; semantics stated once in
molora_ops/reference.py), inputs already validated by the op layer. With accumulate=False out is overwritten.
Slots whose id is outside [0, N) (empty, or out of range when validation is off) add nothing and are never
dereferenced. float32 accumulation throughout; one rounding into out.
The plan is checked, not trusted: the public ops refuse a plan not built from these topk_ids (molora_ops.plan),
and below them the shrink counts a pair only where the plan lists it in the segment of its own adapter
topk_ids[t, k]. Pairs that a stale or inconsistent plan (RoutingPlan.empty never updated, one built for other
ids) misses or files under another adapter are empty slots, never uninitialised memory. The fused path reads
topk_ids directly and ignores the plan.

Design (see molora_ops/kernels/routed_lora.py for the kernels):
  * shrink groups (token, slot) pairs by adapter using the plan and runs one tl.dot gather-GEMM per segment
    tile; for few pairs it splits the H_in reduction across SPLIT_K programs that write float32 partials,
    reduced in a fixed order by a second kernel (deterministic). fp32 atomics instead of the partial buffer
    are available behind ``override(atomic_split_k=True)`` or MOLORA_TRITON_ATOMIC_SPLITK=1, off by default
    because they are not deterministic.
  * expand has three variants, all deterministic, every element of out written exactly once (including
    tokens whose slots are all empty). Token-major: each program owns a tile of out and sums its tokens' K
    slots itself, "gather" (lora_b rows gathered per token, CUDA-core FMA; decode, float32) or "dot" (tensor
    cores, one tl.dot per distinct adapter present in the token tile, in ascending id order; half-precision
    prefill with few adapters). Adapter-grouped, "grouped" (half-precision prefill otherwise): a program per
    plan segment tile x column tile reads lora_b[e] once and writes per-pair float32 partials, which a second
    kernel sums over k in slot order (column-chunked so the workspace stays bounded; see
    kernels.routed_lora.launch_expand_grouped).
  * routed_lora runs shrink + expand (two launches, h in a float32 workspace), or at decode sizes (few tokens,
    small R * K) a single fused launch that keeps h in registers; its H_in loop is software-pipelined
    (configs.FUSED_NUM_STAGES, forced by ``override(fused_stages=n)``).
  * ranks (an int32 [N] of real ranks, or None): every kernel loads ranks[e] and bounds its rank tiles and steps
    by it (molora_ops.kernels.routed_lora), so the zero padding of smaller adapters is never read.
Configs come from shape heuristics (molora_ops.kernels.configs); there is no autotuning on this path, no
.item() and no grid sized from device values, so every launch can be captured in a CUDA graph.

CUDA graphs: warm up every batch size before capturing it. Triton compiles a separate kernel for each
specialisation of its integer arguments (a size or stride equal to 1, or divisible by 16, is specialised),
and the configs above depend on T (tiles, split-K, fused or two launches, gather or dot expand), so a new
batch size can mean new kernels. Run each T you will capture once, eagerly, with the same dtypes and
layouts, before capturing it; otherwise the first call JIT-compiles inside the capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch

from ..plan import RoutingPlan

name = "triton"

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # a missing or broken triton is reported by status(), never raised at import
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class Settings:
    """Process-wide switches, mainly for tests and benchmarks. None means "use the shape heuristic".

    fused:          force the fused (True) or the two-launch (False) routed_lora path
    split_k:        force the shrink's SPLIT_K (clamped so no split is empty)
    fused_stages:   force the fused kernel's H_in pipeline depth (tl.range num_stages; 1 = sequential)
    atomic_split_k: reduce split-K partials with fp32 atomics instead of the deterministic partial buffer
    atomic_backward: split each adapter's dA/dB segment reduction across programs and add the float32 tiles
                    with atomics (faster under skewed routing, not deterministic; off by default)
    expand:         force the expand variant, "gather" (CUDA-core, per-row weight gather), "dot"
                    (tensor cores, one dot per distinct adapter of a token tile; only for
                    R <= configs.DOT_EXPAND_MAX_RANK, larger ranks take "gather") or "grouped" (tensor cores
                    over the plan's adapter segments, per-pair float32 partials reduced over k in slot order)
    """

    fused: Optional[bool] = None
    fused_stages: Optional[int] = None
    split_k: Optional[int] = None
    expand: Optional[str] = None
    atomic_split_k: bool = os.environ.get("MOLORA_TRITON_ATOMIC_SPLITK") == "1"
    atomic_backward: bool = os.environ.get("MOLORA_TRITON_ATOMIC_BACKWARD") == "1"


settings = Settings()


@contextlib.contextmanager
def override(**changes):
    """Temporarily change `settings`, e.g. ``with override(fused=False, split_k=4): ...``."""
    old = dataclasses.replace(settings)
    for key, value in changes.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown triton backend setting {key!r}")
        setattr(settings, key, value)
    try:
        yield settings
    finally:
        for field in dataclasses.fields(Settings):
            setattr(settings, field.name, getattr(old, field.name))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def status() -> tuple[bool, bool, str]:
    """(compiled, available, reason). compiled: triton imports (it JIT-compiles on first call); available:
    additionally a CUDA device is present, or the interpreter is on."""
    if _IMPORT_ERROR is not None:
        return False, False, f"triton is not importable ({_IMPORT_ERROR}); pip install 'molora-ops[triton]'"
    version = getattr(triton, "__version__", "?")
    if torch.cuda.is_available():
        return True, True, f"triton {version}: JIT-compiled kernels on CUDA"
    if interpreting():
        return True, True, f"triton {version} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    return True, False, f"triton {version} is importable but there is no CUDA device (TRITON_INTERPRET=1 runs it on CPU)"


def _kernels():
    # Imported lazily: triton decides at decoration time whether kernels are compiled or interpreted.
    from molora_ops.kernels import routed_lora as kernels

    return kernels


def _configs():
    from molora_ops.kernels import configs

    return configs


def _check_dtype(**tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 {arg}, got {t.dtype}")


def _upcast(dtype: torch.dtype) -> bool:
    """fp32 dot operands with ieee precision: for float32 inputs, and for every dtype under the interpreter
    (its bf16 tl.dot multiplies raw bit patterns)."""
    return dtype == torch.float32 or interpreting()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _shrink_config(num_pairs: int, num_adapters: int, rank: int, h_in: int, dtype: torch.dtype = torch.float16):
    elem_bytes = 4 if _upcast(dtype) else 2
    cfg = _configs().shrink_config(num_pairs, num_adapters, rank, h_in, elem_bytes)
    if settings.split_k is not None:
        cfg = cfg.with_split(settings.split_k, h_in)
    return cfg


def _shrink_rows(x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, ranks=None) -> torch.Tensor:
    """h as a [P, R] float32 tensor, every row defined: zeros for empty slots.

    The plan only says which pairs each program computes; the kernel checks every listed pair against
    topk_ids and skips pairs not listed under their own adapter. A stale plan (RoutingPlan.empty never
    updated, or one built for other ids) can therefore leave rows of routed pairs unwritten, so the buffer
    the shrink writes starts at zero (one memset) and such pairs come out as empty slots instead of
    uninitialised memory that the expand would read. The fused decode path has no h and is unaffected.
    The same zeros stand for the columns r >= ranks[e], which the kernels never write.
    """
    kernels = _kernels()
    num_pairs, num_adapters, rank = plan.sorted_pairs.shape[0], lora_a.shape[0], lora_a.shape[1]
    cfg = _shrink_config(num_pairs, num_adapters, rank, x.shape[1], x.dtype)
    common = dict(top_k=plan.top_k, cfg=cfg, upcast=_upcast(x.dtype), ranks=ranks)
    args = (x, lora_a, topk_ids, topk_weights, scale, plan.sorted_pairs, plan.seg_offsets)
    if cfg.SPLIT_K == 1 or settings.atomic_split_k:
        h = torch.zeros(num_pairs, rank, dtype=torch.float32, device=x.device)
        kernels.launch_shrink(*args, h, apply_coef=True, use_atomic=cfg.SPLIT_K > 1, **common)
        return h
    # The reduce writes every row of h but reads the partials of every routed pair: those start at zero.
    partials = torch.zeros(cfg.SPLIT_K, num_pairs, rank, dtype=torch.float32, device=x.device)
    kernels.launch_shrink(*args, partials, apply_coef=False, use_atomic=False, **common)
    h = torch.empty(num_pairs, rank, dtype=torch.float32, device=x.device)
    kernels.launch_shrink_reduce(partials, topk_ids, topk_weights, scale, h, num_adapters=num_adapters, ranks=ranks)
    return h


def shrink(x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, ranks=None) -> torch.Tensor:
    """Semantics: h[t, k, r] = topk_weights[t, k] * scale[e] * lora_a[e, r] @ x[t] for r < ranks[e] (R when ranks
    is None),  e = topk_ids[t, k]; h[t, k, r] = 0 beyond the rank and when e is outside [0, N).

    x [T, H_in] fp16/bf16/fp32, lora_a [N, R, H_in] x.dtype, topk_ids [T, K] int32/int64, topk_weights [T, K]
    floating, scale [N] float32/float64, plan built from topk_ids. Returns h [T, K, R] float32 (float64 when
    `scale` is float64, to match the op's declared output; the arithmetic is float32 either way).
    """
    _check_dtype(x=x, lora_a=lora_a)
    num_tokens, top_k, rank = x.shape[0], topk_ids.shape[1], lora_a.shape[1]
    out_dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
    if num_tokens == 0:
        return torch.zeros(num_tokens, top_k, rank, dtype=out_dtype, device=x.device)
    with _device_guard(x):
        h = _shrink_rows(x, lora_a, topk_ids, topk_weights, scale, plan, ranks)
    return h.view(num_tokens, top_k, rank).to(out_dtype)


def choose_expand(num_tokens: int, top_k: int, num_adapters: int, rank: int, dtype: torch.dtype) -> str:
    """"dot", "grouped" or "gather" for this shape (settings.expand overrides; a forced "dot" falls back to
    "gather" for R > configs.DOT_EXPAND_MAX_RANK, where its tile would spill registers)."""
    configs = _configs()
    if settings.expand is not None:
        if settings.expand not in ("dot", "gather", "grouped"):
            raise ValueError(f"settings.expand must be None, 'dot', 'gather' or 'grouped', got {settings.expand!r}")
        if settings.expand == "dot" and rank > configs.DOT_EXPAND_MAX_RANK:
            return "gather"
        return settings.expand
    half = dtype in (torch.float16, torch.bfloat16)
    return configs.expand_variant(num_tokens, top_k, num_adapters, rank, half)


def _expand_into(h, lora_b, topk_ids, plan: RoutingPlan, out, accumulate: bool, ranks=None) -> None:
    num_tokens, top_k, rank = h.shape
    h_out = lora_b.shape[1]
    variant = choose_expand(num_tokens, top_k, lora_b.shape[0], rank, lora_b.dtype)
    if variant == "grouped":
        cfg = _configs().expand_grouped_config(num_tokens * top_k, rank, h_out)
        _kernels().launch_expand_grouped(
            h, lora_b, topk_ids, plan.sorted_pairs, plan.seg_offsets, out, cfg=cfg, accumulate=accumulate,
            upcast=_upcast(lora_b.dtype), ranks=ranks,
        )
        return
    if variant == "dot":
        cfg = _configs().expand_dot_config(num_tokens, rank, h_out)
        _kernels().launch_expand_dot(
            h, lora_b, topk_ids, out, cfg=cfg, accumulate=accumulate, upcast=_upcast(lora_b.dtype), ranks=ranks
        )
        return
    cfg = _configs().expand_config(num_tokens, rank, h_out)
    _kernels().launch_expand(h, lora_b, topk_ids, out, cfg=cfg, accumulate=accumulate, ranks=ranks)


def expand(h, lora_b, topk_ids, plan: RoutingPlan, out: torch.Tensor, accumulate: bool, ranks=None) -> None:
    """Semantics: out[t] = (out[t] if accumulate else 0) + sum_{k: 0 <= e < N} lora_b[e] @ h[t, k],  e = topk_ids[t, k],
    both cut to ranks[e] (when given); the sum is formed in float32 and rounded once into out.

    h [T, K, R] float32/float64 (any strides), lora_b [N, H_out, R] fp16/bf16/fp32, topk_ids [T, K],
    out [T, H_out] lora_b.dtype (any strides). Every element of out is written, once. The token-major variants
    read each token's ids directly; the grouped one walks the plan's segments (checked against topk_ids).
    """
    _check_dtype(lora_b=lora_b, out=out)
    if out.numel() == 0:
        return
    with _device_guard(out):
        _expand_into(h, lora_b, topk_ids, plan, out, accumulate, ranks)


def choose_fused(num_tokens: int, top_k: int, rank: int, h_in: int, h_out: int) -> bool:
    """Whether routed_lora takes the single-launch fused path for this shape (settings.fused overrides)."""
    if settings.fused is not None:
        return bool(settings.fused)
    return _configs().use_fused(num_tokens, top_k, rank, h_in, h_out)


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool, ranks=None
) -> None:
    """Semantics: out[t] = (out[t] if accumulate else 0)
                          + sum_{k: 0 <= e < N} topk_weights[t, k] * scale[e] * lora_b[e] @ (lora_a[e] @ x[t]),
    e = topk_ids[t, k]; float32 throughout, one rounding into out.

    x [T, H_in], lora_a [N, R, H_in], lora_b [N, H_out, R], out [T, H_out], all one of fp16/bf16/fp32; topk_ids
    and topk_weights [T, K]; scale [N]; ranks None or int32 [N] (each adapter's factors cut to its rank). One
    fused launch at decode sizes (choose_fused), else shrink + expand.
    """
    _check_dtype(x=x, lora_a=lora_a, lora_b=lora_b, out=out)
    if out.numel() == 0:
        return
    num_tokens, h_in = x.shape
    top_k, rank, h_out = topk_ids.shape[1], lora_a.shape[1], lora_b.shape[1]
    with _device_guard(out):
        if choose_fused(num_tokens, top_k, rank, h_in, h_out):
            cfg = _configs().fused_config(num_tokens, rank, h_in, h_out, settings.fused_stages)
            _kernels().launch_fused(
                x, lora_a, lora_b, topk_ids, topk_weights, scale, out, cfg=cfg, accumulate=accumulate, ranks=ranks
            )
            return
        h = _shrink_rows(x, lora_a, topk_ids, topk_weights, scale, plan, ranks)
        _expand_into(h.view(num_tokens, top_k, rank), lora_b, topk_ids, plan, out, accumulate, ranks)


# ---------------------------------------------------------------------------------------------- backward
# Semantics and design: molora_ops/kernels/routed_lora_backward.py. Inputs as for the forward (validated by the
# op layer); `needs` says which gradients to form, None for the others. T = 0 takes the torch code (no launch).
def _backward_kernels():
    from molora_ops.kernels import routed_lora_backward as kernels

    return kernels


def _backward_flags(dtype: torch.dtype) -> dict:
    return dict(upcast=_upcast(dtype), atomic=settings.atomic_backward)


def shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, needs):
    """(dx, dA, dw, ds) of shrink given grad_h [T, K, R]."""
    _check_dtype(x=x, lora_a=lora_a)
    if x.shape[0] == 0:
        from . import torch_backward

        return torch_backward.shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, plan, needs)
    with _device_guard(x):
        return _backward_kernels().shrink_backward(
            grad_h, x, lora_a, topk_ids, topk_weights, scale, plan.sorted_pairs, plan.seg_offsets, needs,
            **_backward_flags(x.dtype),
        )


def expand_backward(grad_out, h, lora_b, topk_ids, plan: RoutingPlan, needs):
    """(dh, dB) of expand given grad_out [T, H_out]."""
    _check_dtype(lora_b=lora_b)
    if h.shape[0] == 0:
        from . import torch_backward

        return torch_backward.expand_backward(grad_out, h, lora_b, topk_ids, plan, needs)
    with _device_guard(h):
        return _backward_kernels().expand_backward(
            grad_out, h, lora_b, topk_ids, plan.sorted_pairs, plan.seg_offsets, needs, **_backward_flags(lora_b.dtype)
        )


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, needs,
                         u_saved=None):
    """(dx, dA, dB, dw, ds) of routed_lora given grad_out [T, H_out]; u_saved: the forward's unscaled shrink."""
    _check_dtype(x=x, lora_a=lora_a, lora_b=lora_b)
    if x.shape[0] == 0:
        from . import torch_backward

        return torch_backward.routed_lora_backward(
            grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, needs, u_saved
        )
    with _device_guard(x):
        return _backward_kernels().routed_lora_backward(
            grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan.sorted_pairs, plan.seg_offsets, needs,
            u_saved, **_backward_flags(x.dtype),
        )

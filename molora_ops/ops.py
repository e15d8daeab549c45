"""The public routed-LoRA ops and their torch.library registration.

The schemas are defined here, once, in Python, so the ops exist whether or not the CUDA extension was
built. Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it
without a graph break and ``torch.library.opcheck`` passes. The real implementation dispatches to the
backend named in the call; the Python wrappers below resolve "auto" before the op is called, so a
compiled graph records the concrete backend.

Ops (namespace ``molora``):
    shrink(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend) -> h [T, K, R] f32
    expand(h, lora_b, topk_ids, sorted_pairs?, seg_offsets?, backend) -> [T, H_out]
    expand_(out!, h, lora_b, topk_ids, sorted_pairs?, seg_offsets?, backend) -> ()
    routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend) -> [T, H_out]
    routed_lora_(out!, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend) -> ()
`scale` is the per-adapter scaling as a [N] float32 tensor; the plan tensors are optional (built from
topk_ids when absent).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import impl as _backends
from ._validation import check_expand, check_routed_lora, check_shrink, scaling_vector
from .plan import RoutingPlan, build_plan

__all__ = ["routed_lora", "lora_shrink", "lora_expand"]

Tensor = torch.Tensor


def _plan(topk_ids: Tensor, num_adapters: int, sorted_pairs: Optional[Tensor], seg_offsets: Optional[Tensor]):
    if sorted_pairs is None or seg_offsets is None:
        return build_plan(topk_ids, num_adapters)
    return RoutingPlan(sorted_pairs, seg_offsets, topk_ids.shape[0], topk_ids.shape[1], num_adapters)


def _new_output(shape, dtype, device) -> Tensor:
    """An uninitialised output the backend must fully overwrite. MOLORA_POISON_OUTPUTS=1 fills it with NaN
    first, so tests see any element a kernel failed to write."""
    if os.environ.get("MOLORA_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------- shrink
@torch.library.custom_op("molora::shrink", mutates_args=())
def _shrink_op(
    x: Tensor,
    lora_a: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
) -> Tensor:
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    return _backends.get(backend).shrink(x, lora_a, topk_ids, topk_weights, scale, plan)


@_shrink_op.register_fake
def _(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], topk_ids.shape[1], lora_a.shape[1]), dtype=dtype)


# ----------------------------------------------------------------------------------------------- expand
@torch.library.custom_op("molora::expand_", mutates_args=("out",))
def _expand_inplace_op(
    out: Tensor,
    h: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
) -> None:
    plan = _plan(topk_ids, lora_b.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).expand(h, lora_b, topk_ids, plan, out, True)


@_expand_inplace_op.register_fake
def _(out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend):
    return None


@torch.library.custom_op("molora::expand", mutates_args=())
def _expand_op(
    h: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
) -> Tensor:
    out = _new_output((h.shape[0], lora_b.shape[1]), lora_b.dtype, h.device)
    plan = _plan(topk_ids, lora_b.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).expand(h, lora_b, topk_ids, plan, out, False)
    return out


@_expand_op.register_fake
def _(h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend):
    return h.new_empty((h.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)


# ------------------------------------------------------------------------------------------ routed_lora
@torch.library.custom_op("molora::routed_lora_", mutates_args=("out",))
def _routed_lora_inplace_op(
    out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
) -> None:
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, True)


@_routed_lora_inplace_op.register_fake
def _(out, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend):
    return None


@torch.library.custom_op("molora::routed_lora", mutates_args=())
def _routed_lora_op(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
) -> Tensor:
    out = _new_output((x.shape[0], lora_b.shape[1]), x.dtype, x.device)
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, False)
    return out


@_routed_lora_op.register_fake
def _(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend):
    return x.new_empty((x.shape[0], lora_b.shape[1]))


# --------------------------------------------------------------------------------------- public wrappers
def _should_check_ids(validate: bool, tensor) -> bool:
    """Reading ids is a host sync on a GPU and impossible while tracing or capturing: skip it there."""
    if not validate or torch.compiler.is_compiling():
        return False
    on_cuda = isinstance(tensor, Tensor) and tensor.device.type == "cuda"
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


def _scale(scaling, num_adapters: int, x: Tensor) -> Tensor:
    """[N] float32 scaling (float64 only for float64 inputs, so h is float32 as the contract says)."""
    return scaling_vector(scaling, num_adapters, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)


def _plan_tensors(plan: Optional[RoutingPlan], topk_ids: Tensor, num_adapters: int):
    if plan is None:
        return None, None
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a molora_ops.RoutingPlan or None, got {type(plan).__name__}")
    plan.matches(topk_ids, num_adapters)
    return plan.sorted_pairs, plan.seg_offsets


def lora_shrink(x, lora_a, topk_ids, topk_weights, *, scaling=None, backend="auto", plan=None, validate=True):
    """Semantics: h[t, k] = topk_weights[t, k] * scaling[e] * (lora_a[e] @ x[t]),  e = topk_ids[t, k];
    zeros for empty slots (e == -1).

    Args:
        x: [T, H_in] float16 | bfloat16 | float32.
        lora_a: [N, R, H_in], x.dtype.
        topk_ids: [T, K] int32 | int64, each in [0, N) or -1.
        topk_weights: [T, K] floating.
        scaling: None (1.0) | float | [N] floating tensor.
        backend: "auto" | "torch" | "triton" | "cuda".
        plan: an optional RoutingPlan built from topk_ids, reused across calls.
        validate: check id values (a host sync on GPU); shapes, dtypes and devices are always checked.
    Returns:
        h: [T, K, R] float32.
    """
    check_shrink(x, lora_a, topk_ids, topk_weights, scaling, check_ids=_should_check_ids(validate, x))
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_a.shape[0])
    scale = _scale(scaling, lora_a.shape[0], x)
    name = _backends.resolve(backend, x.device)
    return _shrink_op(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, name)


def lora_expand(h, lora_b, topk_ids, *, out=None, backend="auto", plan=None, validate=True):
    """Semantics: out[t] (+)= sum_k lora_b[e] @ h[t, k],  e = topk_ids[t, k], non-empty slots only.

    Args:
        h: [T, K, R] float32 (the output of lora_shrink).
        lora_b: [N, H_out, R] float16 | bfloat16 | float32.
        topk_ids: [T, K], as for lora_shrink.
        out: None, or [T, H_out] of lora_b.dtype to add into in place (it is returned).
    Returns:
        [T, H_out] of lora_b.dtype; the sum is formed in float32 and rounded once.
    """
    check_expand(h, lora_b, topk_ids, out, check_ids=_should_check_ids(validate, h))
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_b.shape[0])
    name = _backends.resolve(backend, h.device)
    if out is None:
        return _expand_op(h, lora_b, topk_ids, sorted_pairs, seg_offsets, name)
    _expand_inplace_op(out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, name)
    return out


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=None, out=None, backend="auto", plan=None, validate=True
):
    """Routed multi-LoRA: a per-token, weighted top-k mixture of LoRA adapters.

    Semantics: out[t] (+)= sum_k topk_weights[t,k] * scaling[e] * lora_b[e] @ (lora_a[e] @ x[t]),
               e = topk_ids[t,k]; slots with e == -1 add nothing; accumulation is float32.

    Args:
        x: [T, H_in] float16 | bfloat16 | float32.
        lora_a: [N, R, H_in], x.dtype: PEFT lora_A.weight of N adapters, stacked (zero-padded to R).
        lora_b: [N, H_out, R], x.dtype: PEFT lora_B.weight, stacked.
        topk_ids: [T, K] int32 | int64, each in [0, N) or -1 for an empty slot.
        topk_weights: [T, K] floating router probabilities (need not sum to 1).
        scaling: None (1.0) | float | [N] floating tensor of per-adapter alpha / r.
        out: None, or [T, H_out] x.dtype: the delta is added into it in place and it is returned.
        backend: "auto" | "torch" | "triton" | "cuda".
        plan: an optional RoutingPlan for topk_ids, shared by every layer with the same routing.
        validate: check id values (a host sync on GPU); shapes, dtypes and devices are always checked.
    Returns:
        [T, H_out] x.dtype.
    """
    check_routed_lora(
        x, lora_a, lora_b, topk_ids, topk_weights, scaling, out, check_ids=_should_check_ids(validate, x)
    )
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_a.shape[0])
    scale = _scale(scaling, lora_a.shape[0], x)
    name = _backends.resolve(backend, x.device)
    args = (x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, name)
    if out is None:
        return _routed_lora_op(*args)
    _routed_lora_inplace_op(out, *args)
    return out

"""The public routed-LoRA ops and their torch.library registration.

The schemas are defined here, once, in Python, so the ops exist whether or not the CUDA extension was
built. Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it
without a graph break and ``torch.library.opcheck`` passes. The real implementation dispatches to the
backend named in the call; the Python wrappers below resolve "auto" before the op is called, so a
compiled graph records the concrete backend.

Ops (namespace ``molora``):
    shrink(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend, ranks?) -> h [T, K, R] f32
    expand(h, lora_b, topk_ids, sorted_pairs?, seg_offsets?, backend, base?, ranks?) -> [T, H_out]
    expand_(out!, h, lora_b, topk_ids, sorted_pairs?, seg_offsets?, backend, ranks?) -> ()
    routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend, base?,
        ranks?) -> [T, H_out]
    routed_lora_(out!, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend,
        ranks?) -> ()
    routed_lora_train(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs?, seg_offsets?, backend, base?,
        ranks?) -> (out [T, H_out], u [T, K, R] f32): routed_lora that also returns the unscaled shrink for its backward
    shrink_backward, expand_backward, routed_lora_backward: the gradients of the functional ops.
`scale` is the per-adapter scaling as a [N] float32 tensor; the plan tensors are optional (built from
topk_ids when absent). `base`, when given, is a [T, H_out] tensor the delta is added to (out of place,
rounded once): the result equals what the mutating form leaves in `out = base`, bit for bit.

Heterogeneous ranks: adapters of one layer are stored zero-padded to the largest rank R. `ranks`, when given, is
an int32 [N] tensor on the ids' device with 0 <= ranks[e] <= R: adapter e's rows lora_a[e, r] and columns
lora_b[e, :, r] for r >= ranks[e] are padding, and every backend bounds its rank loops by ranks[e] so that the
padding is neither read nor computed (a zero-rank adapter's slots add nothing and read no weight bytes). The
result equals the padded computation (the padding is zero); h[t, k, r] = 0 for r >= ranks[e], and the expand
never reads h[t, k, r] there. None means every adapter has rank R. The backward (one formula for every backend)
runs on the weights with their padding selected to zero, so its gradients are those of the bounded forward.

Autograd: shrink, expand, routed_lora and routed_lora_train have backward formulas w.r.t. x, lora_a, lora_b,
topk_weights, scale, h and base (none for ids and plan tensors), run as the ``*_backward`` ops (opaque to tracing,
so compiled graphs keep them; double backward is not supported). Each backward op takes the forward's backend and
dispatches on it (_backward_impl): the torch backend's grouped code (impl/torch_backward.py) for "torch", the
Triton kernels (kernels/routed_lora_backward.py) for "triton" and also for "cuda", which has no backward kernels of
its own. routed_lora recomputes the rank-space u = A x in its backward; routed_lora_train returns u as a second,
non-differentiable output that its backward reads instead (the trade-off is in its docstring). The mutating ops
have no backward: the wrappers use them only when nothing needs a gradient, and take
``out.copy_(op(..., base=out))`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import impl as _backends
from .impl import torch_backward as _torch_backward
from ._validation import (
    can_read_ids, check_autograd_out, check_expand, check_routed_lora, check_shrink, scaling_vector,
)
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


def _output(base: Optional[Tensor], shape, dtype, device) -> tuple[Tensor, bool]:
    """(the tensor a functional op writes, whether the backend accumulates into it): a contiguous copy of
    `base` to add into, or a fresh output to overwrite."""
    if base is None:
        return _new_output(shape, dtype, device), False
    return base.clone(memory_format=torch.contiguous_format), True


def _grads_or_empty(grads, likes) -> tuple:
    """A backward op's outputs: each gradient, or an empty [0] tensor in place of one that was not needed
    (an op cannot return None)."""
    return tuple(like.new_empty(0) if g is None else g for g, like in zip(grads, likes))


def _fake_grads(needs, likes) -> tuple:
    return tuple(like.new_empty(like.shape if need else (0,)) for need, like in zip(needs, likes))


def _needed(grads, needs) -> tuple:
    """Map a backward op's outputs back to autograd's convention: None for inputs that need no gradient."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def _backward_impl(backend: str):
    """The module whose shrink/expand/routed_lora_backward functions run the backward of a call made with
    `backend`: impl/torch_backward.py for "torch"; the Triton kernels (kernels/routed_lora_backward.py, through
    impl/triton_backend.py) for "triton", and for "cuda" too, whose extension has no backward kernels (the torch
    code when triton cannot run)."""
    if backend == "torch" or (backend == "cuda" and not _backends.backends()["triton"]["available"]):
        return _torch_backward
    return _backends.get("triton")


def _padding_zeroed(w: Tensor, ranks: Optional[Tensor], dim: int) -> Tensor:
    """The stacked weights w ([N, R, H_in] with dim 1, or [N, H_out, R] with dim 2) with each adapter's padding
    (index >= ranks[e] along `dim`) selected to 0 (a non-finite padding value does not survive); w when ranks is
    None. The backward runs on these, so its gradients are those of the rank-bounded forward."""
    if ranks is None:
        return w
    r = torch.arange(w.shape[dim], device=w.device)
    keep = (r < ranks.view(-1, 1).to(r.dtype)).unsqueeze(2 if dim == 1 else 1)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _within_ranks(h: Tensor, topk_ids: Tensor, ranks: Optional[Tensor]) -> Tensor:
    """h [T, K, R] with h[t, k, r] selected to 0 for r >= ranks[topk_ids[t, k]] (ids outside [0, N): all of the
    row); h when ranks is None."""
    if ranks is None:
        return h
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < ranks.shape[0])
    bound = torch.where(valid, ranks.long()[torch.where(valid, ids, 0)], 0)
    keep = torch.arange(h.shape[2], device=h.device) < bound.unsqueeze(2)
    return torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))


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
    ranks: Optional[Tensor] = None,
) -> Tensor:
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    return _backends.get(backend).shrink(x, lora_a, topk_ids, topk_weights, scale, plan, ranks)


@_shrink_op.register_fake
def _(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, ranks=None):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], topk_ids.shape[1], lora_a.shape[1]), dtype=dtype)


@torch.library.custom_op("molora::shrink_backward", mutates_args=())
def _shrink_backward_op(
    grad_h: Tensor,
    x: Tensor,
    lora_a: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dw, ds) for `needs` = which of (x, lora_a, topk_weights, scale) need one; [0] where not.
    `backend`: the forward's backend (see _backward_impl)."""
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    grads = _backward_impl(backend).shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, plan, needs)
    return _grads_or_empty(grads, (x, lora_a, topk_weights, scale))


@_shrink_backward_op.register_fake
def _(grad_h, x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, needs):
    return _fake_grads(needs, (x, lora_a, topk_weights, scale))


def _shrink_setup_context(ctx, inputs, output):
    x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, ranks = inputs
    ctx.save_for_backward(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ranks)
    ctx.backend = backend


def _shrink_backward(ctx, grad_h):
    x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ranks = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[3], n[4])
    grad_h = _within_ranks(grad_h, topk_ids, ranks)
    grads = _shrink_backward_op(
        grad_h, x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ctx.backend, needs
    )
    dx, da, dw, ds = _needed(grads, needs)
    return dx, da, None, dw, ds, None, None, None, None


_shrink_op.register_autograd(_shrink_backward, setup_context=_shrink_setup_context)


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
    ranks: Optional[Tensor] = None,
) -> None:
    plan = _plan(topk_ids, lora_b.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).expand(h, lora_b, topk_ids, plan, out, True, ranks)


@_expand_inplace_op.register_fake
def _(out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend, ranks=None):
    return None


@torch.library.custom_op("molora::expand", mutates_args=())
def _expand_op(
    h: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
    base: Optional[Tensor],
    ranks: Optional[Tensor] = None,
) -> Tensor:
    out, accumulate = _output(base, (h.shape[0], lora_b.shape[1]), lora_b.dtype, h.device)
    plan = _plan(topk_ids, lora_b.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).expand(h, lora_b, topk_ids, plan, out, accumulate, ranks)
    return out


@_expand_op.register_fake
def _(h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend, base, ranks=None):
    return h.new_empty((h.shape[0], lora_b.shape[1]), dtype=lora_b.dtype)


@torch.library.custom_op("molora::expand_backward", mutates_args=())
def _expand_backward_op(
    grad_out: Tensor,
    h: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """(dh, dB) for `needs` = which of (h, lora_b) need one; [0] where not."""
    plan = _plan(topk_ids, lora_b.shape[0], sorted_pairs, seg_offsets)
    grads = _backward_impl(backend).expand_backward(grad_out, h, lora_b, topk_ids, plan, needs)
    return _grads_or_empty(grads, (h, lora_b))


@_expand_backward_op.register_fake
def _(grad_out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend, needs):
    return _fake_grads(needs, (h, lora_b))


def _expand_setup_context(ctx, inputs, output):
    h, lora_b, topk_ids, sorted_pairs, seg_offsets, backend, _base, ranks = inputs
    ctx.save_for_backward(h, lora_b, topk_ids, sorted_pairs, seg_offsets, ranks)
    ctx.backend = backend


def _expand_backward(ctx, grad_out):
    h, lora_b, topk_ids, sorted_pairs, seg_offsets, ranks = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1])
    h, lora_b = _within_ranks(h, topk_ids, ranks), _padding_zeroed(lora_b, ranks, 2)
    dh, db = _needed(_expand_backward_op(grad_out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, ctx.backend, needs), needs)
    return dh, db, None, None, None, None, grad_out if n[6] else None, None


_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)


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
    ranks: Optional[Tensor] = None,
) -> None:
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, True, ranks)


@_routed_lora_inplace_op.register_fake
def _(out, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, ranks=None):
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
    base: Optional[Tensor],
    ranks: Optional[Tensor] = None,
) -> Tensor:
    out, accumulate = _output(base, (x.shape[0], lora_b.shape[1]), x.dtype, x.device)
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    _backends.get(backend).routed_lora(
        x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, accumulate, ranks
    )
    return out


@_routed_lora_op.register_fake
def _(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, base, ranks=None):
    return x.new_empty((x.shape[0], lora_b.shape[1]))


@torch.library.custom_op("molora::routed_lora_backward", mutates_args=())
def _routed_lora_backward_op(
    grad_out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    u: Optional[Tensor],
    backend: str,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dw, ds) for `needs` = which of (x, lora_a, lora_b, topk_weights, scale) need one;
    [0] where not. `u`: the forward's unscaled shrink [T, K, R] (routed_lora_train), or None to recompute it."""
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    grads = _backward_impl(backend).routed_lora_backward(
        grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, needs, u
    )
    return _grads_or_empty(grads, (x, lora_a, lora_b, topk_weights, scale))


@_routed_lora_backward_op.register_fake
def _(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, u, backend, needs):
    return _fake_grads(needs, (x, lora_a, lora_b, topk_weights, scale))


def _routed_lora_setup_context(ctx, inputs, output):
    x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, _base, ranks = inputs
    u = output[1] if isinstance(output, tuple) else None  # routed_lora_train saves its u
    if u is not None:
        ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ranks, u)
    ctx.backend = backend


def _routed_lora_backward(ctx, grad_out, _grad_u=None):
    x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ranks, u = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[4], n[5])
    lora_a, lora_b = _padding_zeroed(lora_a, ranks, 1), _padding_zeroed(lora_b, ranks, 2)
    grads = _routed_lora_backward_op(
        grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, u, ctx.backend, needs
    )
    dx, da, db, dw, ds = _needed(grads, needs)
    return dx, da, db, None, dw, ds, None, None, None, grad_out if n[9] else None, None


_routed_lora_op.register_autograd(_routed_lora_backward, setup_context=_routed_lora_setup_context)


def _slot_coefficients(topk_ids: Tensor, topk_weights: Tensor, scale: Tensor) -> Tensor:
    """[T, K, 1] w[t, k] * scale[e] in scale's dtype, selected to 0 where e is outside [0, N)."""
    valid = (topk_ids >= 0) & (topk_ids < scale.shape[0])
    coef = topk_weights.to(scale.dtype) * scale[torch.where(valid, topk_ids, 0).long()]
    return torch.where(valid, coef, torch.zeros((), dtype=scale.dtype, device=scale.device)).unsqueeze(2)


@torch.library.custom_op("molora::routed_lora_train", mutates_args=())
def _routed_lora_train_op(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    scale: Tensor,
    sorted_pairs: Optional[Tensor],
    seg_offsets: Optional[Tensor],
    backend: str,
    base: Optional[Tensor],
    ranks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """routed_lora for training: (out, exactly routed_lora's semantics; u [T, K, R] = lora_a[e] @ x[t] unscaled,
    float32, zeros in empty slots and beyond ranks[e]). Its backward reads u instead of recomputing it.

    The choice (saved, not recomputed): u costs T * K * R * 4 bytes per call kept for the backward (64 KiB for
    1024 tokens, top-2, R = 8), and saves the backward one GEMM of M x R x H_in per adapter segment, the shrink,
    which dB, dw and ds need (for router training with frozen adapters, dw alone: half the backward's GEMMs).
    u is saved unscaled because dw = s * (u . dh) would need h / w, undefined where a weight is 0. The forward
    runs the backend's routed_lora_train where it has one (torch: the grouped pass of routed_lora, keeping u),
    else its shrink (unit weights and scale) and expand (h = c * u formed between them), never the fused decode
    kernel, which keeps no h. `u` is an output for saving only: it is not differentiable."""
    plan = _plan(topk_ids, lora_a.shape[0], sorted_pairs, seg_offsets)
    impl = _backends.get(backend)
    out, accumulate = _output(base, (x.shape[0], lora_b.shape[1]), x.dtype, x.device)
    if hasattr(impl, "routed_lora_train"):  # the torch backend: one pass that also keeps u
        return out, impl.routed_lora_train(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, accumulate, ranks)
    ones_w = torch.ones(topk_weights.shape, dtype=torch.float32, device=x.device)
    u = impl.shrink(x, lora_a, topk_ids, ones_w, torch.ones_like(scale), plan, ranks)
    h = u * _slot_coefficients(topk_ids, topk_weights, scale).to(u.dtype)
    impl.expand(h, lora_b, topk_ids, plan, out, accumulate, ranks)
    return out, u


@_routed_lora_train_op.register_fake
def _(x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, backend, base, ranks=None):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], lora_b.shape[1])), x.new_empty((x.shape[0], topk_ids.shape[1], lora_a.shape[1]), dtype=dtype)


_routed_lora_train_op.register_autograd(_routed_lora_backward, setup_context=_routed_lora_setup_context)


# --------------------------------------------------------------------------------------- public wrappers
def _out_needs_autograd(out: Tensor, *inputs) -> bool:
    """Whether an `out=` call must go through autograd: grad mode is on and `out` or an input requires grad.
    Then the add is out-of-place (the functional op with base=out) and copied into `out`, which autograd
    tracks; otherwise the mutating op adds in place. Raises ValueError for an `out` autograd cannot write."""
    if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) and t.requires_grad for t in (out, *inputs)):
        return False
    check_autograd_out(out, "pass out=None and add the returned delta, or write into a non-leaf (e.g. the output of "
                            "the base layer)")
    return True


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


def lora_shrink(
    x, lora_a, topk_ids, topk_weights, *, scaling=None, ranks=None, backend="auto", plan=None, validate=True
):
    """Semantics: h[t, k] = topk_weights[t, k] * scaling[e] * (lora_a[e] @ x[t]),  e = topk_ids[t, k];
    zeros for empty slots (e == -1) and for h[t, k, r >= ranks[e]].

    Args:
        x: [T, H_in] float16 | bfloat16 | float32.
        lora_a: [N, R, H_in], x.dtype.
        topk_ids: [T, K] int32 | int64, each in [0, N) or -1.
        topk_weights: [T, K] floating.
        scaling: None (1.0) | float | [N] floating tensor.
        ranks: None (every adapter has rank R) | [N] int32 tensor of real ranks in [0, R] (see the module docstring).
        backend: "auto" | "torch" | "triton" | "cuda".
        plan: an optional RoutingPlan built from topk_ids, reused across calls.
        validate: check id and rank values (a host sync on GPU); shapes, dtypes and devices are always checked.
    Returns:
        h: [T, K, R] float32.
    """
    check_shrink(x, lora_a, topk_ids, topk_weights, scaling, ranks=ranks, check_ids=can_read_ids(validate, x))
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_a.shape[0])
    scale = _scale(scaling, lora_a.shape[0], x)
    name = _backends.resolve(backend, x.device)
    return _shrink_op(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, name, ranks)


def lora_expand(h, lora_b, topk_ids, *, out=None, ranks=None, backend="auto", plan=None, validate=True):
    """Semantics: out[t] (+)= sum_k lora_b[e, :, :ranks[e]] @ h[t, k, :ranks[e]],  e = topk_ids[t, k], non-empty
    slots only.

    Args:
        h: [T, K, R] float32 (the output of lora_shrink).
        lora_b: [N, H_out, R] float16 | bfloat16 | float32.
        topk_ids: [T, K], as for lora_shrink.
        out: None, or [T, H_out] of lora_b.dtype to add into in place (it is returned).
        ranks: None | [N] int32 real ranks, as for lora_shrink.
    Returns:
        [T, H_out] of lora_b.dtype; the sum is formed in float32 and rounded once.

    Differentiable w.r.t. h and lora_b, also with `out` (see routed_lora for how out= behaves under autograd).
    """
    check_expand(h, lora_b, topk_ids, out, ranks=ranks, check_ids=can_read_ids(validate, h))
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_b.shape[0])
    name = _backends.resolve(backend, h.device)
    args = (h, lora_b, topk_ids, sorted_pairs, seg_offsets, name)
    if out is None:
        return _expand_op(*args, None, ranks)
    if _out_needs_autograd(out, h, lora_b):
        return out.copy_(_expand_op(*args, out, ranks))
    _expand_inplace_op(out, *args, ranks)
    return out


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=None, out=None, ranks=None, backend="auto", plan=None,
    validate=True,
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
        ranks: None (every adapter has rank R) | [N] int32 tensor of real ranks in [0, R]: loops are bounded by
            them and the padding is never read (see the module docstring).
        backend: "auto" | "torch" | "triton" | "cuda".
        plan: an optional RoutingPlan for topk_ids, shared by every layer with the same routing.
        validate: check id and rank values (a host sync on GPU); shapes, dtypes and devices are always checked.
    Returns:
        [T, H_out] x.dtype.

    Autograd: differentiable w.r.t. x, lora_a, lora_b, topk_weights, a tensor `scaling` and `out`; when a
    gradient is needed the forward saves the unscaled shrink u [T, K, R] float32 (routed_lora_train) so that the
    backward does not recompute it. With `out`,
    when grad mode is on and any of these requires grad, the delta is added out of place (rounded once, the
    same bits as the in-place add) and copied into `out` as a tracked in-place op; `out` must then not be a
    leaf that requires grad (ValueError). Otherwise the add is in place in the kernel, outside autograd.
    """
    check_routed_lora(
        x, lora_a, lora_b, topk_ids, topk_weights, scaling, out, ranks=ranks, check_ids=can_read_ids(validate, x)
    )
    sorted_pairs, seg_offsets = _plan_tensors(plan, topk_ids, lora_a.shape[0])
    scale = _scale(scaling, lora_a.shape[0], x)
    name = _backends.resolve(backend, x.device)
    args = (x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, name)
    if out is None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b, topk_weights, scale)):
            return _routed_lora_train_op(*args, None, ranks)[0]  # saves u = A x for the backward
        return _routed_lora_op(*args, None, ranks)
    if _out_needs_autograd(out, x, lora_a, lora_b, topk_weights, scaling):
        return out.copy_(_routed_lora_train_op(*args, out, ranks)[0])
    _routed_lora_inplace_op(out, *args, ranks)
    return out

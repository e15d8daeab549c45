"""Triton backward of the routed-LoRA ops: segment reductions for dA and dB, the forward's kernels for the rest.

Notation as in molora_ops/impl/torch_backward.py (pair p = t * K + k routed to adapter e, c = w[t, k] * s[e]):
    u[p] = A[e] x[t],  g[p] = B[e]^T dy[t],  du[p] = c * g[p],  h[p] = c * u[p]
    dx[t] = sum_k A[e]^T du[p]           dA[e] = sum_{p in e} du[p] x[t]^T
    dB[e] = sum_{p in e} dy[t] h[p]^T    dw[t, k] = s[e] (u[p] . g[p]),  ds[e] = sum_{p in e} w[t, k] (u[p] . g[p])

How each term is computed, all in float32, every result rounded once into its input's dtype:
  * u and g: the forward's adapter-segmented shrink (routed_lora._shrink_kernel) without the coefficient;
    g is a shrink of dy against B transposed (a strided view, no copy). SPLIT_K is 1 here (no partials).
  * du, h, dw and the per-pair ds terms: element-wise torch ops over [P, R] (small, deterministic).
  * dx: the forward's adapter-grouped expand (routed_lora.launch_expand_grouped) of du against A transposed:
    deterministic (per-pair partials summed over k in slot order), every element written once.
  * dA and dB: _segment_outer_kernel, one program per (adapter, rank tile, column tile) output tile, walking
    its adapter's segment of the plan in order: deterministic, no atomics, every element written once
    (adapters with no pairs get zeros). Its parallelism is N x tiles, and a program's loop is as long as its
    segment; with skewed routing (one adapter holding most pairs) ``atomic=True`` splits each segment into
    SPLIT_M parts whose float32 partial tiles are added with atomics into a zeroed buffer: faster there, not
    deterministic (the triton backend's ``settings.atomic_backward`` / MOLORA_TRITON_ATOMIC_BACKWARD=1).
  * ds: _segment_sum_kernel, one program per adapter summing its pairs in plan order.
The plan is checked, not trusted, as in the forward: a pair counts only where it is listed in the segment of
its own adapter topk_ids[t, k]; rows of pairs that are not start at zero.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import cdiv, expand_grouped_config, next_pow2, shrink_config
from .routed_lora import _dot_f32_rows, _segment_bounds, _segment_pairs, launch_expand_grouped, launch_shrink

Tensor = torch.Tensor

SEGMENT_SPLIT_M = 8  # segment parts per adapter under atomic=True


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _segment_outer_kernel(
    # pointers
    rows_ptr, act_ptr, ids_ptr, sorted_pairs_ptr, seg_offsets_ptr, out_ptr,
    # sizes
    num_pairs, top_k, rank, width, num_adapters,
    # strides
    stride_rp, stride_rr,
    stride_at, stride_ah,
    stride_idt, stride_idk,
    stride_oe, stride_or, stride_oh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT_M: tl.constexpr,
    USE_ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Semantics: out[e, r, h] = sum_{p in segment e, ids[t, k] == e} rows[p, r] * act[t, h],  t = p // K,
    with rows [P, R] float32 (rank space) and act [T, width] (x or dy). Pairs are summed in plan order.
    Grid: (N, cdiv(R, BLOCK_R) * cdiv(width, BLOCK_H), SPLIT_M). SPLIT_M = 1: every element of out written
    once (zeros for empty segments), deterministic. USE_ATOMIC: part pid(2) of each segment is added into a
    zeroed float32 out with atomics. Segment bounds are clamped to [0, P] and pairs outside [0, P) skipped."""
    e = tl.program_id(0)
    pid_rh = tl.program_id(1)
    pid_s = tl.program_id(2)
    tiles_h = tl.cdiv(width, BLOCK_H)
    pid_r = pid_rh // tiles_h
    pid_h = pid_rh - pid_r * tiles_h

    seg_start, seg_end = _segment_bounds(seg_offsets_ptr, e, num_pairs)
    per_split = tl.cdiv(seg_end - seg_start, SPLIT_M)
    lo = seg_start + pid_s * per_split
    hi = tl.minimum(lo + per_split, seg_end)

    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = offs_r < rank
    offs_h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask_h = offs_h < width
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        pairs, tokens, _, keep = _segment_pairs(sorted_pairs_ptr, ids_ptr, m0 + tl.arange(0, BLOCK_M), hi, e,
                                                num_pairs, top_k, stride_idt, stride_idk)
        rv = tl.load(rows_ptr + pairs[:, None] * stride_rp + offs_r[None, :] * stride_rr,
                     mask=keep[:, None] & mask_r[None, :], other=0.0)
        av = tl.load(act_ptr + tokens[:, None] * stride_at + offs_h[None, :] * stride_ah,
                     mask=keep[:, None] & mask_h[None, :], other=0.0)
        acc = _dot_f32_rows(tl.trans(rv.to(tl.float32)), av, acc, UPCAST)

    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_r[:, None] * stride_or + offs_h[None, :] * stride_oh
    mask = mask_r[:, None] & mask_h[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(
    # pointers
    vals_ptr, ids_ptr, sorted_pairs_ptr, seg_offsets_ptr, out_ptr,
    # sizes
    num_pairs, top_k,
    # strides
    stride_idt, stride_idk,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    """Semantics: out[e] = sum_{p in segment e, ids[t, k] == e} vals[p] (vals [P] float32, contiguous),
    summed in fixed BLOCK_M chunks of the plan order. Grid: (N,); every element of out written once."""
    e = tl.program_id(0)
    seg_start, seg_end = _segment_bounds(seg_offsets_ptr, e, num_pairs)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        pairs, _, _, keep = _segment_pairs(sorted_pairs_ptr, ids_ptr, m0 + tl.arange(0, BLOCK_M), seg_end, e,
                                           num_pairs, top_k, stride_idt, stride_idk)
        acc += tl.load(vals_ptr + pairs, mask=keep, other=0.0)
    tl.store(out_ptr + e, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- launchers
def _outer_config(rank: int, width: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H, num_warps) for _segment_outer_kernel; tl.dot needs every dim >= 16."""
    block_r = min(max(next_pow2(rank), 16), 64)
    block_h = min(max(next_pow2(width), 16), 128)
    return 32, block_r, block_h, 4 if block_r * block_h <= 64 * 64 else 8


def launch_segment_outer(rows, act, topk_ids, sorted_pairs, seg_offsets, out, *, upcast: bool, atomic: bool) -> None:
    """out[e] = sum over adapter e's pairs of rows[p]^T-outer act[t]: rows [P, R] float32, act [T, W],
    out an [N, R, W] view (any strides; float32 and zeroed when atomic)."""
    num_adapters, rank, width = out.shape
    block_m, block_r, block_h, num_warps = _outer_config(rank, width)
    split = SEGMENT_SPLIT_M if atomic else 1
    grid = (num_adapters, cdiv(rank, block_r) * cdiv(width, block_h), split)
    _segment_outer_kernel[grid](
        rows, act, topk_ids, sorted_pairs, seg_offsets, out,
        rows.shape[0], topk_ids.shape[1], rank, width, num_adapters,
        rows.stride(0), rows.stride(1),
        act.stride(0), act.stride(1),
        topk_ids.stride(0), topk_ids.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h, SPLIT_M=split, USE_ATOMIC=atomic, UPCAST=upcast,
        num_warps=num_warps,
    )


def launch_segment_sum(vals, topk_ids, sorted_pairs, seg_offsets, out) -> None:
    """out [N] = per-adapter sums of vals [P] float32 (contiguous) over the plan's segments."""
    _segment_sum_kernel[(out.shape[0],)](
        vals, topk_ids, sorted_pairs, seg_offsets, out,
        vals.shape[0], topk_ids.shape[1],
        topk_ids.stride(0), topk_ids.stride(1),
        BLOCK_M=128,
    )


# ------------------------------------------------------------------------------------------ composition
def _raw_shrink(act, weights_t, topk_ids, sorted_pairs, seg_offsets, *, upcast: bool) -> Tensor:
    """[P, R] float32: row p = weights_t[e] @ act[t] for routed pairs, zeros elsewhere; weights_t [N, R, W]
    (any strides). The forward's shrink kernel without the coefficient, SPLIT_K = 1."""
    num_pairs, num_adapters, rank, width = sorted_pairs.shape[0], weights_t.shape[0], weights_t.shape[1], act.shape[1]
    out = torch.zeros(num_pairs, rank, dtype=torch.float32, device=act.device)
    elem_bytes = 4 if upcast else 2
    cfg = shrink_config(num_pairs, num_adapters, rank, width, elem_bytes).with_split(1, width)
    ones = torch.ones((), dtype=torch.float32, device=act.device).expand(topk_ids.shape)  # never read
    launch_shrink(act, weights_t, topk_ids, ones, ones[0], sorted_pairs, seg_offsets, out, top_k=topk_ids.shape[1],
                  cfg=cfg, apply_coef=False, use_atomic=False, upcast=upcast)
    return out


class _Coefficients:
    """Per-pair routing terms [P] float32: valid (0 <= id < N), w, s[e] and c = w * s[e] (0 where not valid)."""

    def __init__(self, topk_ids: Tensor, topk_weights: Tensor, scale: Tensor):
        ids = topk_ids.reshape(-1)
        self.valid = (ids >= 0) & (ids < scale.shape[0])
        zero = torch.zeros((), dtype=torch.float32, device=ids.device)
        self.w = torch.where(self.valid, topk_weights.reshape(-1).float(), zero)
        self.s = torch.where(self.valid, scale.float()[torch.where(self.valid, ids, 0).long()], zero)
        self.c = self.w * self.s

    def weight_grads(self, u: Tensor, g: Tensor, topk_weights: Tensor, scale: Tensor, needs_w: bool, needs_s: bool,
                     segment_sum) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(dw [T, K], ds [N]) from u and g [P, R]: dw = s (u . g), ds[e] = sum w (u . g); None where not needed."""
        dot = (u * g).sum(dim=1)
        dw = torch.where(self.valid, self.s * dot, 0.0).view(topk_weights.shape).to(topk_weights.dtype) if needs_w else None
        ds = None
        if needs_s:
            ds = torch.empty(scale.shape, dtype=torch.float32, device=u.device)
            segment_sum(torch.where(self.valid, self.w * dot, 0.0).contiguous(), ds)
            ds = ds.to(scale.dtype)
        return dw, ds


def _dx(du: Tensor, lora_a: Tensor, topk_ids, sorted_pairs, seg_offsets, x: Tensor, upcast: bool) -> Tensor:
    """dx [T, H_in] in x.dtype: the grouped expand of du [P, R] against A^T [N, H_in, R]."""
    num_tokens, top_k = topk_ids.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cfg = expand_grouped_config(num_tokens * top_k, lora_a.shape[1], x.shape[1])
    launch_expand_grouped(du.view(num_tokens, top_k, -1), lora_a.transpose(1, 2), topk_ids, sorted_pairs, seg_offsets,
                          dx, cfg=cfg, accumulate=False, upcast=upcast)
    return dx


def _outer(rows, act, topk_ids, sorted_pairs, seg_offsets, shape, dtype, transpose: bool, upcast, atomic) -> Tensor:
    """An [N, R, W] segment reduction (see launch_segment_outer) stored as `shape` ([N, R, W], or [N, W, R] when
    transpose) in `dtype`."""
    out = torch.zeros(shape, dtype=torch.float32, device=act.device) if atomic else torch.empty(shape, dtype=dtype, device=act.device)
    view = out.transpose(1, 2) if transpose else out
    launch_segment_outer(rows, act, topk_ids, sorted_pairs, seg_offsets, view, upcast=upcast, atomic=atomic)
    return out.to(dtype)


def shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, needs, *,
                    upcast: bool, atomic: bool):
    """(dx, dA, dw, ds) of h = shrink(...) given grad_h [T, K, R]; None where `needs` says not needed.
    u is recomputed (one shrink launch) only for dw or ds."""
    need_x, need_a, need_w, need_s = needs
    coef = _Coefficients(topk_ids, topk_weights, scale)
    g = torch.where(coef.valid[:, None], grad_h.reshape(-1, grad_h.shape[-1]).float(), 0.0)
    plan = (topk_ids, sorted_pairs, seg_offsets)
    du = g * coef.c[:, None]
    dx = _dx(du, lora_a, *plan, x, upcast) if need_x else None
    da = _outer(du, x, *plan, lora_a.shape, lora_a.dtype, False, upcast, atomic) if need_a else None
    dw = ds = None
    if need_w or need_s:
        u = _raw_shrink(x, lora_a, *plan, upcast=upcast)
        dw, ds = coef.weight_grads(u, g, topk_weights, scale, need_w, need_s,
                                   lambda v, out: launch_segment_sum(v, *plan, out))
    return dx, da, dw, ds


def expand_backward(grad_out, h, lora_b, topk_ids, sorted_pairs, seg_offsets, needs, *, upcast: bool, atomic: bool):
    """(dh [T, K, R] in h.dtype, zeros in empty slots; dB [N, H_out, R]) of y = expand(h, lora_b, ...) given
    grad_out [T, H_out]; None where `needs` says not needed."""
    need_h, need_b = needs
    plan = (topk_ids, sorted_pairs, seg_offsets)
    dh = _raw_shrink(grad_out, lora_b.transpose(1, 2), *plan, upcast=upcast).view(h.shape).to(h.dtype) if need_h else None
    db = None
    if need_b:
        rows = h.reshape(-1, h.shape[-1]).float()
        db = _outer(rows, grad_out, *plan, lora_b.shape, lora_b.dtype, True, upcast, atomic)
    return dh, db


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets,
                         needs, u_saved: Optional[Tensor] = None, *, upcast: bool, atomic: bool):
    """(dx, dA, dB, dw, ds) of y = routed_lora(...) given grad_out [T, H_out]; None where `needs` says not
    needed. u_saved: the forward's unscaled u [T, K, R] float32, or None to recompute it (one shrink launch)
    where dB, dw or ds needs it."""
    need_x, need_a, need_b, need_w, need_s = needs
    plan = (topk_ids, sorted_pairs, seg_offsets)
    coef = _Coefficients(topk_ids, topk_weights, scale)
    u = None
    if need_b or need_w or need_s:
        u = _raw_shrink(x, lora_a, *plan, upcast=upcast) if u_saved is None else u_saved.reshape(-1, lora_a.shape[1]).float()
    db = _outer(u * coef.c[:, None], grad_out, *plan, lora_b.shape, lora_b.dtype, True, upcast, atomic) if need_b else None
    dx = da = dw = ds = None
    if need_x or need_a or need_w or need_s:
        g = _raw_shrink(grad_out, lora_b.transpose(1, 2), *plan, upcast=upcast)
        du = g * coef.c[:, None]
        dx = _dx(du, lora_a, *plan, x, upcast) if need_x else None
        da = _outer(du, x, *plan, lora_a.shape, lora_a.dtype, False, upcast, atomic) if need_a else None
        if need_w or need_s:
            dw, ds = coef.weight_grads(u, g, topk_weights, scale, need_w, need_s,
                                       lambda v, out: launch_segment_sum(v, *plan, out))
    return dx, da, db, dw, ds

"""The torch backward of the three ops: grouped by adapter, one GEMM per adapter segment per gradient.

Notation (pair p = t * K + k routed to adapter e, c = w[t, k] * s[e]):
    u[p] = A[e] x[t]  (the unscaled shrink, [R]),  h[p] = c * u[p],  y[t] = sum_k B[e] h[p]
    dh[p] = B[e]^T dy[t]                  dB[e] = sum_{p in e} dy[t] h[p]^T
    dx[t] = sum_k c * A[e]^T dh[p]        dA[e] = sum_{p in e} c * dh[p] x[t]^T
    dw[t, k] = s[e] * (u[p] . dh[p])      ds[e] = sum_{p in e} w[t, k] * (u[p] . dh[p])
Empty slots (-1) belong to no segment: they add nothing and their weight gradient is zero.

Layout: the routed pairs as adapter-sorted rows (impl/pair_rows.py, shared with the torch forward): x and dy are
gathered once each (one index_select), every per-adapter product is one grouped GEMM over all rows (dh, dA, dB,
the dx rows), the element-wise terms (c, u . dh, the scaled du) are computed once for all rows, and dx is one
index_add_ of the rows into the tokens; on CPU it is sequential, hence deterministic (on CUDA tensors it uses
atomics: use the triton backend's backward there). dA, dB, dw and ds are written, never accumulated across
segments. All arithmetic is float32 (float64 for float64 inputs), whatever the input dtype; each gradient is
rounded once into its input's dtype.

Reading the plan's offsets is a host sync on a GPU, as for the torch forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import RoutingPlan
from . import compute_dtype, cpu_train
from .pair_rows import PairRows

Tensor = torch.Tensor


def _outer_b(rows: PairRows, dys: Tensor, hs: Tensor, lora_b: Tensor) -> Tensor:
    """dB [N, H_out, R] in lora_b.dtype: dB[e] = sum_{p in e} dy[p] h[p]^T. Formed as h^T dy ([N, R, H_out], the
    same shape as dA's, faster on CPU than dy^T h) and transposed once."""
    return rows.outer(hs, dys).transpose(1, 2).contiguous().to(lora_b.dtype)


def _unscaled_u(rows: PairRows, xs: Optional[Tensor], lora_a: Tensor, u_saved: Optional[Tensor], cd) -> Tensor:
    """u [P_r, R] in row order: rows of the saved u when given, else one grouped GEMM."""
    if u_saved is not None:
        return rows.gather_pairs(u_saved.reshape(-1, u_saved.shape[-1]), cd)
    return rows.mm(xs, lora_a.to(cd).transpose(1, 2))


def _shrink_side(rows, xs, dh, u, coef, x, lora_a, topk_weights, scale, needs, cd):
    """(dx, dA, dw, ds) given dh [P_r, R] in row order, coef = rows.coefficients(...) (u [P_r, R] only needed for
    dw and ds). The dx rows are written into xs where it was gathered, dead once dA is formed (no fresh
    [P_r, H_in] buffer)."""
    need_x, need_a, need_w, need_s = needs
    w, s = coef
    dx = da = dw = ds = None
    if need_x or need_a:
        du = dh * (w * s)[:, None]
        if need_a:
            da = rows.outer(du, xs)
        if need_x:
            dx = rows.scatter_add_(torch.zeros(x.shape, dtype=cd, device=x.device), rows.mm(du, lora_a.to(cd), out=xs))
    if need_w or need_s:
        u_dot_dh = (u * dh).sum(dim=1)
        if need_w:
            dw = rows.to_pairs((s * u_dot_dh)[:, None], topk_weights.numel()).view(topk_weights.shape)
        if need_s:
            ds = torch.zeros(scale.shape, dtype=cd, device=x.device).index_add_(0, rows.adapter, w * u_dot_dh)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip((dx, da, dw, ds), (x, lora_a, topk_weights, scale)))


def shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, needs):
    """Gradients of h = shrink(x, lora_a, topk_ids, topk_weights, scale) given grad_h [T, K, R].

    needs: four bools for (x, lora_a, topk_weights, scale). Returns (dx [T, H_in], dA [N, R, H_in], dw [T, K],
    ds [N]) in their inputs' dtypes, None where not needed. u = A x is recomputed (one grouped GEMM) only when
    dw or ds is needed: the op's output is the scaled h, and u = h / c fails where a weight is 0.
    """
    if cpu_train.usable(x):  # CPU tensors with the C++ kernels loaded
        return cpu_train.shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, needs)
    del topk_ids  # the plan lists the routed pairs
    cd = compute_dtype(x, scale, grad_h)
    rows = PairRows(plan)
    xs = rows.gather(x, cd) if (needs[1] or needs[2] or needs[3]) else None
    dh = rows.gather_pairs(grad_h.reshape(-1, grad_h.shape[-1]), cd)
    u = _unscaled_u(rows, xs, lora_a, None, cd) if needs[2] or needs[3] else None
    coef = rows.coefficients(topk_weights, scale, cd)
    return _shrink_side(rows, xs, dh, u, coef, x, lora_a, topk_weights, scale, needs, cd)


def expand_backward(grad_out, h, lora_b, topk_ids, plan: RoutingPlan, needs):
    """Gradients of y = expand(h, lora_b, topk_ids) given grad_out [T, H_out].

    needs: two bools for (h, lora_b). Returns (dh [T, K, R] in h.dtype, zeros in empty slots; dB [N, H_out, R]
    in lora_b.dtype), None where not needed.
    """
    if cpu_train.usable(h):
        return cpu_train.expand_backward(grad_out, h, lora_b, topk_ids, needs)
    del topk_ids
    need_h, need_b = needs
    cd = compute_dtype(h, lora_b)
    rows = PairRows(plan)
    dys = rows.gather(grad_out, cd)
    dh = db = None
    if need_h:
        dh = rows.to_pairs(rows.mm(dys, lora_b.to(cd)), h.shape[0] * h.shape[1]).view(h.shape).to(h.dtype)
    if need_b:
        db = _outer_b(rows, dys, rows.gather_pairs(h.reshape(-1, h.shape[-1]), cd), lora_b)
    return dh, db


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, needs,
                         u_saved: Optional[Tensor] = None):
    """Gradients of y = routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale) given grad_out [T, H_out].

    needs: five bools for (x, lora_a, lora_b, topk_weights, scale). u_saved: the forward's unscaled shrink
    u = A[e] x[t] as [T, K, R] float32 (zeros in empty slots), or None to recompute it (one grouped GEMM of
    P_r x R x H_in) where dB, dw or ds needs it. Returns (dx, dA, dB, dw [T, K], ds [N]) in their inputs' dtypes,
    None where not needed.
    """
    if cpu_train.usable(x):  # CPU tensors with the C++ kernels loaded
        return cpu_train.routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, needs,
                                              u_saved)
    del topk_ids
    need_x, need_a, need_b, need_w, need_s = needs
    cd = compute_dtype(x, scale)
    rows = PairRows(plan)
    shrink_needs = (need_x, need_a, need_w, need_s)
    need_u = need_b or need_w or need_s
    xs = rows.gather(x, cd) if (need_a or (u_saved is None and need_u)) else None
    dys = rows.gather(grad_out, cd)
    u = _unscaled_u(rows, xs, lora_a, u_saved, cd) if need_u else None
    coef = rows.coefficients(topk_weights, scale, cd)
    db = _outer_b(rows, dys, u * (coef[0] * coef[1])[:, None], lora_b) if need_b else None
    dx = da = dw = ds = None
    if any(shrink_needs):
        dh = rows.mm(dys, lora_b.to(cd))
        dx, da, dw, ds = _shrink_side(rows, xs, dh, u, coef, x, lora_a, topk_weights, scale, shrink_needs, cd)
    return dx, da, db, dw, ds

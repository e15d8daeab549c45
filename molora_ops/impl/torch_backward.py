"""The torch backward of the three ops: grouped by adapter, one GEMM per adapter segment per gradient.

Notation (pair p = t * K + k routed to adapter e, c = w[t, k] * s[e]):
    u[p] = A[e] x[t]  (the unscaled shrink, [R]),  h[p] = c * u[p],  y[t] = sum_k B[e] h[p]
    dh[p] = B[e]^T dy[t]                  dB[e] = sum_{p in e} dy[t] h[p]^T
    dx[t] = sum_k c * A[e]^T dh[p]        dA[e] = sum_{p in e} c * dh[p] x[t]^T
    dw[t, k] = s[e] * (u[p] . dh[p])      ds[e] = sum_{p in e} w[t, k] * (u[p] . dh[p])
Empty slots (-1) belong to no segment: they add nothing and their weight gradient is zero.

Layout: the routed pairs are gathered once in plan order (adapter-sorted), so every adapter's rows are one
contiguous slice: x and dy are gathered with one index_select each, the per-adapter GEMMs write into slices
of shared buffers (no per-segment allocations), and the element-wise terms (c, u . dh, the scaled du) are
computed once for all pairs. dx is a single index_add_ of the per-pair rows into the token rows; on CPU it is
sequential, hence deterministic (on CUDA tensors it uses atomics: use the triton backend's backward there).
dA, dB, dw and ds are written, never accumulated across segments. All arithmetic is float32 (float64 for
float64 inputs), whatever the input dtype; each gradient is rounded once into its input's dtype.

Reading the plan's offsets is a host sync on a GPU, as for the torch forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import RoutingPlan

Tensor = torch.Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _Routed:
    """The routed pairs of a plan in plan order: pair and token indices [P_r] int64, and the (adapter, lo, hi)
    row bounds of each active adapter's slice."""

    def __init__(self, plan: RoutingPlan):
        offsets = plan.seg_offsets.tolist()
        self.pairs = plan.sorted_pairs[: offsets[-1]].long()
        self.tokens = self.pairs // plan.top_k
        self.segments = [(e, offsets[e], offsets[e + 1]) for e in range(plan.num_adapters)
                         if offsets[e + 1] > offsets[e]]
        counts = torch.tensor([offsets[e + 1] - offsets[e] for e in range(plan.num_adapters)],
                              device=self.pairs.device)
        self.adapter = torch.repeat_interleave(torch.arange(plan.num_adapters, device=self.pairs.device), counts)

    def gather(self, t: Tensor, index: Tensor, cd: torch.dtype) -> Tensor:
        return t.index_select(0, index).to(cd)


def _per_segment(routed: _Routed, fn) -> None:
    for e, lo, hi in routed.segments:
        fn(e, lo, hi)


def _segment_outer(routed: _Routed, dys: Tensor, hs: Tensor, lora_b: Tensor) -> Tensor:
    """dB [N, H_out, R] in lora_b.dtype: dB[e] = sum_{p in e} dy[p] h[p]^T. Each segment's GEMM is formed as
    h^T dy ([R, H_out], the same shape as dA's, about 2x faster on CPU than dy^T h) and transposed once."""
    dbt = torch.zeros(lora_b.shape[0], lora_b.shape[2], lora_b.shape[1], dtype=hs.dtype, device=hs.device)
    _per_segment(routed, lambda e, lo, hi: torch.mm(hs[lo:hi].t(), dys[lo:hi], out=dbt[e]))
    return dbt.transpose(1, 2).contiguous().to(lora_b.dtype)


def _unscaled_u(routed: _Routed, xs: Tensor, lora_a: Tensor, u_saved: Optional[Tensor], cd) -> Tensor:
    """u [P_r, R] in plan order: rows of the saved u when given, else one GEMM per segment."""
    if u_saved is not None:
        return routed.gather(u_saved.reshape(-1, u_saved.shape[-1]), routed.pairs, cd)
    u = xs.new_empty(xs.shape[0], lora_a.shape[1])
    _per_segment(routed, lambda e, lo, hi: torch.mm(xs[lo:hi], lora_a[e].to(cd).t(), out=u[lo:hi]))
    return u


def _shrink_side(routed, xs, dh, u, x, lora_a, topk_weights, scale, needs, cd):
    """(dx, dA, dw, ds) given dh [P_r, R] in plan order (u [P_r, R] only needed for dw and ds)."""
    need_x, need_a, need_w, need_s = needs
    w = topk_weights.reshape(-1).index_select(0, routed.pairs).to(cd)
    s = scale.to(cd).index_select(0, routed.adapter)
    dx = da = dw = ds = None
    if need_x or need_a:
        du = dh * (w * s)[:, None]
        if need_a:
            da = torch.zeros(lora_a.shape, dtype=cd, device=x.device)
            _per_segment(routed, lambda e, lo, hi: torch.mm(du[lo:hi].t(), xs[lo:hi], out=da[e]))
        if need_x:
            rows = du.new_empty(du.shape[0], x.shape[1])
            _per_segment(routed, lambda e, lo, hi: torch.mm(du[lo:hi], lora_a[e].to(cd), out=rows[lo:hi]))
            dx = torch.zeros(x.shape, dtype=cd, device=x.device).index_add_(0, routed.tokens, rows)
    if need_w or need_s:
        u_dot_dh = (u * dh).sum(dim=1)
        if need_w:
            dw = torch.zeros(topk_weights.numel(), dtype=cd, device=x.device)
            dw.index_copy_(0, routed.pairs, s * u_dot_dh)
            dw = dw.view(topk_weights.shape)
        if need_s:
            ds = torch.zeros(scale.shape, dtype=cd, device=x.device).index_add_(0, routed.adapter, w * u_dot_dh)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip((dx, da, dw, ds), (x, lora_a, topk_weights, scale)))


def shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, needs):
    """Gradients of h = shrink(x, lora_a, topk_ids, topk_weights, scale) given grad_h [T, K, R].

    needs: four bools for (x, lora_a, topk_weights, scale). Returns (dx [T, H_in], dA [N, R, H_in], dw [T, K],
    ds [N]) in their inputs' dtypes, None where not needed. u = A x is recomputed (one GEMM per segment) only
    when dw or ds is needed: the op's output is the scaled h, and u = h / c fails where a weight is 0.
    """
    del topk_ids  # the plan lists the routed pairs
    cd = _compute_dtype(x, scale, grad_h)
    routed = _Routed(plan)
    xs = routed.gather(x, routed.tokens, cd)
    dh = routed.gather(grad_h.reshape(-1, grad_h.shape[-1]), routed.pairs, cd)
    u = _unscaled_u(routed, xs, lora_a, None, cd) if needs[2] or needs[3] else None
    return _shrink_side(routed, xs, dh, u, x, lora_a, topk_weights, scale, needs, cd)


def expand_backward(grad_out, h, lora_b, topk_ids, plan: RoutingPlan, needs):
    """Gradients of y = expand(h, lora_b, topk_ids) given grad_out [T, H_out].

    needs: two bools for (h, lora_b). Returns (dh [T, K, R] in h.dtype, zeros in empty slots; dB [N, H_out, R]
    in lora_b.dtype), None where not needed.
    """
    del topk_ids
    need_h, need_b = needs
    cd = _compute_dtype(h, lora_b)
    routed = _Routed(plan)
    dys = routed.gather(grad_out, routed.tokens, cd)
    dh = db = None
    if need_h:
        rows = dys.new_empty(dys.shape[0], h.shape[-1])
        _per_segment(routed, lambda e, lo, hi: torch.mm(dys[lo:hi], lora_b[e].to(cd), out=rows[lo:hi]))
        dh = torch.zeros(h.shape[0] * h.shape[1], h.shape[2], dtype=cd, device=h.device)
        dh = dh.index_copy_(0, routed.pairs, rows).view(h.shape).to(h.dtype)
    if need_b:
        db = _segment_outer(routed, dys, routed.gather(h.reshape(-1, h.shape[-1]), routed.pairs, cd), lora_b)
    return dh, db


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, needs,
                         u_saved: Optional[Tensor] = None):
    """Gradients of y = routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale) given grad_out [T, H_out].

    needs: five bools for (x, lora_a, lora_b, topk_weights, scale). u_saved: the forward's unscaled shrink
    u = A[e] x[t] as [T, K, R] float32 (zeros in empty slots), or None to recompute it per segment (one GEMM
    of M x R x H_in per adapter) where dB, dw or ds needs it. Returns (dx, dA, dB, dw [T, K], ds [N]) in their
    inputs' dtypes, None where not needed.
    """
    del topk_ids
    need_x, need_a, need_b, need_w, need_s = needs
    cd = _compute_dtype(x, scale)
    routed = _Routed(plan)
    shrink_needs = (need_x, need_a, need_w, need_s)
    xs = routed.gather(x, routed.tokens, cd) if (need_a or (u_saved is None and (need_b or need_w or need_s))) else None
    dys = routed.gather(grad_out, routed.tokens, cd)
    u = _unscaled_u(routed, xs, lora_a, u_saved, cd) if (need_b or need_w or need_s) else None
    db = None
    if need_b:
        w = topk_weights.reshape(-1).index_select(0, routed.pairs).to(cd)
        db = _segment_outer(routed, dys, u * (w * scale.to(cd).index_select(0, routed.adapter))[:, None], lora_b)
    dx = da = dw = ds = None
    if any(shrink_needs):
        dh = dys.new_empty(dys.shape[0], lora_a.shape[1])
        _per_segment(routed, lambda e, lo, hi: torch.mm(dys[lo:hi], lora_b[e].to(cd), out=dh[lo:hi]))
        dx, da, dw, ds = _shrink_side(routed, xs, dh, u, x, lora_a, topk_weights, scale, shrink_needs, cd)
    return dx, da, db, dw, ds

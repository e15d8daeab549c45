"""The `torch` backend: grouped by adapter, one matmul per *active* adapter.

This is the fast path on CPU and the fallback everywhere. It never computes all N adapters densely: for
each adapter with routed pairs it gathers that adapter's tokens (one contiguous segment of the routing
plan), runs shrink and expand as two small matmuls in float32, and scatters the result back. Listing
the active adapters reads the plan's offsets on the host, which is a sync when the tensors are on a GPU;
use the `triton` or `cuda` backend there.

Results are deterministic on CPU (index_add_ is sequential there).

The *_backward functions below are the gradient formulas of the three ops. They are the backward of every
backend (the op layer registers them with torch.library for torch, triton and cuda alike): correct and
grouped by adapter like the forward, not a fast kernel.
"""

from __future__ import annotations

import torch

from ..plan import RoutingPlan

name = "torch"


def _segments(plan: RoutingPlan):
    """Yield (adapter, pair indices [M] int64, token indices [M] int64) for each active adapter."""
    offsets = plan.seg_offsets.tolist()
    pairs_all = plan.sorted_pairs.long()
    for e in range(plan.num_adapters):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            pairs = pairs_all[lo:hi]
            yield e, pairs, pairs // plan.top_k


def _bounded_segments(plan: RoutingPlan, ranks, rank: int):
    """_segments with each adapter's real rank: (e, pairs, tokens, r_e), r_e = ranks[e] (R when ranks is None);
    adapters of rank 0 are skipped (they add nothing and their weights are never read)."""
    bound = [rank] * plan.num_adapters if ranks is None else ranks.tolist()
    for e, pairs, tokens in _segments(plan):
        if bound[e] > 0:
            yield e, pairs, tokens, bound[e]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _shrink_segment(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r):
    """[M, r]: adapter e's first r rank rows for its segment (pairs, tokens), times probability x scaling."""
    coef = topk_weights.reshape(-1)[pairs].to(cd) * scale[e].to(cd)  # [M]
    return (x[tokens].to(cd) @ lora_a[e, :r].to(cd).t()) * coef[:, None]


def _write_out(out: torch.Tensor, delta: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out.copy_(out.to(delta.dtype) + delta)
    else:
        out.copy_(delta)


def shrink(x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, ranks=None) -> torch.Tensor:
    """h[t, k, r] = w[t, k] * scale[e] * lora_a[e, r] @ x[t] for r < ranks[e]; returns [T, K, R] float32 (zeros
    in empty slots and beyond each adapter's rank; `ranks` None: every adapter has rank R)."""
    del topk_ids
    cd = _compute_dtype(x, scale)
    num_tokens, top_k, rank = x.shape[0], plan.top_k, lora_a.shape[1]
    h = torch.zeros(num_tokens * top_k, rank, dtype=cd, device=x.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, rank):
        h[pairs, :r] = _shrink_segment(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r)
    return h.view(num_tokens, top_k, rank)


def expand(h, lora_b, topk_ids, plan: RoutingPlan, out: torch.Tensor, accumulate: bool, ranks=None) -> None:
    """lora_expand into `out` (see molora_ops/reference.py), formed in float32, rounded once into out; adapter e
    reads only lora_b[e, :, :ranks[e]] and h[t, k, :ranks[e]]."""
    del topk_ids
    cd = _compute_dtype(h, lora_b)
    h_flat = h.reshape(-1, h.shape[-1])
    delta = torch.zeros(out.shape, dtype=cd, device=out.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, lora_b.shape[2]):
        delta.index_add_(0, tokens, h_flat[pairs, :r].to(cd) @ lora_b[e, :, :r].to(cd).t())
    _write_out(out, delta, accumulate)


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool, ranks=None
) -> None:
    """Shrink and expand per active adapter, each cut to its rank, without materialising h for the batch."""
    del topk_ids
    cd = _compute_dtype(x, scale)
    delta = torch.zeros(out.shape, dtype=cd, device=out.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, lora_a.shape[1]):
        h = _shrink_segment(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r)
        delta.index_add_(0, tokens, h @ lora_b[e, :, :r].to(cd).t())
    _write_out(out, delta, accumulate)


# ---------------------------------------------------------------------------------------------- backward
# Notation for one adapter segment (pairs p = t * K + k with topk_ids[t, k] = e, M of them):
#   u = A[e] x[t] (the unscaled shrink), c = w[t, k] * s[e], h = c * u, dh = the gradient w.r.t. h.
# Then  dx[t] += c * A[e]^T dh,  dA[e] = sum c * dh x[t]^T,  dw[t, k] = s[e] * (u . dh),  ds[e] = sum w * (u . dh),
# and for the expand y[t] += B[e] h:  dh = B[e]^T dy[t],  dB[e] = sum dy[t] h^T.
# Empty slots belong to no segment: they contribute nothing and their weight gradient stays zero.


class _ShrinkGrads:
    """Accumulators (float32, or float64 for float64 inputs) of the shrink-side gradients: x, lora_a,
    topk_weights and scale. An input whose gradient is not needed gets no buffer and no work."""

    def __init__(self, x, lora_a, topk_weights, scale, needs, cd):
        need_x, need_a, need_w, need_s = needs
        self._inputs = (x, lora_a, topk_weights, scale)
        self._w = topk_weights.reshape(-1)
        self._cd = cd
        self.dx = torch.zeros(x.shape, dtype=cd, device=x.device) if need_x else None
        self.da = torch.zeros(lora_a.shape, dtype=cd, device=x.device) if need_a else None
        self.dw = torch.zeros(self._w.shape, dtype=cd, device=x.device) if need_w else None
        self.ds = torch.zeros(scale.shape, dtype=cd, device=x.device) if need_s else None

    @property
    def needs_u(self) -> bool:
        return self.dw is not None or self.ds is not None

    def segment(self, e, pairs, tokens):
        """(x rows [M, H_in], A[e] [R, H_in], w [M], s[e]) of one segment, in the compute dtype."""
        x, lora_a, _, scale = self._inputs
        cd = self._cd
        return x[tokens].to(cd), lora_a[e].to(cd), self._w[pairs].to(cd), scale[e].to(cd)

    def add(self, e, pairs, tokens, xs, a, w, s, u, dh) -> None:
        """Add one segment's terms given its dh [M, R] (u [M, R] is needed only for the w and scale grads)."""
        if self.dx is not None or self.da is not None:
            du = dh * (w * s)[:, None]
            if self.dx is not None:
                self.dx.index_add_(0, tokens, du @ a)
            if self.da is not None:
                self.da[e] = du.t() @ xs
        if self.needs_u:
            u_dot_dh = (u * dh).sum(dim=1)
            if self.dw is not None:
                self.dw[pairs] = s * u_dot_dh
            if self.ds is not None:
                self.ds[e] = (w * u_dot_dh).sum()

    def result(self):
        """(dx, dA, dw [T, K], ds) in the dtypes of x, lora_a, topk_weights and scale; None where not needed."""
        x, lora_a, topk_weights, scale = self._inputs
        dw = None if self.dw is None else self.dw.view(topk_weights.shape)
        return tuple(
            None if g is None else g.to(t.dtype) for g, t in zip((self.dx, self.da, dw, self.ds), self._inputs)
        )


def shrink_backward(grad_h, x, lora_a, topk_weights, scale, plan: RoutingPlan, needs):
    """Gradients of h = shrink(x, lora_a, topk_ids, topk_weights, scale) given grad_h [T, K, R].

    needs: four bools for (x, lora_a, topk_weights, scale). Returns (dx [T, H_in], dA [N, R, H_in],
    dw [T, K], ds [N]) in their inputs' dtypes, None where not needed.
    """
    acc = _ShrinkGrads(x, lora_a, topk_weights, scale, needs, _compute_dtype(x, scale, grad_h))
    grad_flat = grad_h.reshape(-1, grad_h.shape[-1])
    for e, pairs, tokens in _segments(plan):
        xs, a, w, s = acc.segment(e, pairs, tokens)
        u = xs @ a.t() if acc.needs_u else None
        acc.add(e, pairs, tokens, xs, a, w, s, u, grad_flat[pairs].to(xs.dtype))
    return acc.result()


def expand_backward(grad_out, h, lora_b, plan: RoutingPlan, needs):
    """Gradients of y = expand(h, lora_b, topk_ids) given grad_out [T, H_out].

    needs: two bools for (h, lora_b). Returns (dh [T, K, R] in h.dtype, zeros in empty slots;
    dB [N, H_out, R] in lora_b.dtype), None where not needed.
    """
    need_h, need_b = needs
    cd = _compute_dtype(h, lora_b)
    rank = h.shape[-1]
    h_flat = h.reshape(-1, rank)
    dh = torch.zeros(h_flat.shape, dtype=cd, device=h.device) if need_h else None
    db = torch.zeros(lora_b.shape, dtype=cd, device=h.device) if need_b else None
    for e, pairs, tokens in _segments(plan):
        dys = grad_out[tokens].to(cd)
        if dh is not None:
            dh[pairs] = dys @ lora_b[e].to(cd)
        if db is not None:
            db[e] = dys.t() @ h_flat[pairs].to(cd)
    return (
        None if dh is None else dh.view(h.shape).to(h.dtype),
        None if db is None else db.to(lora_b.dtype),
    )


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_weights, scale, plan: RoutingPlan, needs):
    """Gradients of y = routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale) given grad_out [T, H_out].

    needs: five bools for (x, lora_a, lora_b, topk_weights, scale). Returns (dx, dA, dB, dw [T, K], ds [N])
    in their inputs' dtypes, None where not needed. h is recomputed per segment, never stored for the batch.
    """
    need_x, need_a, need_b, need_w, need_s = needs
    cd = _compute_dtype(x, scale)
    acc = _ShrinkGrads(x, lora_a, topk_weights, scale, (need_x, need_a, need_w, need_s), cd)
    shrink_side = need_x or need_a or need_w or need_s
    db = torch.zeros(lora_b.shape, dtype=cd, device=x.device) if need_b else None
    for e, pairs, tokens in _segments(plan):
        xs, a, w, s = acc.segment(e, pairs, tokens)
        dys = grad_out[tokens].to(cd)
        u = xs @ a.t() if (need_b or acc.needs_u) else None
        if db is not None:
            db[e] = dys.t() @ (u * (w * s)[:, None])
        if shrink_side:
            acc.add(e, pairs, tokens, xs, a, w, s, u, dys @ lora_b[e].to(cd))
    dx, da, dw, ds = acc.result()
    return dx, da, None if db is None else db.to(lora_b.dtype), dw, ds

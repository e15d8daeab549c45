"""The `torch` backend: grouped by adapter, one matmul per *active* adapter.

This is the fast path on CPU and the fallback everywhere. It never computes all N adapters densely: for
each adapter with routed pairs it gathers that adapter's tokens (one contiguous segment of the routing
plan), runs shrink and expand as two small matmuls in float32, and scatters the result back. Listing
the active adapters reads the plan's offsets on the host, which is a sync when the tensors are on a GPU;
use the `triton` or `cuda` backend there.

Results are deterministic on CPU (index_add_ is sequential there).

The backward of this backend is molora_ops/impl/torch_backward.py.
"""

from __future__ import annotations

import torch

from ..plan import RoutingPlan
from . import compute_dtype, cpu_train
from .pair_rows import PairRows

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
    if cpu_train.usable(x, ranks):
        return cpu_train.shrink(x, lora_a, topk_ids, topk_weights, scale)
    del topk_ids
    cd = compute_dtype(x, scale)
    num_tokens, top_k, rank = x.shape[0], plan.top_k, lora_a.shape[1]
    h = torch.zeros(num_tokens * top_k, rank, dtype=cd, device=x.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, rank):
        h[pairs, :r] = _shrink_segment(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r)
    return h.view(num_tokens, top_k, rank)


def expand(h, lora_b, topk_ids, plan: RoutingPlan, out: torch.Tensor, accumulate: bool, ranks=None) -> None:
    """lora_expand into `out` (see molora_ops/reference.py), formed in float32, rounded once into out; adapter e
    reads only lora_b[e, :, :ranks[e]] and h[t, k, :ranks[e]]."""
    if cpu_train.usable(h, ranks):
        cpu_train.expand(h, lora_b, topk_ids, out, accumulate)
        return
    del topk_ids
    cd = compute_dtype(h, lora_b)
    h_flat = h.reshape(-1, h.shape[-1])
    delta = torch.zeros(out.shape, dtype=cd, device=out.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, lora_b.shape[2]):
        delta.index_add_(0, tokens, h_flat[pairs, :r].to(cd) @ lora_b[e, :, :r].to(cd).t())
    _write_out(out, delta, accumulate)


def _pairs_forward(x, lora_a, lora_b, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool):
    """routed_lora into `out` over the plan's pair rows (impl/pair_rows.py): one gather of x, the shrink and the
    expand as one grouped GEMM each over all routed pairs, one index_add_ of the rows into the tokens. Returns the
    unscaled shrink u [P_r, R] in plan order (float32, float64 for float64 inputs)."""
    cd = compute_dtype(x, scale)
    rows = PairRows(plan)
    xs = rows.gather(x, cd)
    u = rows.mm(xs, lora_a.to(cd).transpose(1, 2))
    w, s = rows.coefficients(topk_weights, scale, cd)
    reuse = xs if xs.shape[1] == lora_b.shape[1] else None  # xs is dead once u is formed: no fresh [P_r, H] buffer
    y = rows.mm(u * (w * s)[:, None], lora_b.to(cd).transpose(1, 2), out=reuse)
    if out.dtype == cd:
        rows.scatter_add_(out if accumulate else out.zero_(), y)
    else:
        _write_out(out, rows.scatter_add_(torch.zeros(out.shape, dtype=cd, device=out.device), y), accumulate)
    return rows, u


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool, ranks=None
) -> None:
    """Shrink and expand per active adapter, each cut to its rank (ranks given: one adapter at a time; else the
    C++ kernels on CPU tensors where they are loaded, impl/cpu_train.py, or the grouped pair rows of
    _pairs_forward)."""
    if cpu_train.usable(x, ranks):
        cpu_train.routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, out, accumulate)
        return
    del topk_ids
    if ranks is None:
        _pairs_forward(x, lora_a, lora_b, topk_weights, scale, plan, out, accumulate)
        return
    cd = compute_dtype(x, scale)
    delta = torch.zeros(out.shape, dtype=cd, device=out.device)
    for e, pairs, tokens, r in _bounded_segments(plan, ranks, lora_a.shape[1]):
        h = _shrink_segment(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r)
        delta.index_add_(0, tokens, h @ lora_b[e, :, :r].to(cd).t())
    _write_out(out, delta, accumulate)


def routed_lora_train(
    x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool, ranks=None
) -> torch.Tensor:
    """routed_lora into `out`, returning the unscaled shrink u [T, K, R] (lora_a[e] @ x[t]; float32, float64 for
    float64 inputs; zeros in empty slots and beyond ranks[e]) for the backward. `out` gets exactly routed_lora's
    result (the same code path), so the autograd and in-place forms agree bit for bit."""
    num_tokens, top_k, rank = x.shape[0], plan.top_k, lora_a.shape[1]
    if cpu_train.usable(x, ranks):
        return cpu_train.routed_lora_train(x, lora_a, lora_b, topk_ids, topk_weights, scale, out, accumulate)
    if ranks is not None:
        ones = torch.ones(topk_weights.shape, dtype=torch.float32, device=x.device)
        u = shrink(x, lora_a, topk_ids, ones, torch.ones_like(scale), plan, ranks)
        routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, accumulate, ranks)
        return u
    rows, u = _pairs_forward(x, lora_a, lora_b, topk_weights, scale, plan, out, accumulate)
    return rows.to_pairs(u, num_tokens * top_k).view(num_tokens, top_k, rank)

"""Plain-PyTorch oracle for the routed-LoRA ops.

Every fast path in this package is tested against these functions. They are written for obviousness,
not speed: a Python loop over the K slots and a per-token gather of each adapter's weights, with all
arithmetic in float32 (or float64 when the inputs are float64, which the tests use as the exact answer).
They validate their inputs exactly like the public ops do.

Shapes (T tokens, K slots, N adapters, R padded rank, H_in/H_out hidden sizes):
    x            [T, H_in]
    lora_a       [N, R, H_in]
    lora_b       [N, H_out, R]
    topk_ids     [T, K]   ids in [0, N), or -1 for an empty slot
    topk_weights [T, K]
    scaling      None | float | [N]
    ranks        None | [N] int32: adapter e's real rank; its rows/columns r >= ranks[e] are padding, never read

With ``ranks``, every adapter is sliced to its real rank (lora_a[e, :ranks[e]], lora_b[e, :, :ranks[e]] and
h[t, k, :ranks[e]]) before any arithmetic, and h[t, k, r] = 0 for r >= ranks[e]. Because stored padding is zero,
this equals the padded computation; unlike it, it never reads the padding.
"""

from __future__ import annotations

import torch

from ._validation import check_expand, check_routed_lora, check_shrink, scaling_vector

__all__ = ["routed_lora", "lora_shrink", "lora_expand"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rank_sliced(w: torch.Tensor, ranks, dim: int) -> torch.Tensor:
    """A copy of the stacked weights w [N, ...] holding, for each adapter e, only its first ranks[e] entries along
    `dim` (0 beyond them): the padding is sliced off, never read. w itself when ranks is None."""
    if ranks is None:
        return w
    out = torch.zeros_like(w)
    for e, r in enumerate(ranks.tolist()):
        out[e].narrow(dim - 1, 0, r).copy_(w[e].narrow(dim - 1, 0, r))
    return out


def _slot_rank_mask(topk_ids, ranks, rank: int):
    """[T, K, R] bool: r < ranks[topk_ids[t, k]] (all True when ranks is None; empty slots: False)."""
    valid = topk_ids >= 0
    if ranks is None:
        return valid[..., None].expand(*topk_ids.shape, rank)
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    r = torch.where(valid, ranks.long()[ids], torch.zeros_like(ids))
    return torch.arange(rank, device=topk_ids.device) < r[..., None]


def lora_shrink(x, lora_a, topk_ids, topk_weights, *, scaling=None, ranks=None, backend="reference"):
    """Semantics: h[t, k, r] = topk_weights[t, k] * scaling[e] * (lora_a[e, r] @ x[t]) for r < ranks[e],
    e = topk_ids[t, k]; h[t, k, r] = 0 for r >= ranks[e] and for empty slots (e == -1).

    Returns h as [T, K, R] float32 (float64 for float64 inputs).
    """
    del backend
    check_shrink(x, lora_a, topk_ids, topk_weights, scaling, ranks=ranks)
    lora_a = _rank_sliced(lora_a, ranks, dim=1)
    cd = _compute_dtype(x.dtype)
    num_adapters = lora_a.shape[0]
    scale = scaling_vector(scaling, num_adapters, x.device, cd)
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()  # [T, K]
    a = lora_a.to(cd)[ids]  # [T, K, R, H_in]
    h = torch.einsum("tkrh,th->tkr", a, x.to(cd)) * (topk_weights.to(cd) * scale[ids])[..., None]
    # select, not multiply by 0: a NaN or Inf weight, scale, x or adapter 0 (gathered for empty slots) stays out
    keep = _slot_rank_mask(topk_ids, ranks, lora_a.shape[1])
    return torch.where(keep, h, torch.zeros((), dtype=cd, device=h.device))


def lora_expand(h, lora_b, topk_ids, *, out=None, ranks=None, backend="reference"):
    """Semantics: out[t] (+)= sum_k lora_b[e, :, :ranks[e]] @ h[t, k, :ranks[e]],  e = topk_ids[t, k], non-empty
    slots only (ranks None: the whole padded rank R).

    h is [T, K, R] float32. The sum is formed in float32 (float64 for float64 weights) and, when `out` is
    given, added to out in that precision and rounded once into out, which is returned. Otherwise a new
    [T, H_out] tensor of lora_b.dtype is returned.
    """
    del backend
    check_expand(h, lora_b, topk_ids, out, ranks=ranks)
    lora_b = _rank_sliced(lora_b, ranks, dim=2)
    cd = _compute_dtype(lora_b.dtype)
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    b = lora_b.to(cd)[ids]  # [T, K, H_out, R]
    hs = torch.where(_slot_rank_mask(topk_ids, ranks, h.shape[2]), h.to(cd), torch.zeros((), dtype=cd, device=h.device))
    y = torch.einsum("tkor,tkr->tko", b, hs)
    delta = torch.where(valid[..., None], y, torch.zeros((), dtype=cd, device=y.device)).sum(dim=1)  # [T, H_out]
    if out is None:
        return delta.to(lora_b.dtype)
    out.copy_(out.to(cd) + delta)
    return out


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=None, out=None, ranks=None, backend="reference"
):
    """Semantics: out[t] (+)= sum_k topk_weights[t,k] * scaling[e] * lora_b[e] @ (lora_a[e] @ x[t]),
    e = topk_ids[t, k], both factors cut to adapter e's rank ranks[e]; slots with e == -1 add nothing;
    accumulation is float32.

    Returns out ([T, H_out], x.dtype): a new tensor, or `out` itself after the in-place add.
    """
    del backend
    check_routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, out, ranks=ranks)
    h = lora_shrink(x, lora_a, topk_ids, topk_weights, scaling=scaling, ranks=ranks)
    return lora_expand(h, lora_b, topk_ids, out=out, ranks=ranks)

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
"""

from __future__ import annotations

import torch

from ._validation import check_expand, check_routed_lora, check_shrink, scaling_vector

__all__ = ["routed_lora", "lora_shrink", "lora_expand"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(x, lora_a, topk_ids, topk_weights, *, scaling=None, backend="reference"):
    """Semantics: h[t, k] = topk_weights[t, k] * scaling[e] * (lora_a[e] @ x[t]),  e = topk_ids[t, k];
    h[t, k] = 0 for empty slots (e == -1).

    Returns h as [T, K, R] float32 (float64 for float64 inputs).
    """
    del backend
    check_shrink(x, lora_a, topk_ids, topk_weights, scaling)
    cd = _compute_dtype(x.dtype)
    num_adapters = lora_a.shape[0]
    scale = scaling_vector(scaling, num_adapters, x.device, cd)
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()  # [T, K]
    a = lora_a.to(cd)[ids]  # [T, K, R, H_in]
    h = torch.einsum("tkrh,th->tkr", a, x.to(cd)) * (topk_weights.to(cd) * scale[ids])[..., None]
    # select, not multiply by 0: a NaN or Inf weight, scale, x or adapter 0 (gathered for empty slots) stays out
    return torch.where(valid[..., None], h, torch.zeros((), dtype=cd, device=h.device))


def lora_expand(h, lora_b, topk_ids, *, out=None, backend="reference"):
    """Semantics: out[t] (+)= sum_k lora_b[e] @ h[t, k],  e = topk_ids[t, k], non-empty slots only.

    h is [T, K, R] float32. The sum is formed in float32 (float64 for float64 weights) and, when `out` is
    given, added to out in that precision and rounded once into out, which is returned. Otherwise a new
    [T, H_out] tensor of lora_b.dtype is returned.
    """
    del backend
    check_expand(h, lora_b, topk_ids, out)
    cd = _compute_dtype(lora_b.dtype)
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    b = lora_b.to(cd)[ids]  # [T, K, H_out, R]
    y = torch.einsum("tkor,tkr->tko", b, h.to(cd))
    delta = torch.where(valid[..., None], y, torch.zeros((), dtype=cd, device=y.device)).sum(dim=1)  # [T, H_out]
    if out is None:
        return delta.to(lora_b.dtype)
    out.copy_(out.to(cd) + delta)
    return out


def routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, *, scaling=None, out=None, backend="reference"):
    """Semantics: out[t] (+)= sum_k topk_weights[t,k] * scaling[e] * lora_b[e] @ (lora_a[e] @ x[t]),
    e = topk_ids[t, k]; slots with e == -1 add nothing; accumulation is float32.

    Returns out ([T, H_out], x.dtype): a new tensor, or `out` itself after the in-place add.
    """
    del backend
    check_routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scaling, out)
    h = lora_shrink(x, lora_a, topk_ids, topk_weights, scaling=scaling)
    return lora_expand(h, lora_b, topk_ids, out=out)

"""The torch backend's routed_lora forward (with the unscaled shrink u saved for autograd) and its backward on CPU
tensors, through the C++ kernels of impl/cpu_fused.py: the registered ops' path under autograd (training) and
mo.routed_lora(backend="torch") calls. impl/torch_grouped.py and impl/torch_backward.py call these where
:func:`usable` says so (CPU tensors, uniform ranks, the kernels loaded); elsewhere they keep their grouped
pure-PyTorch code.

Notation as in impl/torch_backward.py (pair p = t * K + k routed to adapter e, c = w[t, k] * s[e]):
    u[p] = A[e] x[t],  h[p] = c * u[p],  y[t] = sum_k B[e] h[p]
    dh[p] = B[e]^T dy[t]                  dB[e] = sum_{p in e} dy[t] h[p]^T
    dx[t] = sum_k c * A[e]^T dh[p]        dA[e] = sum_{p in e} c * dh[p] x[t]^T
    dw[t, k] = s[e] * (u[p] . dh[p])      ds[e] = sum_{p in e} w[t, k] * (u[p] . dh[p])
Kernel mapping (plan rows in the kernels' order, impl/cpu_fused.py):
    u, dh          shrink (x through A; dy through B^T), coefficient 1
    y, dx          expand_ (h through B, alpha = s; c * dh through A^T), each out row written by one thread
    dA, dB         outer (per adapter, its rows of c * dh against x rows; of h against dy rows)
    dw, ds         element-wise on the rows, scattered to the slots / summed per adapter
No [pairs, H] buffer is formed; every sum runs in a fixed order (deterministic). Arithmetic in float32 (float64 for
float64 inputs); each result is rounded once into its tensor's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpu_fused

Tensor = torch.Tensor

USE = True  # tests and benchmarks switch the kernels off here to compare with the pure-PyTorch code


def usable(x: Tensor, ranks: Optional[Tensor] = None) -> bool:
    """Whether the torch backend runs this call through the C++ kernels."""
    return USE and ranks is None and x.device.type == "cpu" and cpu_fused.available()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _pairs(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype) -> cpu_fused.FusedPairs:
    return cpu_fused.prepare(topk_ids, topk_weights.detach().to(cd), num_adapters, torch.get_num_threads())


def _shrink_unscaled(pairs: cpu_fused.FusedPairs, src: Tensor, weight: Tensor) -> Tensor:
    """[S, R]: weight[e] @ src[token] per plan row (weight [N, R, D] with unit stride along D)."""
    ones = torch.ones_like(pairs.coef)
    return torch.ops.molora_cpu.shrink(src, weight, pairs.tokens, pairs.offsets, ones, None)


def routed_lora_train(x, lora_a, lora_b, topk_ids, topk_weights, scale, out: Tensor, accumulate: bool) -> Tensor:
    """routed_lora into `out` (accumulate or overwrite); returns u [T, K, R] (compute dtype, zeros in empty slots)."""
    cd = _compute_dtype(x, scale)
    (num_tokens, top_k), (num_adapters, rank) = topk_ids.shape, lora_a.shape[:2]
    pairs = _pairs(topk_ids, topk_weights, num_adapters, cd)
    u = _shrink_unscaled(pairs, x.to(cd).contiguous(), lora_a.to(cd).contiguous())
    h = u * pairs.coef[:, None]
    if out.dtype == cd:
        pairs.expand_(h, lora_b.to(cd), out if accumulate else out.zero_(), scale.to(cd))
    else:
        delta = torch.zeros(out.shape, dtype=cd)
        pairs.expand_(h, lora_b.to(cd), delta, scale.to(cd))
        out.copy_(out.to(cd) + delta if accumulate else delta)
    num_pairs = int(pairs.offsets[-1])
    u_slots = u.new_zeros(num_tokens * top_k, rank).index_copy_(0, pairs.slots[:num_pairs], u[:num_pairs])
    return u_slots.view(num_tokens, top_k, rank)


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, needs,
                         u_saved: Optional[Tensor] = None):
    """(dx, dA, dB, dw [T, K], ds [N]) of routed_lora given grad_out [T, H_out]; needs: five bools for (x, lora_a,
    lora_b, topk_weights, scale); u_saved: the forward's u [T, K, R] or None (recomputed where needed). Each
    gradient in its input's dtype, None where not needed."""
    need_x, need_a, need_b, need_w, need_s = needs
    cd = _compute_dtype(x, scale)
    num_adapters = lora_a.shape[0]
    pairs = _pairs(topk_ids, topk_weights, num_adapters, cd)
    num_pairs = int(pairs.offsets[-1])
    xc = x.to(cd).contiguous()
    dy = grad_out.to(cd).contiguous()
    w_row = pairs.coef
    s_row = scale.to(cd).index_select(0, pairs.adapters)
    c_row = w_row * s_row  # 0 in the padding rows (w is)
    need_u = need_b or need_w or need_s
    u = None
    if need_u:
        if u_saved is not None:
            u = u_saved.reshape(-1, u_saved.shape[-1]).to(cd).index_select(0, pairs.slots)
        else:
            u = _shrink_unscaled(pairs, xc, lora_a.to(cd).contiguous())
    dx = da = db = dw = ds = None
    if need_b:  # dB[e] = sum dy[t] h[p]^T: outer gives [N, R, H_out]
        db = torch.ops.molora_cpu.outer((u * c_row[:, None]).contiguous(), dy, pairs.tokens, pairs.offsets)
        db = db.transpose(1, 2).contiguous()
    if need_x or need_a or need_w or need_s:
        dh = _shrink_unscaled(pairs, dy, lora_b.to(cd).transpose(1, 2).contiguous())  # B[e]^T dy[t]
        if need_x or need_a:
            du = dh * c_row[:, None]
            if need_a:
                da = torch.ops.molora_cpu.outer(du, xc, pairs.tokens, pairs.offsets)
            if need_x:
                dx = torch.zeros(x.shape, dtype=cd)
                pairs.expand_(du, lora_a.to(cd).transpose(1, 2), dx, None)  # A[e]^T du[p], A^T as [N, H_in, R]
        if need_w or need_s:
            u_dot_dh = (u[:num_pairs] * dh[:num_pairs]).sum(dim=1)
            if need_w:
                dw = torch.zeros(topk_weights.numel(), dtype=cd).index_copy_(
                    0, pairs.slots[:num_pairs], s_row[:num_pairs] * u_dot_dh).view(topk_weights.shape)
            if need_s:
                ds = torch.zeros(num_adapters, dtype=cd).index_add_(
                    0, pairs.adapters[:num_pairs], w_row[:num_pairs] * u_dot_dh)
    grads = (dx, da, db, dw, ds)
    inputs = (x, lora_a, lora_b, topk_weights, scale)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))

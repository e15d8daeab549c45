"""The torch backend's ops on CPU tensors through the C++ kernels of impl/cpu_fused.py: shrink, expand and
routed_lora (with the unscaled shrink u saved for autograd) and their backwards, i.e. the registered ops' path
under autograd (training a patched model: its sibling groups take shrink + expand, the others routed_lora) and
mo.*(backend="torch") calls. impl/torch_grouped.py and impl/torch_backward.py call these where :func:`usable`
says so (CPU tensors, the kernels loaded, and for the forwards uniform ranks); elsewhere they keep their grouped
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

from . import compute_dtype, cpu_fused

Tensor = torch.Tensor

USE = True  # tests and benchmarks switch the kernels off here to compare with the pure-PyTorch code


def usable(x: Tensor, ranks: Optional[Tensor] = None) -> bool:
    """Whether the torch backend runs this call through the C++ kernels."""
    return USE and ranks is None and x.device.type == "cpu" and cpu_fused.available()


def _pairs(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype) -> cpu_fused.FusedPairs:
    return cpu_fused.prepare(topk_ids, topk_weights.detach().to(cd), num_adapters, torch.get_num_threads())


def _shrink_unscaled(pairs: cpu_fused.FusedPairs, src: Tensor, weight: Tensor) -> Tensor:
    """[S, R]: weight[e] @ src[token] per plan row (weight [N, R, D] with unit stride along D)."""
    ones = torch.ones_like(pairs.coef)
    return torch.ops.molora_cpu.shrink(src, weight, pairs.tokens, pairs.offsets, ones, None)


def _to_slots(pairs: cpu_fused.FusedPairs, rows: Tensor, shape: tuple) -> Tensor:
    """rows [S, D] in plan order placed at their slots: [T, K, D] (shape), zeros in empty slots."""
    num_pairs = int(pairs.offsets[-1])
    flat = rows.new_zeros(shape[0] * shape[1], rows.shape[1])
    return flat.index_copy_(0, pairs.slots[:num_pairs], rows[:num_pairs]).view(shape[0], shape[1], rows.shape[1])


def _write(out: Tensor, cd: torch.dtype, accumulate: bool, add) -> None:
    """out (+)= delta, where add(acc) adds delta into a cd tensor acc: straight into out when it is in cd, else into
    a cd buffer rounded once into out."""
    if out.dtype == cd:
        add(out if accumulate else out.zero_())
        return
    delta = torch.zeros(out.shape, dtype=cd)
    add(delta)
    out.copy_(out.to(cd) + delta if accumulate else delta)


def shrink(x, lora_a, topk_ids, topk_weights, scale) -> Tensor:
    """h [T, K, R] (compute dtype): w[t, k] * s[e] * A[e] x[t], zeros in empty slots."""
    cd = compute_dtype(x, scale)
    pairs = _pairs(topk_ids, topk_weights, lora_a.shape[0], cd)
    coef = pairs.coef * scale.to(cd).index_select(0, pairs.adapters)
    u = torch.ops.molora_cpu.shrink(x.to(cd).contiguous(), lora_a.to(cd).contiguous(), pairs.tokens, pairs.offsets,
                                    coef, None)
    return _to_slots(pairs, u, (*topk_ids.shape, lora_a.shape[1]))


def expand(h, lora_b, topk_ids, out: Tensor, accumulate: bool) -> None:
    """out (+)= sum_k B[e] h[t, k] (h [T, K, R])."""
    cd = compute_dtype(h, lora_b)
    pairs = _pairs(topk_ids, torch.ones(topk_ids.shape, dtype=cd), lora_b.shape[0], cd)
    rows = h.reshape(-1, h.shape[-1]).to(cd).index_select(0, pairs.slots)
    _write(out, cd, accumulate, lambda acc: pairs.expand_(rows, lora_b.to(cd), acc, None))


def _shrink_side(pairs: cpu_fused.FusedPairs, dh: Tensor, u: Optional[Tensor], xc: Tensor, a_t: Tensor,
                 topk_weights: Tensor, s_row: Tensor, needs) -> tuple:
    """(dx, dA, dw, ds) in the compute dtype, xc's (None where not needed), given dh [S, R] in plan order; needs: four
    bools for (x, lora_a, topk_weights, scale); a_t: A^T as [N, H_in, R]; s_row [S]: each row's scaling; u [S, R]
    (the unscaled shrink) only for dw and ds. Shared by shrink_backward and routed_lora_backward."""
    need_x, need_a, need_w, need_s = needs
    cd = xc.dtype
    num_pairs = int(pairs.offsets[-1])
    dx = da = dw = ds = None
    if need_x or need_a:
        du = dh * (pairs.coef * s_row)[:, None]
        if need_a:
            da = torch.ops.molora_cpu.outer(du, xc, pairs.tokens, pairs.offsets)
        if need_x:
            dx = torch.zeros(xc.shape, dtype=cd)
            pairs.expand_(du, a_t, dx, None)  # A[e]^T du[p]
    if need_w or need_s:
        u_dot_dh = (u[:num_pairs] * dh[:num_pairs]).sum(dim=1)
        if need_w:
            dw = torch.zeros(topk_weights.numel(), dtype=cd).index_copy_(
                0, pairs.slots[:num_pairs], s_row[:num_pairs] * u_dot_dh).view(topk_weights.shape)
        if need_s:
            ds = torch.zeros(pairs.offsets.shape[0] - 1, dtype=cd).index_add_(
                0, pairs.adapters[:num_pairs], pairs.coef[:num_pairs] * u_dot_dh)
    return dx, da, dw, ds


def shrink_backward(grad_h, x, lora_a, topk_ids, topk_weights, scale, needs):
    """(dx, dA, dw, ds) of h = shrink(...) given grad_h [T, K, R]; needs: four bools for (x, lora_a, topk_weights,
    scale). u = A x is recomputed only for dw or ds."""
    cd = compute_dtype(x, scale, grad_h)
    pairs = _pairs(topk_ids, topk_weights, lora_a.shape[0], cd)
    xc, ac = x.to(cd).contiguous(), lora_a.to(cd).contiguous()
    dh = grad_h.reshape(-1, grad_h.shape[-1]).to(cd).index_select(0, pairs.slots)
    u = _shrink_unscaled(pairs, xc, ac) if needs[2] or needs[3] else None
    s_row = scale.to(cd).index_select(0, pairs.adapters)
    grads = _shrink_side(pairs, dh, u, xc, ac.transpose(1, 2), topk_weights, s_row, needs)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (x, lora_a, topk_weights, scale)))


def expand_backward(grad_out, h, lora_b, topk_ids, needs):
    """(dh [T, K, R], zeros in empty slots; dB [N, H_out, R]) of y = expand(h, lora_b, topk_ids) given grad_out;
    needs: two bools for (h, lora_b)."""
    need_h, need_b = needs
    cd = compute_dtype(h, lora_b)
    pairs = _pairs(topk_ids, torch.ones(topk_ids.shape, dtype=cd), lora_b.shape[0], cd)
    dy = grad_out.to(cd).contiguous()
    dh = db = None
    if need_h:
        rows = _shrink_unscaled(pairs, dy, lora_b.to(cd).transpose(1, 2).contiguous())  # B[e]^T dy[t]
        dh = _to_slots(pairs, rows, h.shape).to(h.dtype)
    if need_b:
        rows = h.reshape(-1, h.shape[-1]).to(cd).index_select(0, pairs.slots).contiguous()
        db = torch.ops.molora_cpu.outer(rows, dy, pairs.tokens, pairs.offsets).transpose(1, 2).contiguous()
        db = db.to(lora_b.dtype)
    return dh, db


def routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, out: Tensor, accumulate: bool) -> None:
    """routed_lora into `out` (accumulate or overwrite), u not kept: the shrink applies w itself (the same single
    rounding of u * w as routed_lora_train's, so both give the same bits)."""
    cd = compute_dtype(x, scale)
    pairs = _pairs(topk_ids, topk_weights, lora_a.shape[0], cd)
    h = torch.ops.molora_cpu.shrink(x.to(cd).contiguous(), lora_a.to(cd).contiguous(), pairs.tokens, pairs.offsets,
                                    pairs.coef, None)
    _write(out, cd, accumulate, lambda acc: pairs.expand_(h, lora_b.to(cd), acc, scale.to(cd)))


def routed_lora_train(x, lora_a, lora_b, topk_ids, topk_weights, scale, out: Tensor, accumulate: bool) -> Tensor:
    """routed_lora into `out` (accumulate or overwrite); returns u [T, K, R] (compute dtype, zeros in empty slots)."""
    cd = compute_dtype(x, scale)
    (num_tokens, top_k), (num_adapters, rank) = topk_ids.shape, lora_a.shape[:2]
    pairs = _pairs(topk_ids, topk_weights, num_adapters, cd)
    u = _shrink_unscaled(pairs, x.to(cd).contiguous(), lora_a.to(cd).contiguous())
    h = u * pairs.coef[:, None]
    _write(out, cd, accumulate, lambda acc: pairs.expand_(h, lora_b.to(cd), acc, scale.to(cd)))
    return _to_slots(pairs, u, (num_tokens, top_k, rank))


def routed_lora_backward(grad_out, x, lora_a, lora_b, topk_ids, topk_weights, scale, needs,
                         u_saved: Optional[Tensor] = None):
    """(dx, dA, dB, dw [T, K], ds [N]) of routed_lora given grad_out [T, H_out]; needs: five bools for (x, lora_a,
    lora_b, topk_weights, scale); u_saved: the forward's u [T, K, R] or None (recomputed where needed). Each
    gradient in its input's dtype, None where not needed."""
    need_x, need_a, need_b, need_w, need_s = needs
    cd = compute_dtype(x, scale)
    pairs = _pairs(topk_ids, topk_weights, lora_a.shape[0], cd)
    xc, ac = x.to(cd).contiguous(), lora_a.to(cd).contiguous()
    dy = grad_out.to(cd).contiguous()
    s_row = scale.to(cd).index_select(0, pairs.adapters)
    u = None
    if need_b or need_w or need_s:
        if u_saved is not None:
            u = u_saved.reshape(-1, u_saved.shape[-1]).to(cd).index_select(0, pairs.slots)
        else:
            u = _shrink_unscaled(pairs, xc, ac)
    db = dx = da = dw = ds = None
    if need_b:  # dB[e] = sum dy[t] h[p]^T, h = c * u: outer gives [N, R, H_out]
        h = (u * (pairs.coef * s_row)[:, None]).contiguous()
        db = torch.ops.molora_cpu.outer(h, dy, pairs.tokens, pairs.offsets).transpose(1, 2).contiguous()
    shrink_needs = (need_x, need_a, need_w, need_s)
    if any(shrink_needs):
        dh = _shrink_unscaled(pairs, dy, lora_b.to(cd).transpose(1, 2).contiguous())  # B[e]^T dy[t]
        dx, da, dw, ds = _shrink_side(pairs, dh, u, xc, ac.transpose(1, 2), topk_weights, s_row, shrink_needs)
    grads = (dx, da, db, dw, ds)
    inputs = (x, lora_a, lora_b, topk_weights, scale)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))

"""Triton kernels for routed multi-LoRA, and thin launchers that take explicit tensors and configs.

Shapes (T tokens, K slots, P = T * K pairs, pair p = t * K + k, N adapters, R padded rank):
    x [T, H_in], lora_a [N, R, H_in], lora_b [N, H_out, R], topk_ids / topk_weights [T, K], scale [N],
    h [T, K, R] float32 (addressed as rows p of a [P, R] view), out [T, H_out].

Kernels
    _shrink_kernel         adapter-segmented gather-GEMM: a program owns BLOCK_M pairs of one adapter's segment
                           of the routing plan, one BLOCK_R slice of the rank and one of SPLIT_K slices of H_in.
                           The tiles of all segments are numbered back to back, so the grid is about
                           P / BLOCK_M + N programs, not N * P / BLOCK_M.
                           tl.dot on the gathered x rows against lora_a[e] (gathered by index: base + e * stride).
    _shrink_reduce_kernel  sums the SPLIT_K partials in a fixed order (deterministic) and applies
                           probability x scaling in rank space; writes every element of h (zeros for empty slots).
    _expand_kernel         token-major: a program owns BLOCK_M tokens x BLOCK_N output columns and reduces the
                           K slots of each token itself (deterministic, every out element written exactly once).
                           Gathers lora_b per row and reduces over R on CUDA cores: best when the adapters in a
                           token tile are many and different (decode, large N).
    _expand_dot_kernel     token-major too, but on tensor cores: walks the distinct adapters of its token tile in
                           ascending order and does one tl.dot per adapter (prefill with few adapters).
    _fused_kernel          shrink + expand in one launch for decode sizes (small T, small R * K): each program
                           recomputes its tokens' h in registers, then expands into its own output tile.

Conventions: every load and store is masked; offsets are int64; ids outside [0, N) are masked out before
they are ever used in an address, so they are never dereferenced; accumulation is float32 and the result
is rounded once into out. Grids never depend on device values: the shrink grid is sized for the longest
possible routing (cdiv(P, BLOCK_M) + min(N, P) segment tiles) and programs past the last tile return at
once, which keeps launches CUDA-graph safe.

Ranks (HAS_RANKS constexpr, ranks_ptr an int32 [N]): adapter e's rank loops stop at r_e = clamp(ranks[e], 0, R).
Rank tiles or steps at or beyond r_e are skipped (a shrink program whose whole BLOCK_R tile lies beyond r_e, or
a grouped-expand program of a zero-rank adapter, returns at once: their outputs start at zero), and every
weight and h load is masked by r < r_e, so the padding is never read. Without ranks r_e = R for every adapter.

UPCAST (constexpr): cast tl.dot operands to float32 and use input_precision="ieee". Set for float32 inputs
(on a GPU tf32 would break the float32 tolerance) and under TRITON_INTERPRET=1, where bf16 tl.dot is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import GatherConfig, GroupedExpandConfig, ShrinkConfig, cdiv, reduce_config, scan_block


# ------------------------------------------------------------------------------------------------ epilogue
@triton.jit
def _store_out_tile(out_ptr, acc, offs_t, offs_n, mask_t, mask_n, stride_ot, stride_oo, ACCUMULATE: tl.constexpr):
    """Semantics: out[t, o] = (out[t, o] if ACCUMULATE else 0) + acc[t, o] for the tile's in-bounds elements,
    summed in float32 and rounded once into out's dtype. Shared by every expand-side kernel."""
    out_ptrs = out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_oo
    mask = mask_t[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- segments
@triton.jit
def _rank_bound(ranks_ptr, e, valid, rank, HAS_RANKS: tl.constexpr):
    """Semantics: clamp(ranks[e], 0, rank) where `valid`, else 0 (e may be a scalar or a block of ids; ranks is
    not read where not valid); rank where valid when HAS_RANKS is off."""
    if HAS_RANKS:
        r = tl.load(ranks_ptr + e, mask=valid, other=0)
        r = tl.minimum(tl.maximum(r, 0), rank)
    else:
        r = tl.where(valid, rank, 0)
    return r


@triton.jit
def _segment_tile(tile_id, seg_offsets_ptr, num_pairs, num_adapters, BLOCK_M: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """Semantics: the BLOCK_M tiles of all adapter segments of the plan are numbered back to back (adapter 0's
    cdiv(len_0, BLOCK_M) tiles, then adapter 1's, ...); returns (e, tile) for flat tile `tile_id`, e = -1 past
    the last tile. Segment bounds are clamped to [0, P]. A prefix sum over the plan's offsets, SCAN_BLOCK
    adapters at a time: O(N) per program, but it keeps grids at about P / BLOCK_M + N programs instead of
    N * P / BLOCK_M mostly idle ones."""
    e = tile_id * 0 - 1
    tile = tile_id * 0
    tiles_before = tile_id * 0
    for c0 in range(0, num_adapters, SCAN_BLOCK):
        offs_e = c0 + tl.arange(0, SCAN_BLOCK)
        mask_e = offs_e < num_adapters
        lo = tl.minimum(tl.maximum(tl.load(seg_offsets_ptr + offs_e, mask=mask_e, other=0), 0), num_pairs)
        hi = tl.minimum(tl.maximum(tl.load(seg_offsets_ptr + offs_e + 1, mask=mask_e, other=0), lo), num_pairs)
        n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        first = tl.cumsum(n_tiles, axis=0) - n_tiles + tiles_before  # first flat tile of each adapter
        hit = mask_e & (first <= tile_id) & (tile_id < first + n_tiles)
        e = tl.maximum(e, tl.max(tl.where(hit, offs_e, -1), axis=0))
        tile = tl.maximum(tile, tl.max(tl.where(hit, tile_id - first, 0), axis=0))
        tiles_before += tl.sum(n_tiles, axis=0)
    return e, tile


# ------------------------------------------------------------------------------------------------- shrink
@triton.jit
def _segment_bounds(seg_offsets_ptr, e, num_pairs):
    """[start, end) of adapter e's segment of the plan order, clamped to [0, P] (the plan is not trusted)."""
    start = tl.minimum(tl.maximum(tl.load(seg_offsets_ptr + e), 0), num_pairs)
    end = tl.minimum(tl.maximum(tl.load(seg_offsets_ptr + e + 1), start), num_pairs)
    return start, end


@triton.jit
def _segment_pairs(sorted_pairs_ptr, ids_ptr, offs_m, end, e, num_pairs, top_k, stride_idt, stride_idk):
    """The plan rows offs_m (those < end) of adapter e's segment: (pairs, tokens, slots, keep) with pair
    p = t * K + k, and keep = the row is in the segment, p in [0, P) and ids[t, k] == e (a stale plan may list
    pairs of another adapter, which stay untouched)."""
    mask_m = offs_m < end
    pairs = tl.load(sorted_pairs_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    mask_m = mask_m & (pairs >= 0) & (pairs < num_pairs)
    tokens = pairs // top_k
    slots = pairs - tokens * top_k
    keep = mask_m & (tl.load(ids_ptr + tokens * stride_idt + slots * stride_idk, mask=mask_m, other=-1) == e)
    return pairs, tokens, slots, keep


@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, ids_ptr, w_ptr, scale_ptr, sorted_pairs_ptr, seg_offsets_ptr, ranks_ptr, out_ptr,
    # sizes
    num_pairs, top_k, rank, h_in, k_per_split, num_adapters,
    # strides
    stride_xt, stride_xh,
    stride_ae, stride_ar, stride_ah,
    stride_idt, stride_idk,
    stride_wt, stride_wk,
    stride_os, stride_op, stride_or,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, APPLY_COEF: tl.constexpr, USE_ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_RANKS: tl.constexpr,
):
    """Semantics: for each pair p = t*K + k routed to adapter e (the segment e of the plan) and r < r_e,
        out[s, p, r] = sum_{h in split s} lora_a[e, r, h] * x[t, h]          (APPLY_COEF = False, partials)
        out[p, r]    = w[t, k] * scale[e] * sum_h lora_a[e, r, h] * x[t, h]   (APPLY_COEF = True, SPLIT_K = 1
                                                                              or USE_ATOMIC: added in place)
    r_e = ranks[e] (HAS_RANKS) or R; elements r >= r_e are not written (out starts at zero), and a program whose
    rank tile starts at or beyond r_e returns before reading anything.
    Grid: (cdiv(P, BLOCK_M) + min(N, P), SPLIT_K * cdiv(R, BLOCK_R)). Axis 0 enumerates the BLOCK_M tiles of
    all segments back to back (adapter 0's tiles, then adapter 1's, ...); its size is an upper bound on that
    count for any routing, so it is fixed by shapes alone and programs past the last tile return at once.
    The plan is not trusted: segment bounds are clamped to [0, P], listed pairs outside [0, P) are skipped,
    and a listed pair is stored only when ids[t, k] == e (the segment's adapter), as in the CUDA kernel.
    Rows of pairs that no segment lists under their own adapter are untouched, so a stale or inconsistent
    plan makes them empty as long as out starts at zero (triton_backend allocates it so).
    """
    tile_id = tl.program_id(0)
    pid_z = tl.program_id(1)
    pid_sk = pid_z % SPLIT_K
    pid_r = pid_z // SPLIT_K

    # Which adapter and which tile of its segment (programs past the last tile of the last segment return).
    e, tile = _segment_tile(tile_id, seg_offsets_ptr, num_pairs, num_adapters, BLOCK_M, SCAN_BLOCK)
    if e < 0:
        return

    seg_start, seg_end = _segment_bounds(seg_offsets_ptr, e, num_pairs)
    row_start = seg_start + tile * BLOCK_M

    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_end
    pairs = tl.load(sorted_pairs_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    mask_m = mask_m & (pairs >= 0) & (pairs < num_pairs)
    tokens = pairs // top_k
    slots = pairs - tokens * top_k
    # Only pairs whose id is this segment's adapter are stored (a stale plan may list others, which stay
    # untouched): the others' row index becomes -1. This exact form is what compiled spill-free on sm_80 /
    # sm_90; masking the x loads with the check, or loading the ids after the loop, spilled.
    id_ptrs = ids_ptr + tokens * stride_idt + slots * stride_idk
    out_rows = tl.where(tl.load(id_ptrs, mask=mask_m, other=-1) == e, pairs, -1)

    rank_e = _rank_bound(ranks_ptr, e, e >= 0, rank, HAS_RANKS)
    if pid_r * BLOCK_R >= rank_e:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank_e
    k_lo = pid_sk * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, h_in)

    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
    a_cols = a_ptr + e.to(tl.int64) * stride_ae + offs_r.to(tl.int64)[None, :] * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < k_hi
        xt = tl.load(x_rows + offs_k[None, :] * stride_xh, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols + offs_k[:, None] * stride_ah, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)

    keep = out_rows >= 0
    if APPLY_COEF:
        w = tl.load(w_ptr + tokens * stride_wt + slots * stride_wk, mask=keep, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + e).to(tl.float32)
        acc = acc * (w * s)[:, None]

    out_ptrs = (
        out_ptr + pid_sk.to(tl.int64) * stride_os + out_rows[:, None] * stride_op
        + offs_r.to(tl.int64)[None, :] * stride_or
    )
    mask = keep[:, None] & mask_r[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _shrink_reduce_kernel(
    # pointers
    part_ptr, ids_ptr, w_ptr, scale_ptr, ranks_ptr, h_ptr,
    # sizes
    num_pairs, top_k, rank, num_adapters,
    # strides
    stride_ps, stride_pp, stride_pr,
    stride_idt, stride_idk,
    stride_wt, stride_wk,
    stride_hp, stride_hr,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    """Semantics: h[p, r] = w[t, k] * scale[e] * sum_{s = 0..SPLIT_K-1} part[s, p, r] (in that order) for
    pairs with e = ids[t, k] in [0, N) and r < r_e (ranks[e], or R); h[p, r] = 0 otherwise (those partials are
    never read).
    Grid: (cdiv(P, BLOCK_P),). Writes every element of h."""
    pid = tl.program_id(0)
    offs_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_pairs
    tokens = offs_p // top_k
    slots = offs_p - tokens * top_k
    ids = tl.load(ids_ptr + tokens * stride_idt + slots * stride_idk, mask=mask_p, other=-1).to(tl.int64)
    valid = mask_p & (ids >= 0) & (ids < num_adapters)
    safe_ids = tl.where(valid, ids, 0)
    w = tl.load(w_ptr + tokens * stride_wt + slots * stride_wk, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + safe_ids, mask=valid, other=0.0).to(tl.float32)
    coef = tl.where(valid, w * s, 0.0)
    r_lim = _rank_bound(ranks_ptr, safe_ids, valid, rank, HAS_RANKS)  # [BLOCK_P]
    for r0 in range(0, rank, BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < rank
        inside = offs_r[None, :] < r_lim[:, None]
        acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        for sk in range(0, SPLIT_K):  # fixed order; a runtime loop keeps the 64-bit addresses out of registers
            acc += tl.load(
                part_ptr + tl.cast(sk, tl.int64) * stride_ps + offs_p[:, None] * stride_pp + offs_r[None, :] * stride_pr,
                mask=inside, other=0.0,
            )
        tl.store(
            h_ptr + offs_p[:, None] * stride_hp + offs_r[None, :] * stride_hr,
            tl.where(inside, acc * coef[:, None], 0.0), mask=mask_p[:, None] & mask_r[None, :],
        )


# ------------------------------------------------------------------------------------------------- expand
@triton.jit
def _expand_kernel(
    # pointers
    h_ptr, b_ptr, ids_ptr, ranks_ptr, out_ptr,
    # sizes
    num_tokens, top_k, rank, h_out, num_adapters,
    # strides
    stride_ht, stride_hk, stride_hr,
    stride_be, stride_bo, stride_br,
    stride_idt, stride_idk,
    stride_ot, stride_oo,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACCUMULATE: tl.constexpr,
    HAS_RANKS: tl.constexpr,
):
    """Semantics: out[t, o] = (out[t, o] if ACCUMULATE else 0) + sum_{k: 0 <= e < N} sum_{r < r_e} lora_b[e, o, r] * h[t, k, r],
    e = ids[t, k]; the k sum runs in slot order inside this program, in float32, rounded once into out.
    Grid: (cdiv(T, BLOCK_M), cdiv(H_out, BLOCK_N)). Every element of out is written exactly once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_t = offs_t < num_tokens
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, top_k):
        k64 = tl.cast(k, tl.int64)
        ids = tl.load(ids_ptr + offs_t * stride_idt + k64 * stride_idk, mask=mask_t, other=-1).to(tl.int64)
        valid = mask_t & (ids >= 0) & (ids < num_adapters)
        ids = tl.where(valid, ids, 0)  # never form an address from an out-of-range id
        r_lim = _rank_bound(ranks_ptr, ids, valid, rank, HAS_RANKS)  # [M]; 0 for invalid slots
        h_rows = h_ptr + offs_t[:, None] * stride_ht + k64 * stride_hk  # [M, 1]
        b_rows = b_ptr + ids[:, None, None] * stride_be + offs_n[None, :, None] * stride_bo  # [M, N, 1]
        mask_b = mask_n[None, :, None]
        for r0 in range(0, tl.max(r_lim, axis=0), BLOCK_R):
            offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask_r = offs_r[None, :] < r_lim[:, None]  # [M, R]: also False for invalid slots
            hv = tl.load(h_rows + offs_r[None, :] * stride_hr, mask=mask_r, other=0.0)
            bv = tl.load(b_rows + offs_r[None, None, :] * stride_br, mask=mask_b & mask_r[:, None, :], other=0.0)
            acc += tl.sum(bv.to(tl.float32) * hv.to(tl.float32)[:, None, :], axis=2)

    _store_out_tile(out_ptr, acc, offs_t, offs_n, mask_t, mask_n, stride_ot, stride_oo, ACCUMULATE)


@triton.jit
def _dot_f32_rows(h, bt, acc, UPCAST: tl.constexpr):
    """Semantics: acc + h @ bt with h [M, R] float32 and bt [R, N] in the weights' dtype, without rounding h to
    16 bits: UPCAST takes float32 operands in ieee precision; otherwise h enters half-precision tensor-core dots
    as hi + lo halves. fp16 cannot hold |h| > 65504: the hi half is clamped to +-65504, the lo half carries the
    rest, and a tile where that happened (rare) adds a third dot for the lo half's own rounding error, so |h| up
    to 2 * 65504 keeps about 22 bits (an unclamped hi half was inf, and inf + -inf NaN; bf16 has float32's
    range)."""
    if UPCAST:
        out = tl.dot(h, bt.to(tl.float32), acc, input_precision="ieee")
    elif bt.dtype == tl.float16:
        h_hi = tl.minimum(tl.maximum(h, -65504.0), 65504.0).to(tl.float16)
        h_res = h - h_hi.to(tl.float32)
        h_lo = h_res.to(tl.float16)
        out = tl.dot(h_hi, bt, acc)
        out = tl.dot(h_lo, bt, out)
        if tl.max(tl.abs(h)) > 65504.0:
            out = tl.dot((h_res - h_lo.to(tl.float32)).to(tl.float16), bt, out)
    else:
        h_hi = h.to(bt.dtype)
        h_lo = (h - h_hi.to(tl.float32)).to(bt.dtype)
        out = tl.dot(h_hi, bt, acc)
        out = tl.dot(h_lo, bt, out)
    return out


@triton.jit
def _expand_dot_kernel(
    # pointers
    h_ptr, b_ptr, ids_ptr, ranks_ptr, out_ptr,
    # sizes
    num_tokens, rank, h_out, num_adapters,
    # strides
    stride_ht, stride_hk, stride_hr,
    stride_be, stride_bo, stride_br,
    stride_idt, stride_idk,
    stride_ot, stride_oo,
    # meta-parameters
    TOP_K: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    """Semantics: as _expand_kernel (adapter e's columns r < r_e only; a zero-rank adapter is skipped), out[t, o] (+)= sum_{k: 0 <= e < N} sum_r lora_b[e, o, r] * h[t, k, r], but on
    tensor cores: the program walks the distinct adapters present in its BLOCK_M tokens in ascending id order,
    and for each adapter e does one tl.dot of hsum_e[m, :] = sum_{k: ids[m, k] == e} h[m, k, :] against
    lora_b[e]'s tile, kept only in the rows routed to e (the others would see 0 * B[e], NaN where B[e] is not
    finite). The walk order is fixed by the ids, so the result is deterministic; every out element is written
    once. h stays float32 (_dot_f32_rows). Needs BLOCK_R >= R (whole rank per tile).
    Grid: (cdiv(T, BLOCK_M), cdiv(H_out, BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_t = offs_t < num_tokens
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)

    # All ids of the tile; invalid slots (padding, -1, out of range) become N and are never visited.
    offs_k = tl.arange(0, K_POW2)
    ids2 = tl.load(
        ids_ptr + offs_t[:, None] * stride_idt + offs_k[None, :] * stride_idk,
        mask=mask_t[:, None] & (offs_k[None, :] < TOP_K), other=-1,
    ).to(tl.int64)
    ids2 = tl.where((ids2 >= 0) & (ids2 < num_adapters), ids2, num_adapters)

    h_rows = h_ptr + offs_t[:, None] * stride_ht + offs_r[None, :] * stride_hr  # [M, R]
    b_tile = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo  # [R, N], lora_b[e] transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    e = tl.min(ids2)
    while e < num_adapters:
        r_e = _rank_bound(ranks_ptr, e, e >= 0, rank, HAS_RANKS)
        if r_e > 0:
            mask_re = offs_r < r_e
            hsum = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in tl.static_range(TOP_K):
                k64 = tl.cast(k, tl.int64)
                ids_k = tl.load(ids_ptr + offs_t * stride_idt + k64 * stride_idk, mask=mask_t, other=-1).to(tl.int64)
                sel = mask_t & (ids_k == e)
                hsum += tl.load(h_rows + k64 * stride_hk, mask=sel[:, None] & mask_re[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_tile + e * stride_be, mask=mask_re[:, None] & mask_n[None, :], other=0.0)
            acc_e = _dot_f32_rows(hsum, bt, acc, UPCAST)
            # Rows not routed to e multiplied B[e] by h = 0, and 0 * NaN or 0 * Inf is NaN: they keep acc.
            routed = tl.max(tl.where(ids2 == e, 1, 0), axis=1) > 0
            acc = tl.where(routed[:, None], acc_e, acc)
        e = tl.min(tl.where(ids2 > e, ids2, num_adapters))

    _store_out_tile(out_ptr, acc, offs_t, offs_n, mask_t, mask_n, stride_ot, stride_oo, ACCUMULATE)


@triton.jit
def _expand_grouped_kernel(
    # pointers
    h_ptr, b_ptr, ids_ptr, sorted_pairs_ptr, seg_offsets_ptr, ranks_ptr, part_ptr,
    # sizes
    num_pairs, top_k, rank, h_out, num_adapters,
    # strides
    stride_ht, stride_hk, stride_hr,
    stride_be, stride_bo, stride_br,
    stride_idt, stride_idk,
    stride_pp, stride_po,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    """Semantics: part[p, o] = sum_{r < r_e} lora_b[e, o, r] * h[t, k, r] for each pair p = t*K + k that the plan
    lists in the segment of its own adapter e = ids[t, k]; other rows of part are untouched (give a zeroed part),
    and so are all rows of a zero-rank adapter (its programs return at once).
    A program owns BLOCK_M pairs of one adapter's segment x BLOCK_N output columns: it loads each lora_b[e]
    tile once for those pairs and multiplies the gathered float32 h rows on tensor cores (_dot_f32_rows),
    looping over R in BLOCK_R steps. Grid: (cdiv(P, BLOCK_M) + min(N, P), cdiv(H_out, BLOCK_N)), an upper
    bound on the segment tiles of any routing (shapes only); programs past the last tile return at once.
    The plan is not trusted, as in _shrink_kernel: bounds clamped, pairs outside [0, P) or filed under another
    adapter skipped."""
    tile_id = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, tile = _segment_tile(tile_id, seg_offsets_ptr, num_pairs, num_adapters, BLOCK_M, SCAN_BLOCK)
    if e < 0:
        return
    rank_e = _rank_bound(ranks_ptr, e, e >= 0, rank, HAS_RANKS)
    if rank_e == 0:
        return

    seg_start, seg_end = _segment_bounds(seg_offsets_ptr, e, num_pairs)
    offs_m = seg_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs, tokens, slots, keep = _segment_pairs(sorted_pairs_ptr, ids_ptr, offs_m, seg_end, e, num_pairs, top_k,
                                                stride_idt, stride_idk)

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out
    h_rows = h_ptr + tokens[:, None] * stride_ht + slots[:, None] * stride_hk  # [M, 1]
    b_tile = b_ptr + e.to(tl.int64) * stride_be + offs_n[None, :] * stride_bo  # [1, N]; lora_b[e] transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank_e, BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < rank_e
        hv = tl.load(h_rows + offs_r[None, :] * stride_hr, mask=keep[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_tile + offs_r[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _dot_f32_rows(hv.to(tl.float32), bt, acc, UPCAST)

    part_ptrs = part_ptr + pairs[:, None] * stride_pp + offs_n[None, :] * stride_po
    tl.store(part_ptrs, acc, mask=keep[:, None] & mask_n[None, :])


@triton.jit
def _expand_reduce_kernel(
    # pointers
    part_ptr, ids_ptr, out_ptr,
    # sizes
    num_tokens, h_out, num_adapters,
    # strides
    stride_pt, stride_pk, stride_po,
    stride_idt, stride_idk,
    stride_ot, stride_oo,
    # meta-parameters
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Semantics: out[t, o] = (out[t, o] if ACCUMULATE else 0) + sum_{k = 0..K-1: 0 <= ids[t, k] < N} part[t, k, o],
    summed in slot order in float32 and rounded once into out; partials of empty slots are never read.
    Grid: (cdiv(T, BLOCK_M), cdiv(H_out, BLOCK_N)). Every element of out is written exactly once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_t = offs_t < num_tokens
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        ids = tl.load(ids_ptr + offs_t * stride_idt + k * stride_idk, mask=mask_t, other=-1)
        valid = mask_t & (ids >= 0) & (ids < num_adapters)
        acc += tl.load(
            part_ptr + offs_t[:, None] * stride_pt + k * stride_pk + offs_n[None, :] * stride_po,
            mask=valid[:, None] & mask_n[None, :], other=0.0,
        )
    _store_out_tile(out_ptr, acc, offs_t, offs_n, mask_t, mask_n, stride_ot, stride_oo, ACCUMULATE)


# -------------------------------------------------------------------------------------------------- fused
@triton.jit
def _fused_kernel(
    # pointers
    x_ptr, a_ptr, b_ptr, ids_ptr, w_ptr, scale_ptr, ranks_ptr, out_ptr,
    # sizes
    num_tokens, top_k, rank, h_in, h_out, num_adapters,
    # strides
    stride_xt, stride_xh,
    stride_ae, stride_ar, stride_ah,
    stride_be, stride_bo, stride_br,
    stride_idt, stride_idk,
    stride_wt, stride_wk,
    stride_ot, stride_oo,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_RANKS: tl.constexpr,
):
    """Semantics: out[t, o] = (out[t, o] if ACCUMULATE else 0)
                  + sum_{k: 0 <= e < N} sum_{r < r_e} lora_b[e, o, r] * (w[t, k] * scale[e] * sum_h lora_a[e, r, h] * x[t, h]),
    e = ids[t, k]; h stays in float32 registers, slots are summed in order, one rounding into out.
    Grid: (cdiv(T, BLOCK_M), cdiv(H_out, BLOCK_N)); BLOCK_R >= R (the whole rank in one tile).
    The H_in loop is software-pipelined over NUM_STAGES stages (tl.range; 1: sequential): the loads of the next
    x and lora_a steps are issued while the current one is reduced. A slot whose tokens all have rank 0 (or are
    empty) skips the H_in loop."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_t = offs_t < num_tokens
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)

    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, top_k):
        k64 = tl.cast(k, tl.int64)
        ids = tl.load(ids_ptr + offs_t * stride_idt + k64 * stride_idk, mask=mask_t, other=-1).to(tl.int64)
        valid = mask_t & (ids >= 0) & (ids < num_adapters)
        ids = tl.where(valid, ids, 0)
        w = tl.load(w_ptr + offs_t * stride_wt + k64 * stride_wk, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        coef = tl.where(valid, w * s, 0.0)
        r_lim = _rank_bound(ranks_ptr, ids, valid, rank, HAS_RANKS)  # [M]; 0 for invalid slots
        mask_rr = offs_r[None, :] < r_lim[:, None]  # [M, R]

        # shrink: hk[m, r] = sum_h lora_a[e_m, r, h] * x[t_m, h]
        a_rows = a_ptr + ids[:, None, None] * stride_ae + offs_r[None, :, None] * stride_ar  # [M, R, 1]
        mask_a = mask_rr[:, :, None]
        hk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_steps = tl.where(tl.max(r_lim, axis=0) > 0, tl.cdiv(h_in, BLOCK_K), 0)  # no H_in steps when all r_e = 0
        for step in tl.range(0, n_steps, num_stages=NUM_STAGES):
            k0 = step * BLOCK_K
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = offs_k < h_in
            xv = tl.load(x_rows + offs_k[None, :] * stride_xh, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            av = tl.load(a_rows + offs_k[None, None, :] * stride_ah, mask=mask_a & mask_k[None, None, :], other=0.0)
            hk += tl.sum(av.to(tl.float32) * xv.to(tl.float32)[:, None, :], axis=2)
        hk = hk * coef[:, None]

        # expand: acc[m, o] += sum_r lora_b[e_m, o, r] * hk[m, r]
        b_ptrs = (
            b_ptr + ids[:, None, None] * stride_be + offs_n[None, :, None] * stride_bo
            + offs_r[None, None, :] * stride_br
        )
        mask_b = mask_rr[:, None, :] & mask_n[None, :, None]
        bv = tl.load(b_ptrs, mask=mask_b, other=0.0)
        acc += tl.sum(bv.to(tl.float32) * hk[:, None, :], axis=2)

    _store_out_tile(out_ptr, acc, offs_t, offs_n, mask_t, mask_n, stride_ot, stride_oo, ACCUMULATE)


# ---------------------------------------------------------------------------------------------- launchers
def _ranks_arg(ranks, fallback):
    """(pointer argument, HAS_RANKS): the int32 [N] ranks, or any tensor as a never-read placeholder."""
    return (fallback, False) if ranks is None else (ranks, True)


def launch_shrink(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, out, *, top_k: int,
                  cfg: ShrinkConfig, apply_coef: bool, use_atomic: bool, upcast: bool, ranks=None) -> None:
    """Launch _shrink_kernel. `out` is [SPLIT_K, P, R] float32 partials (apply_coef=False) or the [P, R]
    float32 h (apply_coef=True; with use_atomic the splits are added into it). Rows of pairs the plan does
    not list under their adapter topk_ids[t, k], and columns r >= ranks[e], are not written: give a zeroed `out`
    so they read as empty."""
    num_pairs, num_adapters, rank, h_in = sorted_pairs.shape[0], lora_a.shape[0], lora_a.shape[1], x.shape[1]
    stride_os, stride_op, stride_or = (out.stride() if out.dim() == 3 else (0,) + out.stride())
    # Upper bound on the number of segment tiles for any routing: sum_e cdiv(len_e, BLOCK_M) with at most
    # min(N, P) non-empty segments.
    max_tiles = cdiv(num_pairs, cfg.BLOCK_M) + min(num_adapters, num_pairs)
    grid = (max_tiles, cfg.SPLIT_K * cdiv(rank, cfg.BLOCK_R))
    ranks_ptr, has_ranks = _ranks_arg(ranks, seg_offsets)
    _shrink_kernel[grid](
        x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, ranks_ptr, out,
        num_pairs, top_k, rank, h_in, cfg.k_per_split(h_in), num_adapters,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        topk_ids.stride(0), topk_ids.stride(1),
        topk_weights.stride(0), topk_weights.stride(1),
        stride_os, stride_op, stride_or,
        BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K,
        SCAN_BLOCK=scan_block(num_adapters), APPLY_COEF=apply_coef, USE_ATOMIC=use_atomic, UPCAST=upcast,
        HAS_RANKS=has_ranks, num_warps=cfg.num_warps,
    )


def launch_shrink_reduce(partials, topk_ids, topk_weights, scale, h, *, num_adapters: int, ranks=None) -> None:
    """Launch _shrink_reduce_kernel: partials [SPLIT_K, P, R] float32 -> h [P, R] float32 (fully written)."""
    split_k, num_pairs, rank = partials.shape
    block_p, block_r = reduce_config(rank)
    ranks_ptr, has_ranks = _ranks_arg(ranks, topk_ids)
    _shrink_reduce_kernel[(cdiv(num_pairs, block_p),)](
        partials, topk_ids, topk_weights, scale, ranks_ptr, h,
        num_pairs, topk_ids.shape[1], rank, num_adapters,
        partials.stride(0), partials.stride(1), partials.stride(2),
        topk_ids.stride(0), topk_ids.stride(1),
        topk_weights.stride(0), topk_weights.stride(1),
        h.stride(0), h.stride(1),
        BLOCK_P=block_p, BLOCK_R=block_r, SPLIT_K=split_k, HAS_RANKS=has_ranks,
    )


def launch_expand(h, lora_b, topk_ids, out, *, cfg: GatherConfig, accumulate: bool, ranks=None) -> None:
    """Launch _expand_kernel: h [T, K, R] (any float dtype, any strides) into out [T, H_out]."""
    num_tokens, top_k, rank = h.shape
    num_adapters, h_out = lora_b.shape[0], lora_b.shape[1]
    grid = (cdiv(num_tokens, cfg.BLOCK_M), cdiv(h_out, cfg.BLOCK_N))
    ranks_ptr, has_ranks = _ranks_arg(ranks, topk_ids)
    _expand_kernel[grid](
        h, lora_b, topk_ids, ranks_ptr, out,
        num_tokens, top_k, rank, h_out, num_adapters,
        h.stride(0), h.stride(1), h.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        topk_ids.stride(0), topk_ids.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R, ACCUMULATE=accumulate,
        HAS_RANKS=has_ranks, num_warps=cfg.num_warps,
    )


def launch_expand_dot(h, lora_b, topk_ids, out, *, cfg: GatherConfig, accumulate: bool, upcast: bool,
                      ranks=None) -> None:
    """Launch _expand_dot_kernel (tensor-core expand over the distinct adapters of each token tile)."""
    num_tokens, top_k, rank = h.shape
    num_adapters, h_out = lora_b.shape[0], lora_b.shape[1]
    if cfg.BLOCK_R < rank:
        raise ValueError(f"dot expand needs BLOCK_R >= R, got BLOCK_R={cfg.BLOCK_R} and R={rank}")
    grid = (cdiv(num_tokens, cfg.BLOCK_M), cdiv(h_out, cfg.BLOCK_N))
    ranks_ptr, has_ranks = _ranks_arg(ranks, topk_ids)
    _expand_dot_kernel[grid](
        h, lora_b, topk_ids, ranks_ptr, out,
        num_tokens, rank, h_out, num_adapters,
        h.stride(0), h.stride(1), h.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        topk_ids.stride(0), topk_ids.stride(1),
        out.stride(0), out.stride(1),
        TOP_K=top_k, K_POW2=max(2, 1 << (top_k - 1).bit_length()),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R,
        ACCUMULATE=accumulate, UPCAST=upcast, HAS_RANKS=has_ranks, num_warps=cfg.num_warps,
    )


def launch_expand_grouped(h, lora_b, topk_ids, sorted_pairs, seg_offsets, out, *, cfg: GroupedExpandConfig,
                          accumulate: bool, upcast: bool, ranks=None) -> None:
    """The adapter-grouped expand: h [T, K, R] float32 (any strides) into out [T, H_out], in column chunks of
    cfg.CHUNK_N. Per chunk, _expand_grouped_kernel writes per-pair float32 partials [T, K, CHUNK_N] (one
    program per segment tile x column tile) and _expand_reduce_kernel sums them over k in slot order into out.

    Trade-off (why partials, and why chunks): the pairs of one token lie in different adapter segments, so a
    program that reads B[e] once per segment tile cannot own a token's output row; writing partials keeps
    every element owned by one program and the k sum in a fixed order (deterministic, no atomics), at the
    cost of 2 x P x H_out x 4 bytes of partial traffic. Chunking H_out bounds that workspace to
    P x CHUNK_N x 4 bytes (configs.GROUPED_EXPAND_PARTIAL_BYTES, sized to stay resident in L2) whatever H_out is,
    and B is still read once per segment tile (each chunk reads its own columns); the price is
    2 x cdiv(H_out, CHUNK_N) launches, a count fixed by shapes (CUDA-graph safe). The workspace is zeroed per
    chunk so that pairs a stale plan misses read as empty slots, never as stale memory."""
    num_tokens, top_k, rank = h.shape
    num_pairs, num_adapters, h_out = num_tokens * top_k, lora_b.shape[0], lora_b.shape[1]
    chunk = min(cfg.CHUNK_N, h_out)
    part = torch.empty(num_tokens, top_k, chunk, dtype=torch.float32, device=h.device)
    part_rows = part.view(num_pairs, chunk)
    grid_m = cdiv(num_pairs, cfg.BLOCK_M) + min(num_adapters, num_pairs)
    ranks_ptr, has_ranks = _ranks_arg(ranks, seg_offsets)
    for n0 in range(0, h_out, chunk):
        n = min(chunk, h_out - n0)
        b, o = lora_b[:, n0 : n0 + n], out[:, n0 : n0 + n]
        part.zero_()
        _expand_grouped_kernel[(grid_m, cdiv(n, cfg.BLOCK_N))](
            h, b, topk_ids, sorted_pairs, seg_offsets, ranks_ptr, part_rows,
            num_pairs, top_k, rank, n, num_adapters,
            h.stride(0), h.stride(1), h.stride(2),
            b.stride(0), b.stride(1), b.stride(2),
            topk_ids.stride(0), topk_ids.stride(1),
            part_rows.stride(0), part_rows.stride(1),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R, SCAN_BLOCK=scan_block(num_adapters),
            UPCAST=upcast, HAS_RANKS=has_ranks, num_warps=cfg.num_warps,
        )
        _expand_reduce_kernel[(cdiv(num_tokens, cfg.REDUCE_M), cdiv(n, cfg.BLOCK_N))](
            part, topk_ids, o,
            num_tokens, n, num_adapters,
            part.stride(0), part.stride(1), part.stride(2),
            topk_ids.stride(0), topk_ids.stride(1),
            o.stride(0), o.stride(1),
            TOP_K=top_k, BLOCK_M=cfg.REDUCE_M, BLOCK_N=cfg.BLOCK_N, ACCUMULATE=accumulate,
        )


def launch_fused(x, lora_a, lora_b, topk_ids, topk_weights, scale, out, *, cfg: GatherConfig, accumulate: bool,
                 ranks=None) -> None:
    """Launch _fused_kernel: routed LoRA of x into out [T, H_out] in one launch (cfg.BLOCK_R >= R; its H_in loop
    pipelined over cfg.num_stages)."""
    num_tokens, h_in = x.shape
    num_adapters, rank, h_out = lora_a.shape[0], lora_a.shape[1], lora_b.shape[1]
    if cfg.BLOCK_R < rank:
        raise ValueError(f"fused kernel needs BLOCK_R >= R, got BLOCK_R={cfg.BLOCK_R} and R={rank}")
    grid = (cdiv(num_tokens, cfg.BLOCK_M), cdiv(h_out, cfg.BLOCK_N))
    ranks_ptr, has_ranks = _ranks_arg(ranks, topk_ids)
    _fused_kernel[grid](
        x, lora_a, lora_b, topk_ids, topk_weights, scale, ranks_ptr, out,
        num_tokens, topk_ids.shape[1], rank, h_in, h_out, num_adapters,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        topk_ids.stride(0), topk_ids.stride(1),
        topk_weights.stride(0), topk_weights.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K,
        NUM_STAGES=cfg.num_stages, ACCUMULATE=accumulate, HAS_RANKS=has_ranks, num_warps=cfg.num_warps,
    )

"""The per-forward routing runtime: one routing decision prepared once and applied by every patched layer.

Semantics are routed_lora's (stated once in molora_ops/reference.py): for e = topk_ids[t, k] != -1,
    shrink:  h[t, k] = topk_weights[t, k] * lora_a[e] @ x[t]                    (no scaling)
    expand_: out[t] += sum_k scale[e] * lora_b[e] @ h[t, k, rank_slice]
    add_:    out[t] += sum_k topk_weights[t, k] * scale[e] * lora_b[e] @ lora_a[e] @ x[t]
with float32 accumulation (float64 for float64 inputs) rounded once into `out`; empty slots (and ids outside
[0, N) when validation is off) add nothing, whatever x, the adapters or the slot's weight hold.

A :class:`RoutedBatch` is built once per forward. It validates the routing, resolves the backend and builds the
routing plan once for the backend path (elsewhere on first use: only ``grouped`` and the registered ops read it),
and on CPU with the torch backend it reads a small routing once on the host, picks a strategy and prepares only
that strategy's index tensors and coefficients (on the first call that needs them). A layer's call then takes one of four paths, chosen per call:
  * ``ops``: when autograd must see the call (grad mode on and an input or ``out`` requires grad), or while
    torch.compile traces off the CPU torch path: the registered ``torch.ops.molora.*`` ops with the plan tensors
    (differentiable, traceable without graph breaks; under autograd the functional form with ``base=out``, then
    ``out.copy_``).
  * a traced strategy (built while torch.compile traces, torch backend on CPU, no grad needed), static shapes, no
    plan: ``traced_fused`` (the C++ kernels of impl/cpu_fused.py as opaque custom ops with fake implementations)
    where they are loaded; else plain torch ops that inductor fuses, ``traced_gather`` (per (token, slot) weight
    gather) for few pairs, ``traced_dense`` (every adapter, one GEMM each side) otherwise; the rule is
    :func:`choose_traced_strategy`.
  * ``backend``: eager, no grad, tensors not on CPU (or a non-torch backend): the backend module's device
    functions (molora_ops/impl) called directly with the prepared plan and scale; no validation, no dispatch,
    no host sync (the torch backend on a GPU syncs in its own segment listing; use triton or cuda there).
  * a CPU strategy (eager, no grad, torch backend on CPU), fixed at build:
      - ``rows``: one adapter per sequence (:meth:`RoutedBatch.for_sequences`): runs of consecutive rows that
        share an adapter, ``out[rows].addmm_(x[rows] @ A[e].T, B[e].T)``; no gathers, no index_add. At prefill
        with every sequence routed and more than one thread, one bmm per side over [B, seq_len, H] instead
        (:func:`_batched_rows_pay`).
      - ``per_adapter``: few (adapter, token) pairs: one matmul pair per pair, the routing weight (a host float
        read once at build) as the second GEMM's alpha.
      - ``dense``: most adapters active in a small batch: one GEMM over every adapter's A ([N * R, H_in]), a
        [T, N, 1] coefficient, one GEMM with B laid out [N * R, H_out] (cached per weight tensor).
      - ``grouped``: otherwise (prefill), and at every size where the C++ kernels are loaded: pairs ordered
        (adapter, slot, token); when they form long runs of consecutive tokens (routing constant over stretches
        of a sequence), one matmul pair per run on row slices of x and out; else the C++ kernels
        (impl/cpu_fused.py: no [pairs, H] buffers, parallel over the intra-op threads), or without them tokens
        gathered once, then either each active adapter's pairs padded to one length (one bmm per side,
        :class:`_Padded`, with more than one thread while padding adds at most ``_PAD_WASTE`` of the pairs:
        :func:`_padding_pays`) or one matmul pair per active adapter; one index_add.
    The rule is :func:`choose_strategy`; the numbers it comes from are in its docstring. ``_FUSED = False`` turns
    the kernels off (tests, benchmarks).

Heterogeneous ranks: shrink, expand_ and add_ take ``ranks`` (None, or the int32 [N] real ranks of the stacked
weights, see molora_ops.ops). The backend and ops paths pass it on (the kernels bound their rank loops by it); the
per_adapter and grouped strategies (and the C++ kernels) bound each adapter's GEMMs by its rank (a zero-rank
adapter costs no GEMM); rows, dense, the padded layout and the other traced strategies compute over the padded
rank, which is exact because the stored padding is zero.

Low-precision inputs on CPU are computed in float32 from float32 copies of the weights (cached per weight tensor,
like the dense B layout, and keyed by the tensor's identity, version and data pointer so a changed weight is never
served stale; inference tensors have no version and are not cached), then rounded once into ``out``.
"""

from __future__ import annotations

import array
import weakref
from typing import Callable, Optional

import torch

from . import impl as _backends
from ._validation import can_read_ids, check_autograd_out, check_routing
from .impl import cpu_fused
from .plan import RoutingPlan, build_plan

__all__ = ["RoutedBatch", "RankSpace", "choose_strategy", "choose_traced_strategy"]

Tensor = torch.Tensor
STRATEGIES = ("rows", "per_adapter", "grouped", "dense")
TRACED_STRATEGIES = ("traced_gather", "traced_dense", "traced_fused")


# ------------------------------------------------------------------------------------------- weight cache
class _DerivedCache:
    """Values derived from a tensor (a float32 copy, a re-laid-out B, a finiteness flag), keyed by
    (id(tensor), kind) and served only while the entry's weak reference still points at that tensor with the
    same version counter and data pointer. Entries go when their tensor is freed."""

    def __init__(self) -> None:
        self._entries: dict = {}

    def get(self, t: Tensor, kind: str, make: Callable[[], object]):
        if t.is_inference():  # no version counter: an in-place change could not be seen
            return make()
        key = (id(t), kind)
        entry = self._entries.get(key)
        stamp = (t._version, t.data_ptr())
        if entry is not None and entry[0]() is t and entry[1] == stamp:
            return entry[2]
        value = make()
        self._entries[key] = (weakref.ref(t, lambda _, k=key: self._entries.pop(k, None)), stamp, value)
        return value


_CACHE = _DerivedCache()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t: Tensor, dtype: torch.dtype, cache: bool = True) -> Tensor:
    """t in `dtype`; the cast of a weight (cache=True) is made once per tensor version, not per call (while
    torch.compile traces, a graph op)."""
    if t.dtype == dtype:
        return t
    if torch.compiler.is_compiling():
        return t.to(dtype)
    return _CACHE.get(t, f"as-{dtype}", lambda: t.to(dtype)) if cache else t.to(dtype)


def _all_finite(t: Tensor) -> bool:
    return _CACHE.get(t, "finite", lambda: bool(torch.isfinite(t).all()))


def _dense_a(a: Tensor) -> Tensor:
    """lora_a [N, R, H_in] as the [H_in, N * R] operand of one shrink GEMM over every adapter (a view of a
    detached alias when a is contiguous); cached per weight tensor."""
    return _CACHE.get(a, "dense-a", lambda: a.detach().reshape(a.shape[0] * a.shape[1], a.shape[2]).t())


def _dense_b(b: Tensor) -> Optional[Tensor]:
    """lora_b [N, H_out, R] laid out [N * R, H_out] (contiguous), or None when b holds a non-finite value;
    cached per weight tensor."""

    def make():
        return b.transpose(1, 2).reshape(-1, b.shape[1]).contiguous() if bool(torch.isfinite(b).all()) else None

    return _CACHE.get(b, "dense-b", make)


def _host_list(t: Tensor) -> list:
    return _CACHE.get(t, "list", t.tolist)


def _a_views(a: Tensor) -> list:
    """lora_a [N, R, H_in] as N views A[e].T [H_in, R] (an mm operand as is: no per-call select/transpose ops);
    cached per weight tensor. Taken from a detached alias, so the cache never keeps `a` itself alive."""
    return _CACHE.get(a, "a-views", lambda: [m.t() for m in a.detach().unbind(0)])


def _b_views(b: Tensor) -> list:
    """lora_b [N, H_out, R] as N contiguous B[e].T [R, H_out] (faster than the transposed view as the second
    operand of a 1-8 row addmm); cached per weight tensor."""
    return _CACHE.get(b, "b-views", lambda: list(b.detach().transpose(1, 2).contiguous().unbind(0)))


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _as_slice(rank_slice) -> Optional[slice]:
    if rank_slice is None or isinstance(rank_slice, slice):
        return rank_slice
    start, stop = rank_slice
    return slice(start, stop)


# -------------------------------------------------------------------------------------- the rank space
class RankSpace:
    """The opaque result of :meth:`RoutedBatch.shrink`, consumed by :meth:`RoutedBatch.expand_`.

    layout: "ops" ([T, K, R] float32 from the registered shrink op), "backend" (the same, from a backend module)
    or a CPU strategy name (that strategy's own layout). x, lora_a and the ranks the shrink was bounded by are kept
    so that an expand which must be differentiable can recompute an "ops" h from a fast-path one.
    """

    __slots__ = ("layout", "data", "x", "lora_a", "ranks")

    def __init__(self, layout: str, data, x: Tensor, lora_a: Tensor, ranks: Optional[Tensor] = None) -> None:
        self.layout, self.data, self.x, self.lora_a, self.ranks = layout, data, x, lora_a, ranks


# ------------------------------------------------------------------------------------------ CPU strategies
# Each strategy works in the compute dtype cd (float32, float64 for float64 inputs): x, A and B arrive in cd and
# `acc` is the [T, H_out] cd tensor to add into (out itself when out.dtype == cd). `scale` is None (1) or the
# caller's [N] tensor; strategies that scale a GEMM's alpha read it as a host list (cached per tensor version).
def _alphas(scale: Optional[Tensor]) -> Optional[list]:
    return None if scale is None else _host_list(scale)


def _bound_kw(strategy, ranks: Optional[Tensor]) -> dict:
    """The `ranks` keyword for a strategy that bounds its GEMMs by them; the others compute the zero padding."""
    return {"ranks": ranks} if ranks is not None and getattr(strategy, "bounded", False) else {}


def _bounds(ranks: Optional[Tensor], num_adapters: int, rank: int) -> list:
    """Each adapter's rank as a host list (cached per tensor version): ranks, or [rank] * N when None."""
    return [rank] * num_adapters if ranks is None else _host_list(ranks)


class _Rows:
    """Runs (e, start, stop) of consecutive rows that all use adapter e with weight 1.

    seqs: None, or (seq_ids [B] int64, seq_len) when every one of B > 1 sequences of seq_len rows is routed and
    the runs are more than one (:func:`_batched_rows_pay`): then x is viewed [B, seq_len, H_in] and each side is one
    bmm against the sequences' gathered weights (B's rows scaled per sequence), which splits over the intra-op
    threads where a matmul pair per run does not (a [~256, 16] @ [16, H_out] addmm_ on a row slice runs on one)."""

    def __init__(self, runs: list, num_tokens: int, seqs: Optional[tuple] = None):
        self.runs, self.seqs = runs, seqs
        self.whole = len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == num_tokens

    def shrink(self, x, a):
        if self.seqs is not None:
            seq_ids, seq_len = self.seqs
            at = a.detach().index_select(0, seq_ids).transpose(1, 2)  # [B, H_in, R]
            return torch.bmm(x.reshape(seq_ids.shape[0], seq_len, x.shape[1]), at).view(x.shape[0], a.shape[1])
        at = _a_views(a)
        if self.whole:
            return torch.mm(x, at[self.runs[0][0]])
        h = x.new_empty(x.shape[0], a.shape[1])
        for e, lo, hi in self.runs:
            torch.mm(x[lo:hi], at[e], out=h[lo:hi])
        return h

    def expand_(self, h, b, acc, scale):
        if self.seqs is not None and acc.is_contiguous():
            seq_ids, seq_len = self.seqs
            bt = _b_stack(b).index_select(0, seq_ids)  # [B, R, H_out], a fresh copy
            if scale is not None:
                bt.mul_(_as(scale, bt.dtype).index_select(0, seq_ids).view(-1, 1, 1))
            acc.view(seq_ids.shape[0], seq_len, acc.shape[1]).baddbmm_(h.view(seq_ids.shape[0], seq_len, -1), bt)
            return
        alphas, bt = _alphas(scale), _b_views(b)
        if self.whole:
            e = self.runs[0][0]
            acc.addmm_(h, bt[e], alpha=alphas[e] if alphas else 1.0)
            return
        for e, lo, hi in self.runs:
            acc[lo:hi].addmm_(h[lo:hi], bt[e], alpha=alphas[e] if alphas else 1.0)

    def add_(self, x, a, b, acc, scale):
        self.expand_(self.shrink(x, a), b, acc, scale)


class _PerAdapter:
    """Pairs (e, t, c): token t uses adapter e with coefficient c (a host float; duplicate slots summed), one
    matmul pair per pair with c (times scale[e]) as the expand's alpha. With one token (decode batch 1) x and
    out are used whole, without per-pair row views."""

    bounded = True  # its methods take `ranks` and cut each adapter's views to its rank

    def __init__(self, pairs: list, num_tokens: int):
        self.pairs, self.single = pairs, num_tokens == 1

    def shrink(self, x, a, ranks=None):
        at, bound = _a_views(a), _bounds(ranks, a.shape[0], a.shape[1])
        if self.single:
            return [torch.mm(x, at[e][:, : bound[e]]) for e, _, _ in self.pairs]
        return [torch.mm(x[t : t + 1], at[e][:, : bound[e]]) for e, t, _ in self.pairs]

    def expand_(self, h, b, acc, scale, ranks=None):
        alphas, bt, bound = _alphas(scale), _b_views(b), _bounds(ranks, b.shape[0], b.shape[2])
        for (e, t, c), hp in zip(self.pairs, h):
            r = bound[e]
            if r == 0:
                continue
            row = acc if self.single else acc[t : t + 1]
            row.addmm_(hp[:, :r], bt[e][:r], alpha=c * alphas[e] if alphas else c)

    def add_(self, x, a, b, acc, scale, ranks=None):
        self.expand_(self.shrink(x, a, ranks), b, acc, scale, ranks)


class _Grouped:
    """Routed pairs in plan order: tokens [P] int64, coefficients [P, 1] and segments (e, lo, hi).

    runs: None, or (e, lo, hi, t) for each maximal range of plan positions lo..hi-1 of adapter e whose tokens
    are t..t+hi-lo-1 (consecutive). When given, every matmul reads x and writes out through row slices
    (x[t:t+n] @ A[e].T, out[t:t+n].addmm_): no gather, no [P, H_out] buffer, no index_add."""

    bounded = True  # its methods take `ranks` and cut each adapter's views to its rank

    def __init__(self, tokens: Tensor, coef: Tensor, segments: list, runs: Optional[list] = None):
        self.tokens, self.coef, self.segments, self.runs = tokens, coef, segments, runs

    def shrink(self, x, a, ranks=None):
        """[P, R] rows in plan order; with ranks, columns r >= ranks[e] are 0 and never computed."""
        at, bound = _a_views(a), _bounds(ranks, a.shape[0], a.shape[1])
        num_pairs, rank = self.tokens.shape[0], a.shape[1]
        h = x.new_empty(num_pairs, rank) if ranks is None else x.new_zeros(num_pairs, rank)
        if self.runs is not None:
            for e, lo, hi, t in self.runs:
                torch.mm(x[t : t + hi - lo], at[e][:, : bound[e]], out=h[lo:hi, : bound[e]])
            return h.mul_(self.coef)
        xg = x.index_select(0, self.tokens)
        for e, lo, hi in self.segments:
            torch.mm(xg[lo:hi], at[e][:, : bound[e]], out=h[lo:hi, : bound[e]])
        return h.mul_(self.coef)

    def expand_(self, h, b, acc, scale, ranks=None):
        alphas, bt, bound = _alphas(scale), _b_views(b), _bounds(ranks, b.shape[0], b.shape[2])
        if self.runs is not None:
            for e, lo, hi, t in self.runs:
                r = bound[e]
                if r:
                    acc[t : t + hi - lo].addmm_(h[lo:hi, :r], bt[e][:r], alpha=alphas[e] if alphas else 1.0)
            return
        y = h.new_empty(h.shape[0], b.shape[1])
        for e, lo, hi in self.segments:
            r = bound[e]
            if alphas:
                torch.addmm(y[lo:hi], h[lo:hi, :r], bt[e][:r], beta=0, alpha=alphas[e], out=y[lo:hi])
            else:
                torch.mm(h[lo:hi, :r], bt[e][:r], out=y[lo:hi])
        acc.index_add_(0, self.tokens, y)

    def add_(self, x, a, b, acc, scale, ranks=None):
        self.expand_(self.shrink(x, a, ranks), b, acc, scale, ranks)


def _b_stack(b: Tensor) -> Tensor:
    """lora_b [N, H_out, R] as a contiguous [N, R, H_out] (the second bmm operand); cached per weight tensor."""
    return _CACHE.get(b, "b-stack", lambda: b.detach().transpose(1, 2).contiguous())


class _Padded:
    """The grouped pairs as one padded batch: each of the Na active adapters' pairs (plan order) padded to a common
    length M (a multiple of 16). idx [Na, M] int32: the token of each row (padding rows read token 0); coef
    [Na, M, 1] (0 in padding rows); pad [Na, M, 1] bool; adapters [Na] int64, or None when every adapter is active.
    One index_select, one bmm per side and one index_add, whatever Na; padding rows add nothing to token 0: their
    coefficient is 0, and they are set to exactly 0 after the shrink when x[0] or A holds a non-finite value (after
    the expand when B does). add_ folds the per-adapter scale into the shrink's coefficients (a [Na, M, 1] product)
    instead of scaling h. Every op here runs in parallel regions, so the layout keeps their number low.

    idx is int32 on purpose: ATen's index_add_ takes a sort-based scatter path for an int64 index, ~10 parallel
    regions per call, and a serial loop over the rows for int32. Alone at 1 thread the loop is 1.4-2x slower
    (0.2 vs 0.1 ms at [2048, 512]), but this layout runs with more than one thread, where on this 2-core shared
    machine every parallel region waits for a busy core (int64: 116 ms per call at load 3.6, int32 0.2-0.6 ms)."""

    def __init__(self, idx: Tensor, coef: Tensor, pad: Tensor, adapters: Optional[Tensor]):
        self.idx, self.coef, self.pad, self.adapters = idx, coef, pad, adapters
        self.padded = bool(pad.any())

    def _pick(self, w: Tensor) -> Tensor:
        return w if self.adapters is None else w[self.adapters]

    def shrink(self, x, a, coef: Optional[Tensor] = None):
        """[Na, M, R] rows times coef (default self.coef)."""
        na, m = self.idx.shape
        xg = x.index_select(0, self.idx.view(-1)).view(na, m, x.shape[1])
        h = torch.bmm(xg, self._pick(a).transpose(1, 2)).mul_(self.coef if coef is None else coef)
        if self.padded and not (_all_finite(a) and bool(torch.isfinite(x[0]).all())):
            h.masked_fill_(self.pad, 0)
        return h

    def expand_(self, h, b, acc, scale):
        if scale is not None:
            h = h * self._pick(_as(scale, h.dtype)).view(-1, 1, 1)
        y = torch.bmm(h, self._pick(_b_stack(b)))
        if self.padded and not _all_finite(b):
            y.masked_fill_(self.pad, 0)
        acc.index_add_(0, self.idx.view(-1), y.view(-1, y.shape[2]))

    def add_(self, x, a, b, acc, scale):
        coef = None if scale is None else self.coef * self._pick(_as(scale, self.coef.dtype)).view(-1, 1, 1)
        self.expand_(self.shrink(x, a, coef), b, acc, None)


def _padded(tokens: Tensor, coef: Tensor, segments: list, num_adapters: int) -> _Padded:
    """The _Padded layout of the grouped strategy's tokens [P], coef [P, 1] and segments (e, lo, hi)."""
    na = len(segments)
    m = -(-max((hi - lo for _, lo, hi in segments), default=0) // 16) * 16
    rows = torch.tensor([j * m + i for j, (_, lo, hi) in enumerate(segments) for i in range(hi - lo)], dtype=torch.long)
    idx = torch.zeros(na * m, dtype=torch.int32).index_copy_(0, rows, tokens.int())
    padded_coef = coef.new_zeros(na * m, 1).index_copy_(0, rows, coef)
    pad = torch.ones(na * m, 1, dtype=torch.bool).index_fill_(0, rows, False)
    adapters = None if na == num_adapters else torch.tensor([e for e, _, _ in segments], dtype=torch.long)
    return _Padded(idx.view(na, m), padded_coef.view(na, m, 1), pad.view(na, m, 1), adapters)


def _padding_pays(segments: list, threads: int) -> bool:
    """Whether the grouped pairs (no row-slice runs) take the padded layout: with more than one intra-op thread,
    while padding adds at most _PAD_WASTE of the pairs.

    Measured in the model (bench/runtime_model.py prefill 4x256, per-token top-2, N 8, R 16, ~12% padding;
    torch 2.13 CPU, 2-core shared x86_64, interleaved medians, time / base): 2 threads padded 1.18x / 1.23x /
    1.36x against one matmul pair per adapter 1.41x / 1.23x / 1.52x (three runs); 1 thread padded 1.20x / 1.23x
    against 1.18x / 1.20x. The work is the same; one bmm splits whole matrices over the threads, while the
    per-adapter [~256, 16] products parallelize poorly."""
    num_pairs = sum(hi - lo for _, lo, hi in segments)
    m = -(-max((hi - lo for _, lo, hi in segments), default=0) // 16) * 16
    return threads > 1 and num_pairs > 0 and len(segments) * m - num_pairs <= _PAD_WASTE * num_pairs


def _slot_major(pairs: Tensor, ids: Tensor, top_k: int) -> Tensor:
    """The plan's pairs (t * K + k, grouped by adapter) reordered (adapter, slot, token): a sequence that routes
    one adapter from two slots gives two runs of consecutive tokens, not alternating ones. ids [T, K] int64."""
    if pairs.numel() == 0:
        return pairs
    num_tokens = ids.shape[0]
    key = (ids.reshape(-1)[pairs] * top_k + pairs % top_k) * num_tokens + pairs // top_k
    return pairs[key.argsort()]


def _token_runs(tokens: Tensor, offsets: list, min_len: int) -> Optional[list]:
    """(e, lo, hi, t) for the maximal ranges of plan positions within one adapter's segment (offsets [N + 1])
    whose tokens are consecutive, or None when they average fewer than min_len pairs (gather and index_add pay
    there). tokens [P] int64 in plan order."""
    num_pairs = tokens.shape[0]
    if num_pairs == 0:
        return None
    breaks = torch.ones(num_pairs, dtype=torch.bool)
    breaks[1:] = tokens[1:] != tokens[:-1] + 1
    breaks[torch.tensor([o for o in offsets[1:-1] if o < num_pairs], dtype=torch.long)] = True
    starts = breaks.nonzero()[:, 0]
    if starts.shape[0] * min_len > num_pairs:
        return None
    lows, firsts = starts.tolist(), tokens[starts].tolist()
    highs = lows[1:] + [num_pairs]
    adapter_of = [e for e in range(len(offsets) - 1) for _ in range(offsets[e + 1] - offsets[e])]
    return [(adapter_of[lo], lo, hi, t) for lo, hi, t in zip(lows, highs, firsts)]


class _Dense:
    """Every adapter computed for every token, weighted by coef [T, N, 1] (0 where e is not among t's slots).

    routed [T, N, 1] bool marks the (token, adapter) pairs that are routed; `select` (some token has no routed slot)
    makes the shrink select instead of multiply, so a non-finite x row or A of an unrouted pair adds nothing. A
    non-finite B takes the per-adapter fallback in expand_ (0 * NaN in the GEMM would reach every token)."""

    def __init__(self, coef: Tensor, routed: Tensor, select: bool):
        self.coef, self.routed, self.select = coef, routed, select
        self._fallback = None

    def shrink(self, x, a):
        h = torch.mm(x, _dense_a(a)).view(x.shape[0], a.shape[0], a.shape[1])
        if self.select or not _all_finite(a):
            return torch.where(self.routed, h * self.coef, torch.zeros((), dtype=h.dtype))
        return h.mul_(self.coef)

    def expand_(self, h, b, acc, scale, own_h: bool = False):
        """own_h: h is this call's own (add_), so scale may multiply it in place."""
        if scale is not None:
            s = _as(scale, h.dtype).view(1, -1, 1)
            h = h.mul_(s) if own_h else h * s
        flat = _dense_b(b)
        if flat is not None:
            acc.addmm_(h.reshape(h.shape[0], h.shape[1] * h.shape[2]), flat)
            return
        for e, rows in self._rows_per_adapter():
            acc.index_add_(0, rows, h[rows, e] @ b[e].t())

    def add_(self, x, a, b, acc, scale):
        self.expand_(self.shrink(x, a), b, acc, scale, own_h=True)

    def _rows_per_adapter(self) -> list:
        if self._fallback is None:
            routed = self.routed[:, :, 0]
            self._fallback = [(e, routed[:, e].nonzero()[:, 0]) for e in range(routed.shape[1]) if routed[:, e].any()]
        return self._fallback


def choose_strategy(num_tokens: int, num_adapters: int, num_active: int, num_pairs: int) -> str:
    """The CPU strategy for top-k routing where the C++ kernels (impl/cpu_fused.py) are not loaded: num_pairs
    distinct routed (token, adapter) pairs, num_active adapters with at least one.

    Where they are loaded, RoutedBatch takes grouped (which runs them unless its pairs form long runs of
    consecutive tokens) at every size, without summarising the routing: us per add_ at H 512 -> 1376, R 16, N 8,
    top-2, float32, 1 thread (2-core AMD EPYC, torch 2.13, warm weights, medians of 300; the base projection
    beside it):
        T:            1     2     4     8     16    32    64    128
        base          62    113   143   197   303   529   981   1924
        kernels       19    28    47    62    94    118   203   326
        per_adapter   21    45    85    164   324   670   1345  2688
        dense         30    46    56    77    118   189   353   659
        grouped[torch]37    50    76    98    144   175   235   355
    They read only the routed adapters' weights, once per call, where dense reads all N.

    Without them:

    Measured by bench/runtime_strategies.py (H 512, R 16, N 8, float32, 1 thread, AMD EPYC shared by others,
    torch 2.13; us per add_, interleaved medians; the base projection x @ W.T is 25-37 us at T = 1, 55-110 at
    T = 4-8, 290 at T = 32, 5900 at T = 1024):
        T=1 top-2 (2 pairs):       per_adapter 22   dense 36    grouped 70
        T=4 top-2, all active:     per_adapter 144  dense 59    grouped 127
        T=8 top-2, all active:     dense 88         grouped 234
        T=8 top-2, 2 active:       dense 60         grouped 58
        T=32 top-2, all active:    dense 180        grouped 276
        T=32 top-2, 2 active:      dense 180        grouped 130
        T=64 top-2:                dense 217        grouped 231
        T=256 / 1024 top-2:        dense 1115/2928  grouped 660/1468
    A matmul pair costs ~10 us at decode sizes, so one per pair wins up to 3 pairs; the dense GEMMs cost
    ~T * N and win while T * N <= 512 with more than half the adapters active; grouped wins from there.
    """
    if num_pairs <= 3:
        return "per_adapter"
    if num_tokens * num_adapters <= 512 and 2 * num_active > num_adapters:
        return "dense"
    return "grouped"


# ------------------------------------------------------------------------------------------ traced strategies
# Plain torch ops with static shapes (no host reads, no data-dependent shapes) that inductor can fuse: the CPU
# torch path while torch.compile traces. Built from the routing inside the graph; compute dtype cd as above.
def _routing_tensors(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype):
    """(valid [T, K] bool, ids [T, K] int64 with 0 in empty slots, w [T, K] cd with 0 in empty slots)."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < num_adapters)
    zero = torch.zeros((), dtype=cd, device=ids.device)
    return valid, torch.where(valid, ids, 0), torch.where(valid, topk_weights.detach().to(cd), zero)


class _TracedGather:
    """Per (token, slot) weight gather: h [T, K, R] = coef * A[ids] @ x, out += sum_k scale[e] * B[ids] @ h.

    Gathers T * K copies of A and B (cheap only while T * K is small against N). Empty slots read adapter 0 and
    are dropped by selection (torch.where) after the expand, so a non-finite x row, weight, A or B reaches only
    the tokens that route to it (h of an empty slot is undefined; only expand_ reads it)."""

    def __init__(self, topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype):
        valid, self.ids, w = _routing_tensors(topk_ids, topk_weights, num_adapters, cd)
        self.valid, self.coef = valid.unsqueeze(2), w.unsqueeze(2)  # [T, K, 1]

    def shrink(self, x, a):
        return (a[self.ids] @ x[:, None, :, None])[..., 0] * self.coef  # [T, K, R, H_in] @ [T, 1, H_in, 1]

    def expand_(self, h, b, acc, scale):
        if scale is not None:
            h = h * scale.to(h.dtype)[self.ids].unsqueeze(2)
        y = (b[self.ids] @ h.unsqueeze(3))[..., 0]  # [T, K, H_out, R_i] @ [T, K, R_i, 1] -> [T, K, H_out]
        acc.add_(torch.where(self.valid, y, torch.zeros((), dtype=y.dtype)).sum(1))

    def add_(self, x, a, b, acc, scale):
        self.expand_(self.shrink(x, a), b, acc, scale)


class _TracedDense:
    """Every adapter for every token: h [T, N, R] = (x @ A.view(N * R, H_in).T) selected where token t routes to
    adapter e and weighted by coef [T, N, 1] (the slot weights, duplicates summed); out += one GEMM of h (times
    scale) with B laid out [N * R, H_out] (transposed inside the graph).

    A non-finite x row or A of an unrouted (token, adapter) pair adds nothing (selection). A non-finite entry of B
    of an adapter is NOT isolated: 0 * NaN in the expand GEMM reaches every token. Patching must refuse
    non-finite adapter weights; callers with such weights must run eagerly or use the gather strategy."""

    def __init__(self, topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype):
        valid, ids, w = _routing_tensors(topk_ids, topk_weights, num_adapters, cd)
        t = topk_ids.shape[0]
        self.coef = torch.zeros(t, num_adapters, dtype=cd, device=ids.device).scatter_add(1, ids, w).unsqueeze(2)
        hits = torch.zeros(t, num_adapters, dtype=torch.int32, device=ids.device).scatter_add(1, ids, valid.int())
        self.routed = (hits > 0).unsqueeze(2)  # [T, N, 1]

    def shrink(self, x, a):
        n, r = a.shape[0], a.shape[1]
        h = (x @ a.reshape(n * r, -1).t()).view(x.shape[0], n, r)
        return torch.where(self.routed, h * self.coef, torch.zeros((), dtype=h.dtype))

    def expand_(self, h, b, acc, scale):
        if scale is not None:
            h = h * scale.to(h.dtype).view(1, -1, 1)
        flat_b = b.transpose(1, 2).reshape(-1, b.shape[1])  # [N * R_i, H_out]
        acc.add_(h.reshape(h.shape[0], h.shape[1] * h.shape[2]) @ flat_b)

    def add_(self, x, a, b, acc, scale):
        self.expand_(self.shrink(x, a), b, acc, scale)


def _traced_fused(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, cd: torch.dtype):
    """The C++ kernels' pairs (impl/cpu_fused.py: static shapes, opaque custom ops with fake implementations)."""
    return cpu_fused.prepare(topk_ids, topk_weights.detach().to(cd), num_adapters, _threads())


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's intra-op thread count (a constant while torch.compile traces: it sizes the expand blocks)."""
    return torch.get_num_threads()


_TRACED = {"traced_gather": _TracedGather, "traced_dense": _TracedDense, "traced_fused": _traced_fused}


def choose_traced_strategy(num_tokens: int, top_k: int, num_adapters: int) -> str:
    """The strategy while torch.compile traces the CPU torch path, from static shapes only.

    Measured by bench/runtime_strategies.py (inductor, static shapes; H 512, R 16, N 8, K 2, float32, 1 thread,
    2-core shared x86_64, torch 2.13; us per projection, the routing built once per 4 projections; "ops" is the
    registered-op path, the compiled base projection x @ W.T beside it):
        T=1:     gather 15    dense 45    ops 250    base 37
        T=8:     gather 50    dense 77    ops 541    base 95
        T=32:    gather 156   dense 157   ops 637    base 230
        T=1024:  gather 6409  dense 4228  ops 4572   base 5974
    Gather costs ~3 us per (token, slot) pair (it copies K adapters' weights per token), dense a fixed ~40 us
    (every adapter's weights read once) plus ~4 us per token; they tie at T * K = 64 = 8 * N. Gather is taken
    while T * K <= 4 * N, safely inside its winning range.
    """
    if _kernels_on():
        return "traced_fused"
    return "traced_gather" if num_tokens * top_k <= 4 * num_adapters else "traced_dense"


# ------------------------------------------------------------------------------------------- the batch
class RoutedBatch:
    """The routing of one forward, prepared once and shared by every patched layer (see the module docstring).

    Attributes: num_tokens (T), top_k (K), num_adapters (N), backend (resolved name), strategy (one of
    TRACED_STRATEGIES when built while compiling on the CPU torch path, "ops" when built while compiling
    elsewhere, "backend" off the CPU torch path, else one of STRATEGIES), topk_ids [T, K], topk_weights [T, K],
    plan (a RoutingPlan, built on first use: the traced strategies never need it).
    """

    def __init__(self, topk_ids, topk_weights, num_adapters, backend, requested, plan, strategy, seq, runs,
                 pairs=None):
        self.topk_ids, self.topk_weights, self._plan = topk_ids, topk_weights, plan
        self.num_tokens, self.top_k = topk_ids.shape[0], topk_ids.shape[1]
        self.num_adapters, self.backend, self.strategy = num_adapters, backend, strategy
        self._requested, self._seq, self._runs, self._pairs = requested, seq, runs, pairs
        self._slots = None
        self._prepared: dict = {}
        self._moved: dict = {}
        if strategy not in STRATEGIES:  # every call of these paths reads them (and a CUDA graph must not make them)
            self._slot_tensors()
        if strategy in TRACED_STRATEGIES:
            self._prepared[torch.float32] = self._prepare(torch.float32)

    def _slot_tensors(self) -> tuple:
        """(ones [N] float32, valid [T, K, 1] bool, ids [T, K] int64 with 0 in empty slots), made on first use:
        the CPU strategies never need them unless a call takes the registered ops (autograd)."""
        if self._slots is None:
            ids = self.topk_ids.long()
            valid = ((ids >= 0) & (ids < self.num_adapters)).unsqueeze(2)
            ones = torch.ones(self.num_adapters, dtype=torch.float32, device=ids.device)
            self._slots = (ones, valid, torch.where(valid[:, :, 0], ids, 0))
        return self._slots

    @property
    def _ones(self) -> Tensor:
        return self._slot_tensors()[0]

    @property
    def plan(self) -> RoutingPlan:
        if self._plan is None:
            self._plan = build_plan(self.topk_ids, self.num_adapters)
        return self._plan

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, topk_ids, topk_weights, num_adapters, *, backend="auto", validate=True) -> "RoutedBatch":
        """Prepare per-token top-k routing: topk_ids [T, K] int (-1 = empty slot), topk_weights [T, K] float (may
        require grad). `validate` checks the id values (a host sync on a GPU; skipped while compiling or
        capturing); shapes, dtypes and devices are always checked."""
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        if topk_weights is None:
            raise TypeError("topk_weights must be a [T, K] floating tensor of router probabilities, got None")
        check_routing(topk_ids, topk_weights, topk_ids.shape[0] if isinstance(topk_ids, Tensor) else -1,
                       num_adapters, can_read_ids(validate, topk_ids))
        if topk_weights.device != topk_ids.device:
            raise ValueError(f"topk_weights is on {topk_weights.device} but topk_ids is on {topk_ids.device}")
        return cls._make(topk_ids, topk_weights, num_adapters, backend, None, None)

    @classmethod
    def for_sequences(cls, seq_ids, seq_len, num_adapters, *, backend="auto") -> "RoutedBatch":
        """One adapter per sequence: seq_ids [B] int (-1 = base model), every token of row b uses seq_ids[b] with
        weight 1; tokens are batch-major (T = B * seq_len)."""
        if not isinstance(seq_ids, Tensor) or seq_ids.dim() != 1 or seq_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seq_ids must be a 1-D int32 or int64 tensor, got {getattr(seq_ids, 'shape', seq_ids)}")
        if not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        topk_ids = seq_ids.repeat_interleave(seq_len).unsqueeze(1)
        topk_weights = torch.ones(topk_ids.shape, dtype=torch.float32, device=seq_ids.device)
        if seq_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            seq_list = seq_ids.tolist()  # read once: validation and the row runs
            if seq_list and not -1 <= min(seq_list) <= max(seq_list) < num_adapters:
                raise ValueError(f"topk_ids must lie in [-1, {num_adapters}) (N = {num_adapters} adapters, -1 = "
                                 f"empty slot), got sequence ids in [{min(seq_list)}, {max(seq_list)}]")
        else:
            seq_list = None
            check_routing(topk_ids, topk_weights, topk_ids.shape[0], num_adapters, can_read_ids(True, seq_ids))
        return cls._make(topk_ids, topk_weights, num_adapters, backend, seq_ids, seq_len, seq_list=seq_list)

    @classmethod
    def _make(cls, topk_ids, topk_weights, num_adapters, requested, seq_ids, seq_len, plan=None,
              seq_list=None) -> "RoutedBatch":
        """Resolve the backend and pick the strategy, doing only what that strategy needs: the plan is built here
        for a backend (device) path only; the CPU strategies read the routing on the host once."""
        name = _backends.resolve(requested, topk_ids.device)
        cpu_torch = name == "torch" and topk_ids.device.type == "cpu"
        seq, runs, pairs = (seq_ids, seq_len), None, None
        if torch.compiler.is_compiling():  # the plan is built by the "ops" path if a call needs it
            strategy = choose_traced_strategy(*topk_ids.shape, num_adapters) if cpu_torch else "ops"
            return cls(topk_ids, topk_weights, num_adapters, name, requested, plan, strategy, seq, runs)
        if not cpu_torch:
            plan = build_plan(topk_ids, num_adapters) if plan is None else plan
            return cls(topk_ids, topk_weights, num_adapters, name, requested, plan, "backend", seq, runs)
        if seq_ids is not None:
            runs = _runs(seq_ids.tolist() if seq_list is None else seq_list, seq_len, num_adapters)
            if _rows_pay(runs, seq_len):
                return cls(topk_ids, topk_weights, num_adapters, name, requested, plan, "rows", seq, runs)
        if _kernels_on():  # grouped at every size (see choose_strategy): no routing summary
            return cls(topk_ids, topk_weights, num_adapters, name, requested, plan, "grouped", seq, runs)
        num_active, num_pairs, pairs = _summary(topk_ids, topk_weights, num_adapters)
        strategy = choose_strategy(topk_ids.shape[0], num_adapters, num_active, num_pairs)
        return cls(topk_ids, topk_weights, num_adapters, name, requested, plan, strategy, seq, runs, pairs)

    def to(self, device) -> "RoutedBatch":
        """The same routing on `device` (a model split across devices); cached per device."""
        device = torch.device(device)
        if device == self.topk_ids.device:
            return self
        moved = self._moved.get(device)
        if moved is None:
            ids = self.topk_ids.to(device)
            plan = None if self._plan is None else self._plan.to(device, ids)
            seq_ids, seq_len = self._seq
            moved = RoutedBatch._make(ids, self.topk_weights.to(device), self.num_adapters, self._requested,
                                      None if seq_ids is None else seq_ids.to(device), seq_len, plan)
            self._moved[device] = moved
        return moved

    def _prepare(self, cd: torch.dtype):
        """The CPU strategy's index tensors and coefficients in compute dtype cd (built once per dtype)."""
        with torch.no_grad():
            if self.strategy == "rows":
                seq_ids, seq_len = self._seq
                batched = seq_ids is not None and _batched_rows_pay(self._runs, seq_ids.shape[0], seq_len,
                                                                    torch.get_num_threads())
                return _Rows(self._runs, self.num_tokens, (seq_ids.long(), seq_len) if batched else None)
            if self.strategy in TRACED_STRATEGIES:
                return _TRACED[self.strategy](self.topk_ids, self.topk_weights, self.num_adapters, cd)
            if self.strategy in ("per_adapter", "dense"):
                if self._pairs is None:
                    self._pairs = _merged_pairs(self.topk_ids, self.topk_weights, self.num_adapters)
                if self.strategy == "per_adapter":
                    return _PerAdapter(self._pairs, self.num_tokens)
                return _dense_from_pairs(self._pairs, self.num_tokens, self.num_adapters, cd)
            if _kernels_on():
                fused = cpu_fused.prepare(self.topk_ids, self.topk_weights.detach().to(cd), self.num_adapters,
                                          torch.get_num_threads())
                runs = cpu_fused.token_runs(fused, _MIN_RUN)
                if runs is None:
                    return fused
                offsets = fused.offsets.tolist()
                num_pairs = offsets[-1]
                return _Grouped(fused.tokens[:num_pairs], fused.coef[:num_pairs, None], _active_segments(offsets), runs)
            ids = self.topk_ids.long()
            valid = (ids >= 0) & (ids < self.num_adapters)
            w = torch.where(valid, self.topk_weights.detach().to(cd), torch.zeros((), dtype=cd))
            offsets = self.plan.seg_offsets.tolist()
            pairs = _slot_major(self.plan.sorted_pairs[: offsets[-1]].long(), ids, self.top_k)
            segments = _active_segments(offsets)
            tokens = pairs // self.top_k
            runs, coef = _token_runs(tokens, offsets, _MIN_RUN), w.reshape(-1)[pairs].unsqueeze(1)
            if runs is None and _padding_pays(segments, torch.get_num_threads()):
                return _padded(tokens, coef, segments, self.num_adapters)
            return _Grouped(tokens, coef, segments, runs)

    def _strategy(self, cd: torch.dtype):
        prepared = self._prepared.get(cd)
        if prepared is None:
            prepared = self._prepared[cd] = self._prepare(cd)
        return prepared

    # ------------------------------------------------------------------------------------------ per layer
    def _fast(self, *tensors) -> bool:
        """Whether this call may skip the registered ops: nothing needs a gradient, and either a traced strategy
        (plain torch ops) or eager (the other strategies read host values)."""
        if self.strategy == "ops" or _grad_needed(self.topk_weights, *tensors):
            return False
        return self.strategy in TRACED_STRATEGIES or not torch.compiler.is_compiling()

    def _scale(self, scale: Optional[Tensor]) -> Tensor:
        return self._ones if scale is None else scale

    def shrink(self, x: Tensor, lora_a: Tensor, *, ranks=None) -> RankSpace:
        """x [T, H_in], lora_a [N, R, H_in] -> the rank-space value h[t, k] = topk_weights[t, k] * lora_a[e] @ x[t]
        (no scaling), an opaque RankSpace for :meth:`expand_`. ranks: None | int32 [N] real ranks (h[t, k, r] = 0
        for r >= ranks[e], never computed where the path bounds it)."""
        if not self._fast(x, lora_a):
            return RankSpace("ops", self._ops_shrink(x, lora_a, ranks), x, lora_a, ranks)
        if self.strategy == "backend":
            h = _backends.get(self.backend).shrink(
                x, lora_a, self.topk_ids, self.topk_weights, self._ones, self.plan, ranks
            )
            return RankSpace("backend", h, x, lora_a, ranks)
        cd = _compute_dtype(x)
        strategy = self._strategy(cd)
        h = strategy.shrink(_as(x, cd, cache=False), _as(lora_a, cd), **_bound_kw(strategy, ranks))
        return RankSpace(self.strategy, h, x, lora_a, ranks)

    def expand_(self, h: RankSpace, lora_b: Tensor, out: Tensor, *, rank_slice=None, scale=None, ranks=None) -> Tensor:
        """out [T, H_out] += sum_k scale[e] * lora_b[e] @ h[t, k, rank_slice]; lora_b [N, H_out, R_i] with R_i the
        length of rank_slice (a slice or (start, stop); None = all of R); scale None | [N] float tensor; ranks
        None | int32 [N] real ranks within the slice (lora_b[e] and h cut to ranks[e]). Returns out."""
        rank_slice = _as_slice(rank_slice)
        if not self._fast(h.x, h.lora_a, lora_b, out, scale) or h.layout == "ops":
            return self._ops_expand_(h, lora_b, out, rank_slice, scale, ranks)
        if h.layout == "backend":
            hs = h.data if rank_slice is None else h.data[:, :, rank_slice].contiguous()
            if scale is not None:
                hs = hs * self._slot_scale(scale, hs.dtype)
            _backends.get(self.backend).expand(hs, lora_b, self.topk_ids, self.plan, out, True, ranks)
            return out
        cd = _compute_dtype(h.x)
        data, extra = h.data, {}
        if rank_slice is not None and getattr(self._strategy(cd), "sliced", False):
            extra = {"rank_slice": rank_slice}  # the strategy reads the slice's columns itself
        elif rank_slice is not None:
            data = [d[:, rank_slice] for d in data] if isinstance(data, list) else data[..., rank_slice]
        return self._cpu_run("expand_", out, cd, ranks, data, _as(lora_b, cd), scale, **extra)

    def add_(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, out: Tensor, *, scale=None, ranks=None) -> Tensor:
        """out [T, H_out] += the routed_lora delta of x [T, H_in] through lora_a [N, R, H_in] and lora_b
        [N, H_out, R]; scale None | [N] float32 tensor; ranks None | int32 [N] real ranks. Returns out."""
        if not self._fast(x, lora_a, lora_b, out, scale):
            return self._ops_add_(x, lora_a, lora_b, out, scale, ranks)
        if self.strategy == "backend":
            _backends.get(self.backend).routed_lora(
                x, lora_a, lora_b, self.topk_ids, self.topk_weights, self._scale(scale), self.plan, out, True, ranks
            )
            return out
        cd = _compute_dtype(x)
        return self._cpu_run("add_", out, cd, ranks, _as(x, cd, cache=False), _as(lora_a, cd), _as(lora_b, cd), scale)

    def _cpu_run(self, method: str, out: Tensor, cd, ranks, *args, **extra) -> Tensor:
        """Run the CPU strategy's `method`(*args[:-1], acc, scale=args[-1], **extra) into out (with `ranks` for the
        strategies that bound by them): directly when out is in cd, else into a cd buffer added to out once (one
        rounding)."""
        strategy = self._strategy(cd)
        run, kw = getattr(strategy, method), {**_bound_kw(strategy, ranks), **extra}
        if out.dtype == cd:
            run(*args[:-1], out, args[-1], **kw)
            return out
        acc = torch.zeros(out.shape, dtype=cd)
        run(*args[:-1], acc, args[-1], **kw)
        return out.add_(acc)

    # --------------------------------------------------------------------------- registered ops (compile, grad)
    def _ops_shrink(self, x, lora_a, ranks=None):
        ones = self._ones.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return torch.ops.molora.shrink(x, lora_a, self.topk_ids, self.topk_weights, ones,
                                       self.plan.sorted_pairs, self.plan.seg_offsets, self.backend, ranks)

    def _slot_scale(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """scale[e] per slot as [T, K, 1] of `dtype` (0 in empty slots); cast first, so its gradient sums in dtype."""
        scale = scale.to(dtype)
        zero = torch.zeros((), dtype=scale.dtype, device=scale.device)
        _, valid, ids = self._slot_tensors()
        return torch.where(valid, scale[ids].unsqueeze(2), zero)

    def _ops_expand_(self, h: RankSpace, lora_b, out, rank_slice, scale, ranks):
        data = h.data if h.layout in ("ops", "backend") else self._ops_shrink(h.x, h.lora_a, h.ranks)
        if rank_slice is not None:
            data = data[:, :, rank_slice]
        if scale is not None:
            data = data * self._slot_scale(scale, data.dtype)
        args = (data.contiguous(), lora_b, self.topk_ids, self.plan.sorted_pairs, self.plan.seg_offsets, self.backend)
        if _grad_needed(data, lora_b, out):
            check_autograd_out(out, "write into a non-leaf (e.g. the output of the base layer)")
            return out.copy_(torch.ops.molora.expand(*args, out, ranks))
        torch.ops.molora.expand_(out, *args, ranks)
        return out

    def _ops_add_(self, x, lora_a, lora_b, out, scale, ranks):
        scale = self._scale(scale)
        if x.dtype == torch.float64:
            scale = scale.to(torch.float64)
        args = (x, lora_a, lora_b, self.topk_ids, self.topk_weights, scale, self.plan.sorted_pairs,
                self.plan.seg_offsets, self.backend)
        if _grad_needed(x, lora_a, lora_b, out, self.topk_weights, scale):
            check_autograd_out(out, "write into a non-leaf (e.g. the output of the base layer)")
            return out.copy_(torch.ops.molora.routed_lora_train(*args, out, ranks)[0])  # saves u = A x for backward
        torch.ops.molora.routed_lora_(out, *args, ranks)
        return out

    def _with_strategy(self, strategy: str) -> "RoutedBatch":
        """This routing with the strategy forced (tests and benchmarks): one of STRATEGIES ("rows" needs a
        for_sequences batch), TRACED_STRATEGIES or "ops"."""
        known = strategy in STRATEGIES or strategy in TRACED_STRATEGIES or strategy == "ops"
        if not known or (strategy == "rows" and self._runs is None):
            raise ValueError(f"cannot force strategy {strategy!r} on {self!r}")
        return RoutedBatch(self.topk_ids, self.topk_weights, self.num_adapters, self.backend, self._requested,
                           self._plan, strategy, self._seq, self._runs, self._pairs)

    def __repr__(self) -> str:
        return (f"RoutedBatch(T={self.num_tokens}, K={self.top_k}, N={self.num_adapters}, backend={self.backend!r}, "
                f"strategy={self.strategy!r})")


# ---------------------------------------------------------------------------------------------- helpers
def _active_segments(offsets: list) -> list:
    """(e, lo, hi) for each adapter e with pairs, from the plan's segment offsets [N + 1] (a host list)."""
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if hi > lo]


def _runs(seq_ids: list, seq_len: int, num_adapters: int) -> list:
    """(e, start row, stop row) for each maximal run of consecutive sequences routed to one adapter e."""
    runs = []
    for b, e in enumerate(seq_ids):
        if not 0 <= e < num_adapters or seq_len == 0:
            continue
        lo = b * seq_len
        if runs and runs[-1][0] == e and runs[-1][2] == lo:
            runs[-1] = (e, runs[-1][1], lo + seq_len)
        else:
            runs.append((e, lo, lo + seq_len))
    return runs


def _rows_pay(runs: list, seq_len: int) -> bool:
    """Whether per-sequence routing should take the rows strategy: a matmul pair per run costs ~10 us at decode
    sizes, the dense strategy ~55 us for up to 16 tokens (bench/runtime_strategies.py, "names" regimes), so rows
    wins up to 4 runs, and always once runs are long (prefill: rows 0.09x base vs grouped 0.13x)."""
    return len(runs) <= 4 or seq_len >= 8


def _batched_rows_pay(runs: list, num_seqs: int, seq_len: int, threads: int) -> bool:
    """Whether the rows strategy takes its batched form (one bmm per side over [B, seq_len, H]): with more than one
    intra-op thread, every sequence routed (the runs cover all B * seq_len rows), more than one run, and
    prefill-long sequences (seq_len >= _BATCHED_MIN_SEQ: at decode sizes the per-call weight gathers cost more than
    the few matmuls they replace).

    Measured in the model (bench/runtime_model.py prefill 4x256, names vs names[loop]; torch 2.13 CPU, 2-core
    shared x86_64, interleaved medians, time / base): 2 threads 1.02x / 1.15x / 1.47x batched against 1.17x /
    1.24x / 2.45x per-run (loads 3-5); 1 thread (thread time) 1.11x / 1.14x against 1.08x / 1.09x, so one thread
    keeps the loop."""
    covered = sum(hi - lo for _, lo, hi in runs) == num_seqs * seq_len
    return threads > 1 and covered and len(runs) > 1 and seq_len >= _BATCHED_MIN_SEQ


_BATCHED_MIN_SEQ = 8  # rows: the batched (bmm) form from this sequence length (_batched_rows_pay)
_MIN_RUN = 32  # grouped: row slices instead of gather + index_add when runs of consecutive tokens average this long
_FUSED = True  # the C++ kernels (impl/cpu_fused.py) when they are built: grouped without runs, traced_fused


@torch.compiler.assume_constant_result
def _kernels_on() -> bool:
    """Whether the CPU strategies use the C++ kernels (a constant while torch.compile traces)."""
    return _FUSED and cpu_fused.available()

_PAD_WASTE = 0.25  # grouped without runs: padded while padding adds at most this share of pairs (_padding_pays)
_HOST_SLOTS = 256  # routings with at most this many (token, slot) entries are read on the host as lists


def _summary(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int) -> tuple:
    """(active adapters, routed (token, adapter) pairs, the merged pairs or None) for choose_strategy. Small
    routings are read as host lists once (exact pair count, duplicate slots once; the pairs are kept for the
    per_adapter and dense strategies); large ones are counted by one bincount (a duplicate slot counts twice,
    which only matters to choose_strategy below 4 pairs)."""
    if topk_ids.numel() <= _HOST_SLOTS:
        pairs = _merged_pairs(topk_ids, topk_weights, num_adapters)
        return len({e for e, _, _ in pairs}), len(pairs), pairs
    ids = topk_ids.reshape(-1).long()
    counts = torch.bincount(ids[(ids >= 0) & (ids < num_adapters)], minlength=num_adapters)
    active, routed = torch.stack([(counts > 0).sum(), counts.sum()]).tolist()
    return active, routed, None


def _merged_pairs(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int) -> list:
    """[(e, t, coefficient)] of the routed slots, a token's duplicate slots of one adapter summed (as host
    floats), in (t, e) order."""
    if topk_ids.numel() <= _HOST_SLOTS:
        slots = ((t, e, c) for t, (row_ids, row_w) in enumerate(zip(topk_ids.tolist(), topk_weights.tolist()))
                 for e, c in zip(row_ids, row_w))
    else:  # few routed slots among many empty ones (per_adapter) or a large K (dense): read only the routed ones
        rows, cols = ((topk_ids >= 0) & (topk_ids < num_adapters)).nonzero(as_tuple=True)
        slots = zip(rows.tolist(), topk_ids[rows, cols].tolist(), topk_weights[rows, cols].tolist())
    merged: dict = {}
    for t, e, c in slots:
        if 0 <= e < num_adapters:
            merged[(t, e)] = merged.get((t, e), 0.0) + c
    return [(e, t, c) for (t, e), c in sorted(merged.items())]


def _dense_from_pairs(pairs: list, num_tokens: int, num_adapters: int, cd: torch.dtype) -> "_Dense":
    """The dense strategy's [T, N, 1] coefficients and routed mask from the merged pairs (built on the host)."""
    size = num_tokens * num_adapters
    coef = array.array("d" if cd == torch.float64 else "f", bytes(size * (8 if cd == torch.float64 else 4)))
    routed = array.array("b", bytes(size))
    for e, t, c in pairs:
        coef[t * num_adapters + e], routed[t * num_adapters + e] = c, 1
    shape = (num_tokens, num_adapters, 1)
    select = len({t for _, t, _ in pairs}) < num_tokens  # some token has no routed slot
    # frombuffer: no per-element conversion (torch.tensor(list) costs ~0.2 us per element)
    coef_t = torch.frombuffer(coef, dtype=cd) if size else torch.zeros(0, dtype=cd)
    routed_t = torch.frombuffer(routed, dtype=torch.bool) if size else torch.zeros(0, dtype=torch.bool)
    return _Dense(coef_t.view(shape), routed_t.view(shape), select)

"""The routed pairs of a plan as adapter-sorted rows: the layout the torch backend's forward (under autograd and
not) and its backward share.

Row i stands for the i-th routed pair of the plan (plan order: grouped by adapter, ascending pair index inside
each group), so each adapter's rows are one contiguous slice [offsets[e], offsets[e + 1]). On these rows:

    gather(t)              t[token of each row]                       [P_r, D]   one index_select
    mm(rows, w)            rows[i] @ w[e(i)]   for w [N, D, F]        [P_r, F]   one GEMM per adapter
    outer(left, right)     sum over e's rows of left[i]^T right[i]    [N, D, F]  one GEMM per adapter; 0 if no rows
    scatter_add_(acc, y)   acc[token of row i] += y[i]                           one index_add_ (sequential on CPU)

The grouped GEMMs run as ``torch._grouped_mm`` where it applies (a CPU tensor, float32, 16-byte aligned layouts,
at least one routed pair): one call for all adapters instead of one per adapter, 9-18% faster per product than
the loop at 1 thread (2-core AMD EPYC, torch 2.13 CPU, 1024 rows x 512 x 16, 8 adapters, interleaved medians).
Otherwise (float64, odd sizes, CUDA tensors, an older torch), or when the caller hands `mm` a dead buffer to write
into, a loop of ``torch.mm`` into slices of one output. Not allocating pays more than the grouped call: a fresh
[P_r, H] buffer costs its page faults on every call (at 1 thread, the forward and backward of the 512/1024 delta
points fell from 10.6 to 7.5 ms and from 17.1 to 12.0 ms when the expand and dx products reused the dead gathered
x). Both paths are exact GEMMs in the operands' dtype, deterministic, and agree to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import RoutingPlan

Tensor = torch.Tensor

_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _aligned(t: Tensor) -> bool:
    """The layouts torch._grouped_mm accepts: a 16-byte aligned start, the last two dimensions row- or
    column-major with the other stride a multiple of 16 bytes (and at least that dimension's length), and the
    batch stride of a 3-d operand a multiple of 16 bytes."""
    a = 16 // t.element_size()
    (rows, cols), (s_rows, s_cols) = t.shape[-2:], t.stride()[-2:]
    row_major = s_cols == 1 and s_rows % a == 0 and s_rows >= max(1, cols)
    col_major = s_rows == 1 and s_cols % a == 0 and s_cols >= max(1, rows)
    return t.data_ptr() % 16 == 0 and (row_major or col_major) and (t.dim() == 2 or t.stride(0) % a == 0)


def _grouped_ok(*operands: Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands (as passed; see the module docstring)."""
    return (_GROUPED_MM is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0
                                            and _aligned(t) for t in operands))


class PairRows:
    """The rows of a plan's routed pairs (see the module docstring).

    pairs [P_r] int64 (t * K + k), tokens [P_r] int64, ends [N] int32 (offsets[1:], the end row of each adapter),
    segments [(e, lo, hi)] for the adapters with rows. Building it reads the plan's offsets on the host (a sync
    for GPU tensors)."""

    def __init__(self, plan: RoutingPlan):
        offsets = plan.seg_offsets.tolist()
        self.num_adapters = plan.num_adapters
        self.pairs = plan.sorted_pairs[: offsets[-1]].long()
        self.tokens = self.pairs // plan.top_k
        self.ends = plan.seg_offsets[1:]
        self.segments = [(e, offsets[e], offsets[e + 1]) for e in range(plan.num_adapters) if offsets[e + 1] > offsets[e]]
        self._adapter = None

    @property
    def count(self) -> int:
        return self.pairs.shape[0]

    @property
    def adapter(self) -> Tensor:
        """[P_r] int64: the adapter of each row."""
        if self._adapter is None:
            counts = self.ends.diff(prepend=self.ends.new_zeros(1))
            ids = torch.arange(self.num_adapters, device=self.pairs.device)
            self._adapter = torch.repeat_interleave(ids, counts, output_size=self.count)
        return self._adapter

    def gather(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """[P_r, D] in `dtype`: the row of t [T, D] of each pair's token."""
        return t.index_select(0, self.tokens).to(dtype)

    def gather_pairs(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """[P_r, D] in `dtype`: the row of t [T * K, D] of each pair."""
        return t.index_select(0, self.pairs).to(dtype)

    def mm(self, rows: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """[P_r, F]: rows [P_r, D] times w[e] ([N, D, F], any strides) for each row's adapter e; written into `out`
        ([P_r, F], not overlapping rows) when given, which reuses a dead buffer instead of allocating (the loop
        path: torch._grouped_mm has no out=)."""
        if out is None and _grouped_ok(rows, w):
            return _GROUPED_MM(rows, w, offs=self.ends)
        out = rows.new_empty(self.count, w.shape[2]) if out is None else out
        for e, lo, hi in self.segments:
            torch.mm(rows[lo:hi], w[e], out=out[lo:hi])
        return out

    def outer(self, left: Tensor, right: Tensor) -> Tensor:
        """[N, D, F]: left[lo:hi]^T right[lo:hi] over each adapter's rows (left [P_r, D], right [P_r, F]); zeros
        for adapters without rows."""
        if _grouped_ok(left.t(), right):
            return _GROUPED_MM(left.t(), right, offs=self.ends)
        out = left.new_zeros(self.num_adapters, left.shape[1], right.shape[1])
        for e, lo, hi in self.segments:
            torch.mm(left[lo:hi].t(), right[lo:hi], out=out[e])
        return out

    def coefficients(self, topk_weights: Tensor, scale: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w, s), each [P_r] in `dtype`: each row's routing weight and its adapter's scaling."""
        w = topk_weights.reshape(-1).index_select(0, self.pairs).to(dtype)
        return w, scale.to(dtype).index_select(0, self.adapter)

    def scatter_add_(self, acc: Tensor, rows: Tensor) -> Tensor:
        """acc [T, D] += rows [P_r, D] added at each pair's token, in row order; returns acc."""
        return acc.index_add_(0, self.tokens, rows.to(acc.dtype))

    def to_pairs(self, rows: Tensor, num_pairs: int) -> Tensor:
        """[num_pairs, D]: rows [P_r, D] placed at their pair indices, zeros at the pairs with no row (empty slots)."""
        return rows.new_zeros(num_pairs, rows.shape[1]).index_copy_(0, self.pairs, rows)


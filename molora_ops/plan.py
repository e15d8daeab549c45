"""The routing plan: (token, slot) pairs grouped by adapter.

A plan is built once per forward from ``topk_ids`` and reused by every layer that shares the routing.
Building it is a handful of device ops with static output shapes (a stable sort and a searchsorted), so
it never syncs with the host and it can be rebuilt in place inside a captured CUDA graph.

Semantics, for topk_ids [T, K] with N adapters and P = T * K pairs, pair p = t * K + k:
    sorted_pairs [P] int32   the pair indices p, stably sorted by adapter id; empty slots (-1) and ids
                             outside [0, N) are sorted after every adapter, so they belong to no segment
    seg_offsets  [N+1] int32 adapter e owns sorted_pairs[seg_offsets[e] : seg_offsets[e + 1]];
                             seg_offsets[N] is the number of routed (non-empty) pairs
Stability makes the order inside a segment ascending in p, hence in token, which the kernels rely on
for coalesced gathers and the torch backend for deterministic results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingPlan", "build_plan"]


@dataclass
class RoutingPlan:
    """Adapter-grouped view of one routing decision. See the module docstring for the semantics."""

    sorted_pairs: torch.Tensor
    seg_offsets: torch.Tensor
    num_tokens: int
    top_k: int
    num_adapters: int

    @classmethod
    def empty(cls, num_tokens: int, top_k: int, num_adapters: int, device=None) -> "RoutingPlan":
        """Preallocated buffers for `num_tokens` x `top_k` pairs, to be filled by :meth:`update_`.

        Use this form under CUDA graphs: capture with the maximum batch, pad unused rows of topk_ids with
        -1, and call ``update_`` before each replay; the buffers never move.
        """
        if num_tokens < 0 or top_k < 1 or num_adapters < 1:
            raise ValueError(
                f"RoutingPlan.empty needs num_tokens >= 0, top_k >= 1 and num_adapters >= 1, "
                f"got {num_tokens}, {top_k}, {num_adapters}"
            )
        return cls(
            sorted_pairs=torch.zeros(num_tokens * top_k, dtype=torch.int32, device=device),
            seg_offsets=torch.zeros(num_adapters + 1, dtype=torch.int32, device=device),
            num_tokens=num_tokens,
            top_k=top_k,
            num_adapters=num_adapters,
        )

    @property
    def device(self) -> torch.device:
        return self.sorted_pairs.device

    def update_(self, topk_ids: torch.Tensor) -> "RoutingPlan":
        """Refill the buffers in place from topk_ids of shape [num_tokens, top_k]. No host sync."""
        if tuple(topk_ids.shape) != (self.num_tokens, self.top_k):
            raise ValueError(
                f"topk_ids must have the plan's shape ({self.num_tokens}, {self.top_k}), got {tuple(topk_ids.shape)}"
            )
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids is on {topk_ids.device} but the plan is on {self.device}")
        sorted_pairs, seg_offsets = _group_by_adapter(topk_ids, self.num_adapters)
        self.sorted_pairs.copy_(sorted_pairs)
        self.seg_offsets.copy_(seg_offsets)
        return self

    def matches(self, topk_ids: torch.Tensor, num_adapters: int) -> None:
        """Raise ValueError unless this plan was built for topk_ids' shape and device and `num_adapters`."""
        if (self.num_tokens, self.top_k) != tuple(topk_ids.shape) or self.num_adapters != num_adapters:
            raise ValueError(
                f"plan was built for topk_ids {(self.num_tokens, self.top_k)} and N = {self.num_adapters}, "
                f"but the call has topk_ids {tuple(topk_ids.shape)} and N = {num_adapters}"
            )
        if self.device != topk_ids.device:
            raise ValueError(f"plan is on {self.device} but topk_ids is on {topk_ids.device}")

    def active_adapters(self) -> list[int]:
        """Adapter ids with at least one routed pair. Reads device memory: a host sync on a GPU."""
        counts = (self.seg_offsets[1:] - self.seg_offsets[:-1]).tolist()
        return [e for e, c in enumerate(counts) if c > 0]


def _group_by_adapter(topk_ids: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).to(torch.int64)
    # Empty slots and out-of-range ids get the key N and sort after every real adapter.
    in_range = (flat >= 0) & (flat < num_adapters)
    key = torch.where(in_range, flat, torch.full_like(flat, num_adapters))
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_adapters + 1, device=flat.device, dtype=torch.int64)
    seg_offsets = torch.searchsorted(sorted_key, bounds, right=False)
    return order.to(torch.int32), seg_offsets.to(torch.int32)


def build_plan(topk_ids: torch.Tensor, num_adapters: int) -> RoutingPlan:
    """Group the (token, slot) pairs of `topk_ids` [T, K] by adapter for N = `num_adapters` adapters."""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a 2-D [T, K] tensor, got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    sorted_pairs, seg_offsets = _group_by_adapter(topk_ids, num_adapters)
    return RoutingPlan(sorted_pairs, seg_offsets, topk_ids.shape[0], topk_ids.shape[1], num_adapters)

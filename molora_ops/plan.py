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

A plan remembers which topk_ids it was built from: their storage (weakly), memory layout and version
counter, recorded by :func:`build_plan`, :meth:`RoutingPlan.update_` and :meth:`RoutingPlan.to`.
:meth:`RoutingPlan.matches` refuses a plan whose source is another tensor, was modified in place since, or
was never recorded (``RoutingPlan.empty`` never updated, a plan constructed by hand). A view of the same ids with the same
layout counts as the same ids. These checks read only
metadata (no host sync, fine under CUDA-graph capture) and are skipped while ``torch.compile`` traces. Limits:
inference tensors have no version counter, so an in-place change of topk_ids made under
``torch.inference_mode`` goes unseen; and a plan recorded while tracing has no source (eager use refuses it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RoutingPlan", "build_plan"]


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())


def _version(t: torch.Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


@dataclass(frozen=True)
class RoutingPlan:
    """Adapter-grouped view of one routing decision. See the module docstring for the semantics.

    Construction (and :meth:`matches`) checks that the buffers fit the sizes: sorted_pairs a [T * K] and
    seg_offsets a [N + 1] int32 tensor, on one device; ValueError or TypeError naming ``plan`` otherwise.
    """

    sorted_pairs: torch.Tensor
    seg_offsets: torch.Tensor
    num_tokens: int
    top_k: int
    num_adapters: int
    # (weakref to topk_ids' storage, their layout, their version) once filled from topk_ids; None until then.
    _source: Optional[tuple] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = (self.num_tokens, self.top_k, self.num_adapters)
        if not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in sizes):
            raise TypeError(f"plan sizes (num_tokens, top_k, num_adapters) must be ints, got {sizes}")
        if self.num_tokens < 0 or self.top_k < 1 or self.num_adapters < 1:
            raise ValueError(
                f"plan needs num_tokens >= 0, top_k >= 1 and num_adapters >= 1, got {self.num_tokens}, "
                f"{self.top_k}, {self.num_adapters}"
            )
        self._check_buffers()

    def _check_buffers(self) -> None:
        for name, t, length in (
            ("sorted_pairs", self.sorted_pairs, self.num_tokens * self.top_k),
            ("seg_offsets", self.seg_offsets, self.num_adapters + 1),
        ):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"plan.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"plan.{name} must be int32, got {t.dtype}")
            if tuple(t.shape) != (length,):
                raise ValueError(
                    f"plan.{name} must have shape ({length},) for num_tokens = {self.num_tokens}, "
                    f"top_k = {self.top_k}, num_adapters = {self.num_adapters}; got {tuple(t.shape)}"
                )
        if self.seg_offsets.device != self.sorted_pairs.device:
            raise ValueError(
                f"plan.seg_offsets is on {self.seg_offsets.device} but plan.sorted_pairs on {self.sorted_pairs.device}"
            )

    @classmethod
    def empty(cls, num_tokens: int, top_k: int, num_adapters: int, device=None) -> "RoutingPlan":
        """Preallocated buffers for `num_tokens` x `top_k` pairs, to be filled by :meth:`update_` (the ops refuse
        the plan until then).

        Use this form under CUDA graphs: capture with the maximum batch, pad unused rows of topk_ids with
        -1, and call ``update_`` before each replay; the buffers never move.
        """
        return cls(
            sorted_pairs=torch.zeros(max(num_tokens, 0) * max(top_k, 0), dtype=torch.int32, device=device),
            seg_offsets=torch.zeros(max(num_adapters, 0) + 1, dtype=torch.int32, device=device),
            num_tokens=num_tokens,
            top_k=top_k,
            num_adapters=num_adapters,
        )

    @property
    def device(self) -> torch.device:
        return self.sorted_pairs.device

    def _record(self, topk_ids: torch.Tensor) -> None:
        source = None
        if not torch.compiler.is_compiling():
            source = (weakref.ref(topk_ids.untyped_storage()), _layout(topk_ids), _version(topk_ids))
        object.__setattr__(self, "_source", source)

    def update_(self, topk_ids: torch.Tensor) -> "RoutingPlan":
        """Refill the buffers in place from topk_ids of shape [num_tokens, top_k]. No host sync."""
        self._check_shape_and_device(topk_ids)
        sorted_pairs, seg_offsets = _group_by_adapter(topk_ids, self.num_adapters)
        self.sorted_pairs.copy_(sorted_pairs)
        self.seg_offsets.copy_(seg_offsets)
        self._record(topk_ids)
        return self

    def to(self, device, topk_ids: torch.Tensor) -> "RoutingPlan":
        """This plan on `device`, for `topk_ids`: the plan's own topk_ids already copied to `device` (their
        values are not re-read; for any other ids use build_plan). Refuses a plan never filled from topk_ids."""
        if not torch.compiler.is_compiling():
            self._live_source()
        moved = RoutingPlan(  # copies even on the same device: a later update_ of self must not change it
            self.sorted_pairs.to(device, copy=True), self.seg_offsets.to(device, copy=True),
            self.num_tokens, self.top_k, self.num_adapters,
        )
        moved._check_shape_and_device(topk_ids)
        moved._record(topk_ids)
        return moved

    def _live_source(self):
        """The storage of the topk_ids this plan was filled from, checked to be alive."""
        storage = self._source[0]() if self._source is not None else None
        if storage is None:
            raise ValueError(
                "plan has no live topk_ids it was built from (RoutingPlan.empty never updated, a plan constructed "
                "by hand, or its topk_ids were freed); build it with build_plan(topk_ids, N) or plan.update_(topk_ids)"
            )
        return storage

    def _check_shape_and_device(self, topk_ids: torch.Tensor) -> None:
        if tuple(topk_ids.shape) != (self.num_tokens, self.top_k):
            raise ValueError(
                f"topk_ids must have the plan's shape ({self.num_tokens}, {self.top_k}), got {tuple(topk_ids.shape)}"
            )
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids is on {topk_ids.device} but the plan is on {self.device}")

    def check_source(self, topk_ids: torch.Tensor) -> None:
        """Raise ValueError naming `plan` unless it was filled from `topk_ids` (the same memory with the same
        layout, while it lives) and topk_ids was not modified in place since. Metadata only; a no-op while
        torch.compile traces."""
        if torch.compiler.is_compiling():
            return
        storage = self._live_source()
        _, layout, version = self._source
        if topk_ids.untyped_storage() is not storage or _layout(topk_ids) != layout:
            raise ValueError(
                "plan was built from another topk_ids tensor than the one passed; build it from these ids with "
                "build_plan(topk_ids, N) or plan.update_(topk_ids)"
            )
        if version is not None and _version(topk_ids) != version:
            raise ValueError(
                "plan is stale: topk_ids was modified in place after the plan was built; call plan.update_(topk_ids)"
            )

    def matches(self, topk_ids: torch.Tensor, num_adapters: int) -> None:
        """Raise ValueError naming `plan` unless it was built for topk_ids' shape and device, `num_adapters`,
        and from topk_ids itself in its current version (see :meth:`check_source`)."""
        if (self.num_tokens, self.top_k) != tuple(topk_ids.shape) or self.num_adapters != num_adapters:
            raise ValueError(
                f"plan was built for topk_ids {(self.num_tokens, self.top_k)} and N = {self.num_adapters}, "
                f"but the call has topk_ids {tuple(topk_ids.shape)} and N = {num_adapters}"
            )
        if self.device != topk_ids.device:
            raise ValueError(f"plan is on {self.device} but topk_ids is on {topk_ids.device}")
        self._check_buffers()  # resized in place since construction?
        self.check_source(topk_ids)

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
    plan = RoutingPlan(sorted_pairs, seg_offsets, topk_ids.shape[0], topk_ids.shape[1], num_adapters)
    plan._record(topk_ids)
    return plan

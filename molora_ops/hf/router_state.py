"""The KV-cache state of stateful routers, kept beside the transformers cache so that it follows it.

A router whose decision at token t depends on tokens < t (ContextRouter's running mean, KeywordRouter's keyword
counts) needs, at a cached decode step, its state after the cached positions. That state is stored *per
position* on the cache object itself, so it follows whatever generation does to the cache:

    cache.reorder_cache(beam_idx)        beam search: rows are reordered the same way
    cache.crop(...)                      assisted / speculative decoding: positions past the cache's new length
                                         are dropped (whatever the crop's argument convention)
    cache.batch_select_indices(idx)      rows selected
    cache.batch_repeat_interleave(r)     rows repeated
    cache.reset()                        everything dropped

This works by swapping the cache instance's class for a subclass (``Routed<Cache class>``) whose methods call
the original and then apply the same change to the router state; a deep copy of the cache copies the state too.
Per key the state is a tuple of tensors [B, L, ...] (B rows, L cached positions). A forward without a cache gets
a :class:`RouterHistory` that is not attached to anything and dies with the forward.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["RouterHistory", "RouterState", "history_of", "attach"]

_ATTR = "_molora_router_history"


class RouterHistory:
    """Per-position router state of the rows of one cache: {key: (tensor [B, L, ...], ...)}."""

    def __init__(self):
        self.entries: dict = {}

    def apply(self, fn) -> None:
        """Apply `fn` (tensor [B, L, ...] -> tensor) to every stored tensor."""
        self.entries = {k: tuple(fn(t) for t in v) for k, v in self.entries.items()}

    def truncate(self, length: int) -> None:
        self.apply(lambda t: t[:, :length])

    def view(self, past_len: int, batch: int) -> "RouterState":
        return RouterState(self, past_len, batch)


class RouterState:
    """What a router sees of the history in one forward of `batch` rows after `past_len` cached positions."""

    def __init__(self, history: RouterHistory, past_len: int, batch: int):
        self.history = history
        self.past_len = past_len
        self.batch = batch

    def previous(self, key) -> Optional[tuple]:
        """The stored tensors [B, past_len, ...] for `key`, or None when the forward starts a sequence.

        Raises RuntimeError when positions are cached but the router's state for them is missing or out of step
        (the cache was filled without this router, e.g. under a routing() context, or by another model)."""
        if self.past_len == 0:
            return None
        stored = self.history.entries.get(key)
        if stored is None or stored[0].shape[1] != self.past_len or stored[0].shape[0] != self.batch:
            have = None if stored is None else tuple(stored[0].shape[:2])
            raise RuntimeError(
                f"molora_ops: this forward continues a KV cache of {self.past_len} positions x {self.batch} rows, but "
                f"the router's state for those positions is {'missing' if have is None else f'for {have}'}: the "
                "cache was filled without this router (e.g. under a routing() context or by another model); prefill "
                "the cache with the router active"
            )
        return stored

    def record(self, key, *tensors: torch.Tensor) -> None:
        """Store this forward's per-position state: tensors [B, S, ...], appended after the cached positions."""
        tensors = tuple(t.detach() for t in tensors)
        prev = self.history.entries.get(key) if self.past_len > 0 else None
        if prev is not None:
            tensors = tuple(torch.cat([p, t], dim=1) for p, t in zip(prev, tensors))
        self.history.entries[key] = tensors


def history_of(cache) -> Optional[RouterHistory]:
    """The router history attached to `cache` (a transformers Cache), if any."""
    return None if cache is None else cache.__dict__.get(_ATTR)


def attach(cache, history: RouterHistory) -> None:
    """Keep `history` on `cache` so that it follows the cache's reorder / crop / batch selection / reset."""
    cache.__dict__[_ATTR] = history
    cls = type(cache)
    if not getattr(cls, "_molora_follows", False):
        cache.__class__ = _following_class(cls)


_CLASSES: dict[type, type] = {}


def _following_class(cls: type) -> type:
    if cls not in _CLASSES:
        def reorder_cache(self, beam_idx, *args, **kwargs):
            out = cls.reorder_cache(self, beam_idx, *args, **kwargs)
            _each(self, lambda t: t.index_select(0, beam_idx.to(t.device)))
            return out

        def crop(self, *args, **kwargs):
            out = cls.crop(self, *args, **kwargs)
            history = history_of(self)
            if history is not None:
                history.truncate(int(self.get_seq_length()))
            return out

        def batch_select_indices(self, indices, *args, **kwargs):
            out = cls.batch_select_indices(self, indices, *args, **kwargs)
            _each(self, lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])
            return out

        def batch_repeat_interleave(self, repeats, *args, **kwargs):
            out = cls.batch_repeat_interleave(self, repeats, *args, **kwargs)
            _each(self, lambda t: t.repeat_interleave(repeats, dim=0))
            return out

        def reset(self, *args, **kwargs):
            out = cls.reset(self, *args, **kwargs)
            history = history_of(self)
            if history is not None:
                history.entries = {}
            return out

        methods = dict(reorder_cache=reorder_cache, crop=crop, batch_select_indices=batch_select_indices,
                       batch_repeat_interleave=batch_repeat_interleave, reset=reset)
        body = {name: fn for name, fn in methods.items() if hasattr(cls, name)}
        body.update(_molora_follows=True, __module__=cls.__module__, __qualname__=cls.__qualname__)
        _CLASSES[cls] = type(cls.__name__, (cls,), body)
    return _CLASSES[cls]


def _each(cache, fn) -> None:
    history = history_of(cache)
    if history is not None:
        history.apply(fn)

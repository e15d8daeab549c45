"""Which adapters each token uses, decided inside the forward pass and held per call in contextvars.

How a routing is given (PEFT's conventions; N adapters in the order given to ``patch``):
    model(..., adapter_names=[...])  /  model.generate(..., adapter_names=[...])     per call (kwargs)
    model(..., adapter_weights=W)    /  model.generate(..., adapter_weights=W)
    with mo.routing(model, adapter_names=... | adapter_weights=...): ...           a block of calls

The kwargs form is what a streaming server needs: the routing belongs to that one call. The context manager
follows Python's contextvars rules: it is per thread and per asyncio task, and a generator that is paused inside
a ``routing()`` block shares its caller's context (code the caller runs between two ``next()`` calls sees the
generator's routing, and vice versa), so prefer the kwargs form in generators and servers.

``generate`` repeats each sequence's routing for its beams and returned sequences, as it repeats the inputs
(``max(num_beams, num_return_sequences)`` rows per sequence), for the kwargs and the context form alike; a forward
whose batch does not match the routing's raises ValueError, as PEFT does.

Spec forms:
    adapter_names  list of B names, one per sequence; "__base__" = no adapter for that sequence
    adapter_weights
        dict {name: w}          one blend for every token (missing names weigh 0)
        [N]                     the same, as a tensor
        [B, N]                  one blend per sequence
        [B, S, N]               one blend per token; position p of a forward uses row min(p, S - 1), so decode
                                steps past the given length keep the last row's blend
Zero weights are dropped before the kernels see them: dense weights become top-k ids with K = the most
non-zero entries any token has, and -1 (an empty slot, which costs nothing) where a token has fewer. So a tensor
``adapter_weights`` that requires grad gets its gradient through its non-zero entries only: an entry that is
exactly 0 gets gradient 0 (it cannot be trained up from zero this way; train a router instead).

Positions. A forward's tokens sit at absolute positions past_len .. past_len + S - 1, where past_len is the
length of the KV cache the forward continues: read from the cache object itself (whatever keyword carries it:
``cache=`` in transformers >= 5.24, ``past_key_values=`` before) or, without one, from ``cache_position``. Prefill
and each cached decode step are separate forwards that route exactly like one full forward, so the cache keeps
working (routing never needs a second pass). Stateful routers keep their per-position state beside the cache
(:mod:`molora_ops.hf.router_state`), so it follows beam reordering, cropping and batch selection.

Lifetime. At the start of every forward of the model's backbone (the module that holds the decoder blocks) a
hook turns the spec into ``topk_ids`` / ``topk_weights`` for exactly the tokens of this forward, prepares one
:class:`~molora_ops.runtime.RoutedBatch` and keeps it in a per-call value (:mod:`molora_ops.hf.hooks`,
:mod:`molora_ops.hf.state`) that every patched layer reads; a closing hook resets it. When an adapter also targets the output embedding (``lm_head``), which runs after the backbone, the
state is reset by a post-hook on the top-level model instead (``always_call=True``, so an exception resets it
too). HF CausalLMs call ``lm_head`` on the last ``logits_to_keep`` positions (``generate`` passes 1): such a
module uses the routing of the LAST L positions of each sequence; a tensor ``logits_to_keep`` (indices or a
mask) raises a RuntimeError naming the module instead of guessing.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Optional

import torch

from .state import state_of, tracing

__all__ = ["routing", "RoutingSpec", "dense_to_topk", "BASE", "spec_for"]

BASE = "__base__"


def dense_to_topk(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] dense weights -> ([..., K] int64 ids with -1 for empty slots, [..., K] float32 weights).

    K is the largest number of non-zero entries in any row (one host read, done when the context is entered).
    """
    nz = weights != 0
    k = int(nz.sum(-1).max()) if weights.numel() else 0
    if k == 0:
        shape = weights.shape[:-1] + (0,)
        return torch.empty(shape, dtype=torch.int64, device=weights.device), torch.empty(shape, device=weights.device)
    order = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True)[..., :k]
    w = weights.gather(-1, order).float()
    ids = torch.where(w != 0, order, torch.full_like(order, -1))
    return ids, torch.where(ids >= 0, w, torch.zeros_like(w))


def dense_slots(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] dense weights -> ([..., N] int64 ids: n where weights[..., n] != 0, else -1; [..., N] float32
    weights). The traced form of :func:`dense_to_topk`: K = N slots, no host read, so it can run inside a compiled
    graph or a captured CUDA graph and follow in-place changes of `weights`; empty slots cost the kernels nothing."""
    n = weights.shape[-1]
    ids = torch.arange(n, device=weights.device).expand(weights.shape)
    live = weights != 0
    ids = torch.where(live, ids, torch.full_like(ids, -1))
    return ids, torch.where(live, weights, torch.zeros((), dtype=weights.dtype, device=weights.device)).float()


class RoutingSpec:
    """A user's routing request, validated against the patched model's adapters and turned into per-forward
    top-k ids/weights by :meth:`resolve`.

    kind "all": one routing for every token (ids [K]); "seq": one per sequence (ids [B, K]); "token": one per
    token (ids [B, S, K]). `batch` is B (None for "all"); `empty` means no token gets an adapter.

    Eager forwards use the top-k ids/weights computed once here (K = the most non-zero weights of any token, one
    host read). Traced forwards (torch.compile, CUDA-graph capture) of a `by_reference` spec (a ``routing()``
    block) derive N slots from the weight tensor itself inside the forward (:func:`dense_slots`), so a float32
    ``adapter_weights`` tensor on the model's device is used by reference: a compiled call or a captured graph
    replayed after ``W.copy_(new)`` routes by the new weights. A per-call spec (kwargs) cannot change before its
    forward, so traced forwards use its top-k too (K slots, not N: the faster compiled form). A spec created while
    tracing or capturing skips the host-side work (finiteness check, top-k, emptiness)."""

    def __init__(self, adapter_names_order: list[str], *, adapter_names=None, adapter_weights=None, device=None,
                 by_reference: bool = True):
        self.order = list(adapter_names_order)
        self.by_reference = by_reference
        if (adapter_names is None) == (adapter_weights is None):
            raise ValueError("routing takes exactly one of adapter_names=... or adapter_weights=...")
        self.seq_ids = None  # [B]: one adapter per sequence with weight 1 (-1 = base), the names form
        self.dense = None  # the adapter_weights tensor [N], [B, N] or [B, S, N]
        self.ids_w = None  # eager top-k ids and weights (None when created while tracing)
        if adapter_names is not None:
            ids, w, self.empty = self._from_names(adapter_names, device)
            self.kind, self.ids_w, self.seq_ids, self.batch = "seq", (ids, w), ids[:, 0], int(ids.shape[0])
        else:
            self.dense = self._from_weights(adapter_weights, device)
            self.kind = {1: "all", 2: "seq", 3: "token"}[self.dense.dim()]
            self.batch = None if self.kind == "all" else int(self.dense.shape[0])
            self.empty = False
            if not tracing():
                self.ids_w = dense_to_topk(self.dense)
                self.empty = self.ids_w[0].shape[-1] == 0

    def _from_names(self, adapter_names, device):
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list of adapter names (one per sequence), got {type(adapter_names).__name__}"
            )
        index = {name: i for i, name in enumerate(self.order)}
        ids = []
        for name in adapter_names:
            if name == BASE:
                ids.append(-1)
            elif isinstance(name, str) and name in index:
                ids.append(index[name])
            else:
                raise ValueError(f"adapter_names: unknown adapter {name!r}; known: {self.order + [BASE]}")
        ids_t = torch.tensor(ids, dtype=torch.int64, device=device).reshape(len(ids), 1)  # [B, 1]
        return ids_t, (ids_t >= 0).to(torch.float32), all(i < 0 for i in ids)

    def _from_weights(self, w, device):
        n = len(self.order)
        if isinstance(w, dict):
            unknown = [k for k in w if k not in self.order]
            if unknown:
                raise ValueError(f"adapter_weights: unknown adapter name(s) {unknown}; known: {self.order}")
            w = torch.tensor([float(w.get(name, 0.0)) for name in self.order], dtype=torch.float32)
        if not isinstance(w, torch.Tensor):
            raise TypeError(
                f"adapter_weights must be a dict {{name: weight}} or a tensor [N], [B, N] or [B, S, N]; got {type(w).__name__}"
            )
        if not w.is_floating_point():
            w = w.float()
        if w.dim() not in (1, 2, 3) or w.shape[-1] != n:
            raise ValueError(
                f"adapter_weights must be [N], [B, N] or [B, S, N] with N = {n} adapters ({self.order}); "
                f"got shape {tuple(w.shape)}"
            )
        if not tracing() and not bool(torch.isfinite(w).all()):
            raise ValueError("adapter_weights has NaN or infinite entries")
        return w if device is None else w.to(device)

    def expanded(self, repeats: int) -> "RoutingSpec":
        """This routing with every sequence's row repeated `repeats` times in a row (generate's beams and
        returned sequences: ``repeat_interleave`` of the batch, as generate expands the inputs)."""
        if repeats == 1 or self.batch is None:
            return self
        out = object.__new__(RoutingSpec)
        out.__dict__.update(self.__dict__)
        for name in ("ids_w", "seq_ids", "dense"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(out, name, tuple(t.repeat_interleave(repeats, dim=0) for t in value))
            elif value is not None:
                setattr(out, name, value.repeat_interleave(repeats, dim=0))
        out.batch = self.batch * repeats
        return out

    def _check_batch(self, batch: int) -> None:
        if self.batch is not None and self.batch != batch:
            raise ValueError(
                f"the routing was given for {self.batch} sequences (adapter_names / adapter_weights rows) but the "
                f"forward has batch size {batch}"
            )

    def sequence_ids(self, batch: int) -> Optional[torch.Tensor]:
        """[batch] adapter ids (-1 = base) when every sequence uses one adapter with weight 1 (the names form),
        else None. ValueError if the forward's batch is not the routing's."""
        self._check_batch(batch)
        return self.seq_ids

    def resolve(self, batch: int, seq: int, past_len) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """topk ids/weights [batch * seq, K] for a forward of `seq` new tokens after `past_len` (an int, or a 0-dim
        tensor while tracing) cached ones (None, None when no token gets an adapter). ValueError if the forward's
        batch is not the routing's."""
        self._check_batch(batch)
        traced = self.dense is not None and (self.ids_w is None or (self.by_reference and tracing()))
        if self.empty and not traced:  # traced: W is read inside the forward, it may be non-zero by replay time
            return None, None
        ids, w = dense_slots(self.dense) if traced else self.ids_w
        if self.kind == "all":
            k = ids.shape[-1]
            return ids.expand(batch * seq, k), w.expand(batch * seq, k)
        if self.kind == "seq":
            return ids.repeat_interleave(seq, dim=0), w.repeat_interleave(seq, dim=0)
        # per token: absolute positions past_len .. past_len + seq - 1, clamped to the rows given
        if isinstance(past_len, torch.Tensor):
            pos = past_len.to(ids.device) + torch.arange(seq, device=ids.device)
        else:
            pos = torch.arange(past_len, past_len + seq, device=ids.device)
        pos = pos.clamp_max(ids.shape[1] - 1)
        return ids[:, pos], w[:, pos]


def spec_for(state, adapter_names=None, adapter_weights=None, *, by_reference: bool = True) -> RoutingSpec:
    """The RoutingSpec of `adapter_names` / `adapter_weights` for the patched model whose PatchState is `state`
    (`by_reference`: a routing() block, whose weight tensor traced forwards read in place; False for per-call
    kwargs)."""
    return RoutingSpec(state.adapter_names, adapter_names=adapter_names, adapter_weights=adapter_weights,
                       device=state.device(), by_reference=by_reference)


@contextmanager
def routing(model, adapter_names=None, adapter_weights=None):
    """Route a patched model's forwards (and ``generate``) inside this block.

    Exactly one of:
        adapter_names: list of B adapter names, one per sequence ("__base__" for none), as PEFT's mixed batch.
        adapter_weights: dict {name: weight}, or a tensor [N], [B, N] (per sequence) or [B, S, N] (per token),
            N in the order of the adapters given to ``patch``. A blend computes sum_i w_i * s_i * B_i A_i x, which
            is PEFT's ``add_weighted_adapter(..., combination_type="cat")``.
    The routing is per thread / asyncio task (contextvars; see the module docstring about generators). The same
    routing can be given per call as ``model(..., adapter_names=...)`` / ``model.generate(..., adapter_names=...)``.
    Yields the validated RoutingSpec.
    """
    state = state_of(model)
    token = state.spec_var.set(spec_for(state, adapter_names, adapter_weights))
    try:
        yield state.spec_var.get()
    finally:
        state.spec_var.reset(token)


def _generate_expansion(model, kwargs) -> int:
    """Rows generate makes of each input sequence: max(num_beams, num_return_sequences), from the call's kwargs,
    else its generation_config, else the model's."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def get(name):
        value = kwargs.get(name, getattr(config, name, None))
        return 1 if value is None else int(value)

    return max(get("num_beams"), get("num_return_sequences"), 1)


def routed_generate(model, *args, **kwargs):
    """``model.generate`` of a patched model: takes PEFT's ``adapter_names=`` (and ``adapter_weights=``), and
    repeats the routing of each sequence (kwargs or the active routing() block) for its beams and returned
    sequences. Installed on the instance by ``patch`` (the original is called underneath)."""
    state = state_of(model)
    names, weights = kwargs.pop("adapter_names", None), kwargs.pop("adapter_weights", None)
    given = names is not None or weights is not None
    spec = spec_for(state, names, weights, by_reference=False) if given else state.spec_var.get()
    if spec is None:
        return state.generate(*args, **kwargs)
    token = state.spec_var.set(spec.expanded(_generate_expansion(model, kwargs)))
    try:
        return state.generate(*args, **kwargs)
    finally:
        state.spec_var.reset(token)


def install_generate(model, state) -> None:
    """Put :func:`routed_generate` on `model` (if it has ``generate``), keeping the original in `state`."""
    if not callable(getattr(model, "generate", None)):
        state.generate = None
        return
    state.generate = model.generate
    state.generate_was_attr = "generate" in model.__dict__
    model.generate = types.MethodType(routed_generate, model)


def remove_generate(model, state) -> None:
    if getattr(state, "generate", None) is None:
        return
    if state.generate_was_attr:
        model.generate = state.generate
    else:
        model.__dict__.pop("generate", None)
    state.generate = None



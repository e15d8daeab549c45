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
(:mod:`molora_ops.router_state`), so it follows beam reordering, cropping and batch selection.

Lifetime. At the start of every forward of the model's backbone (the module that holds the decoder blocks) a
hook turns the spec into ``topk_ids`` / ``topk_weights`` for exactly the tokens of this forward, builds one
:class:`~molora_ops.RoutingPlan` and puts both in a ContextVar that every patched layer reads; a closing hook
resets it. When an adapter also targets the output embedding (``lm_head``), which runs after the backbone, the
state is reset by a post-hook on the top-level model instead (``always_call=True``, so an exception resets it
too). HF CausalLMs call ``lm_head`` on the last ``logits_to_keep`` positions (``generate`` passes 1): such a
module uses the routing of the LAST L positions of each sequence; a tensor ``logits_to_keep`` (indices or a
mask) raises a RuntimeError naming the module instead of guessing.
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .patch_state import state_of
from .plan import RoutingPlan, build_plan
from .router_state import RouterHistory, attach, history_of

__all__ = ["routing", "RoutingSpec", "ForwardState", "dense_to_topk", "BASE"]

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


@dataclass
class ForwardRouting:
    """The routing of one forward: topk_ids [T, K], topk_weights [T, K] float32 and their shared plan."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    plan: RoutingPlan
    _moved: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> "ForwardRouting":
        """This routing on `device` (models split across devices get one copy per device, per forward)."""
        if self.topk_ids.device == device:
            return self
        hit = self._moved.get(device)
        if hit is None:
            ids = self.topk_ids.to(device)
            hit = self._moved[device] = ForwardRouting(ids, self.topk_weights.to(device), self.plan.to(device, ids))
        return hit


@dataclass
class ForwardState:
    """What the patched layers of one backbone forward share. Lives in a ContextVar from the backbone's pre-hook
    to its post-hook (or to the top-level model's post-hook when lm_head is routed).

    batch, seq: the forward's rows and new tokens; past_len: cached positions before them; attention_mask: [B, seq]
    1 for the new tokens that are not padding (None: all are); kv_cache: the cache object the forward continues
    (None if it got none); history: the stateful routers' per-position state."""

    batch: int
    seq: int
    past_len: int
    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    kv_cache: Any = None
    routing: Optional[ForwardRouting] = None
    router_pending: bool = False
    history: Optional[RouterHistory] = None
    block_routing: dict = field(default_factory=dict)  # per-layer routers: {block index: ForwardRouting}
    deltas: dict = field(default_factory=dict)  # fused q/k/v deltas and tail routings of this forward
    logits_to_keep: Any = None  # the top-level model's logits_to_keep argument (None if not given / unknown)
    token: Any = None

    def set_routing(self, ids: Optional[torch.Tensor], weights: Optional[torch.Tensor], num_adapters: int) -> None:
        if ids is None or ids.shape[-1] == 0:
            self.routing = None
            return
        ids = ids.reshape(-1, ids.shape[-1]).contiguous()
        weights = weights.reshape(-1, weights.shape[-1]).contiguous()
        self.routing = ForwardRouting(ids, weights, build_plan(ids, num_adapters))


def tail_routing(r: ForwardRouting, batch: int, seq: int, keep: int, num_adapters: int) -> ForwardRouting:
    """The routing of the last `keep` of `seq` positions of each of `batch` sequences (rows are batch-major)."""
    dev = r.topk_ids.device
    rows = (torch.arange(batch, device=dev)[:, None] * seq + torch.arange(seq - keep, seq, device=dev)[None]).reshape(-1)
    ids = r.topk_ids.index_select(0, rows).contiguous()
    return ForwardRouting(ids, r.topk_weights.index_select(0, rows).contiguous(), build_plan(ids, num_adapters))


@dataclass
class _Call:
    """One forward of the patched top-level model: the tokens to reset when it ends."""

    fwd_token: Any = None
    logits_to_keep: Any = None
    spec_token: Any = None
    token: Any = None


class RoutingSpec:
    """A user's routing request, validated against the patched model's adapters and turned into per-forward
    top-k ids/weights by :meth:`resolve`.

    kind "all": one routing for every token (ids [K]); "seq": one per sequence (ids [B, K]); "token": one per
    token (ids [B, S, K]). `batch` is B (None for "all"); `empty` means no token gets an adapter."""

    def __init__(self, adapter_names_order: list[str], *, adapter_names=None, adapter_weights=None, device=None):
        self.order = list(adapter_names_order)
        if (adapter_names is None) == (adapter_weights is None):
            raise ValueError("routing takes exactly one of adapter_names=... or adapter_weights=...")
        if adapter_names is not None:
            ids, w = self._from_names(adapter_names, device)
            self.kind = "seq"
        else:
            ids, w, self.kind = self._from_weights(adapter_weights, device)
        self.ids_w = (ids, w)
        self.batch = None if self.kind == "all" else int(ids.shape[0])
        self.empty = ids.shape[-1] == 0 or not bool((ids >= 0).any())

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
        return ids_t, (ids_t >= 0).to(torch.float32)

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
        if not bool(torch.isfinite(w).all()):
            raise ValueError("adapter_weights has NaN or infinite entries")
        if device is not None:
            w = w.to(device)
        ids, tw = dense_to_topk(w)
        return ids, tw, {1: "all", 2: "seq", 3: "token"}[w.dim()]

    def expanded(self, repeats: int) -> "RoutingSpec":
        """This routing with every sequence's row repeated `repeats` times in a row (generate's beams and
        returned sequences: ``repeat_interleave`` of the batch, as generate expands the inputs)."""
        if repeats == 1 or self.batch is None:
            return self
        out = object.__new__(RoutingSpec)
        out.__dict__.update(self.__dict__)
        out.ids_w = tuple(t.repeat_interleave(repeats, dim=0) for t in self.ids_w)
        out.batch = self.batch * repeats
        return out

    def resolve(self, batch: int, seq: int, past_len: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """topk ids/weights [batch * seq, K] for a forward of `seq` new tokens after `past_len` cached ones
        (None, None when no token gets an adapter). ValueError if the forward's batch is not the routing's."""
        if self.batch is not None and self.batch != batch:
            raise ValueError(
                f"the routing was given for {self.batch} sequences (adapter_names / adapter_weights rows) but the "
                f"forward has batch size {batch}"
            )
        if self.empty:
            return None, None
        ids, w = self.ids_w
        if self.kind == "all":
            k = ids.shape[-1]
            return ids.expand(batch * seq, k), w.expand(batch * seq, k)
        if self.kind == "seq":
            return ids.repeat_interleave(seq, dim=0), w.repeat_interleave(seq, dim=0)
        # per token: absolute positions past_len .. past_len + seq - 1, clamped to the rows given
        pos = torch.arange(past_len, past_len + seq, device=ids.device).clamp_max(ids.shape[1] - 1)
        return ids[:, pos], w[:, pos]


def _spec(state, adapter_names=None, adapter_weights=None) -> RoutingSpec:
    return RoutingSpec(state.adapter_names, adapter_names=adapter_names, adapter_weights=adapter_weights,
                       device=state.device())


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
    token = state.spec_var.set(_spec(state, adapter_names, adapter_weights))
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
    spec = _spec(state, names, weights) if names is not None or weights is not None else state.spec_var.get()
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


# ------------------------------------------------------------------------------------------------- hooks
def _cache_and_past(bound: dict):
    """(the KV cache object or None, cached positions) of a forward, whatever keyword carries the cache."""
    for value in bound.values():
        if value is not None and not isinstance(value, torch.Tensor) and hasattr(value, "get_seq_length"):
            return value, int(value.get_seq_length())
    position = bound.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() > 0:
        return None, int(position.reshape(-1)[0])
    return None, 0


def _new_token_mask(mask, past_len: int, seq: int) -> Optional[torch.Tensor]:
    """[B, seq] 1/0: which of a forward's new tokens are real (not padding), from the model's mask in either form
    generate passes: 2-D [B, >= past_len + seq] (1 = real), or 4-D [B, 1, seq, kv] where a real token attends to
    itself (bool True, or 0 in an additive float mask). None when there is no usable mask."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.shape[1] >= past_len + seq:
        return mask[:, past_len : past_len + seq]
    if mask.dim() == 4 and mask.shape[2] == seq and mask.shape[3] >= past_len + seq:
        rows = torch.arange(seq, device=mask.device)
        diag = mask[:, 0, rows, past_len + rows]  # [B, seq]
        return diag.to(torch.int64) if diag.dtype == torch.bool else (diag == 0).to(torch.int64)
    return None


def _cache_in(output):
    """The KV cache a backbone returned (``cache`` or ``past_key_values`` of its ModelOutput), if any."""
    values = output.values() if hasattr(output, "values") else (output if isinstance(output, tuple) else ())
    for value in values:
        if value is not None and not isinstance(value, torch.Tensor) and hasattr(value, "get_seq_length"):
            return value
    return None


class BackboneHooks:
    """The hooks of one patched model: routing kwargs on the top-level model, the forward state on the backbone
    (and on the top-level model when lm_head is routed), and the router's pre-hook on its block."""

    def __init__(self, state, model: torch.nn.Module, backbone: torch.nn.Module,
                 router_block: Optional[torch.nn.Module], top: Optional[torch.nn.Module] = None):
        """`model`: the object patch() was given (its calls take the routing kwargs). `top`: the patched
        top-level model, given when modules outside `backbone` (lm_head) are routed; the forward state then
        lives until the end of its forward."""
        self.state = state
        self.signature = self._signature(backbone)
        self.handles = [
            model.register_forward_pre_hook(self.kw_pre, with_kwargs=True),
            model.register_forward_hook(self.kw_post, always_call=True),
            backbone.register_forward_pre_hook(self.pre, with_kwargs=True),
            backbone.register_forward_hook(self.post, always_call=True),
        ]
        self.top_signature = None
        if top is not None and top is not backbone:
            self.top_signature = self._signature(top)
            self.handles += [
                top.register_forward_pre_hook(self.top_pre, with_kwargs=True),
                top.register_forward_hook(self.top_post, always_call=True),
            ]
        self.router_handle = None
        self.layer_handles = []
        self.set_router_block(router_block)

    def set_layer_routers(self, blocks, routers) -> None:
        """Per-layer routing: router i reads the hidden states entering block i and routes that block."""
        for h in self.layer_handles:
            h.remove()
        self.layer_handles = []
        for i, (block, router) in enumerate(zip(blocks, routers)):
            if router is not None:
                hook = functools.partial(self.layer_router_pre, index=i, router=router)
                self.layer_handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))

    def set_router_block(self, block: Optional[torch.nn.Module]) -> None:
        """(Re)attach the router's pre-hook to `block` (the block whose input hidden states it reads)."""
        if self.router_handle is not None:
            self.router_handle.remove()
            self.router_handle = None
        if block is not None:
            self.router_handle = block.register_forward_pre_hook(self.router_pre, with_kwargs=True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.set_router_block(None)
        self.set_layer_routers([], [])

    @staticmethod
    def _signature(module):
        try:
            return inspect.signature(module.forward)
        except (TypeError, ValueError):
            return None

    def _bind(self, args, kwargs, signature=False) -> dict:
        signature = self.signature if signature is False else signature
        if signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
                extra = bound.pop("kwargs", None)  # **kwargs collected by name
                bound = dict(bound)
                if isinstance(extra, dict):
                    for k, v in extra.items():
                        bound.setdefault(k, v)
                return bound
            except TypeError:
                pass
        bound = dict(kwargs)
        if args:
            bound.setdefault("input_ids", args[0])
        return bound

    # --- routing kwargs on the top-level call: model(..., adapter_names=[...])
    def kw_pre(self, module, args, kwargs):
        state = self.state
        names, weights = kwargs.pop("adapter_names", None), kwargs.pop("adapter_weights", None)
        call = _Call()
        if names is not None or weights is not None:
            call.spec_token = state.spec_var.set(_spec(state, names, weights))
        call.token = state.kw_var.set(call)
        return args, kwargs

    def kw_post(self, module, args, output):
        state = self.state
        call = state.kw_var.get()
        if call is not None:
            if call.spec_token is not None:
                state.spec_var.reset(call.spec_token)
            state.kw_var.reset(call.token)
        return None

    # --- the top-level forward, when lm_head is routed: the state lives until it ends
    def top_pre(self, module, args, kwargs):
        state = self.state
        keep = None
        if state.spec_var.get() is not None or state.router is not None:
            bound = self._bind(args, kwargs, self.top_signature)
            keep = bound.get("logits_to_keep", bound.get("num_logits_to_keep"))
        call = _Call(fwd_token=state.fwd_var.set(None), logits_to_keep=keep)
        call.token = state.top_var.set(call)
        return None

    def top_post(self, module, args, output):
        state = self.state
        call = state.top_var.get()
        if call is not None:
            state.fwd_var.reset(call.fwd_token)  # whatever the backbone's forwards set, reset here
            state.top_var.reset(call.token)
        return None

    # --- the backbone
    def pre(self, module, args, kwargs):
        state = self.state
        spec = state.spec_var.get()
        if spec is None and state.router is None:
            return None  # the exact base model: no forward state at all
        bound = self._bind(args, kwargs)
        input_ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        batch, seq = int(ref.shape[0]), int(ref.shape[1])
        cache, past_len = _cache_and_past(bound)
        fs = ForwardState(batch, seq, past_len, input_ids, _new_token_mask(bound.get("attention_mask"), past_len, seq),
                          kv_cache=cache)
        top = state.top_var.get()
        fs.logits_to_keep = top.logits_to_keep if top is not None else bound.get("logits_to_keep")
        if spec is not None:
            ids, w = spec.resolve(batch, seq, past_len)
            fs.set_routing(ids, w, len(state.adapter_names))
        else:
            fs.router_pending = True
        fs.token = state.fwd_var.set(fs)
        return None

    def post(self, module, args, output):
        fs = self.state.fwd_var.get()
        if fs is None:
            return None
        if fs.history is not None:  # keep the stateful routers' state beside the cache this forward filled
            cache = fs.kv_cache if fs.kv_cache is not None else _cache_in(output)
            if cache is not None:
                attach(cache, fs.history)
            fs.history = None
        if self.state.top_var.get() is not None:
            return None  # inside the top-level model's forward: its post-hook resets the state (lm_head runs later)
        if fs.token is not None:
            self.state.fwd_var.reset(fs.token)
        return None

    # --- routers
    def router_pre(self, module, args, kwargs):
        state = self.state
        fs = state.fwd_var.get()
        if fs is None or not fs.router_pending or state.router is None:
            return None
        fs.router_pending = False
        ids, w = self._route(state.router, fs, args, kwargs)
        fs.set_routing(ids, w, len(state.adapter_names))
        return None

    def layer_router_pre(self, module, args, kwargs, *, index, router):
        fs = self.state.fwd_var.get()
        if fs is None or not fs.router_pending or not isinstance(self.state.router, (list, tuple, torch.nn.ModuleList)):
            return None
        ids, w = self._route(router, fs, args, kwargs)
        fs.set_routing(ids, w, len(self.state.adapter_names))
        fs.block_routing[index], fs.routing = fs.routing, None
        return None

    def _route(self, router, fs, args, kwargs):
        """Run `router` on the hidden states entering its block. Under grad mode the routing weights keep their
        graph (the router trains through the patched model); the per-position state is stored detached."""
        if fs.history is None:
            cached = history_of(fs.kv_cache) if fs.past_len > 0 else None
            fs.history = cached if cached is not None else RouterHistory()
        hidden = args[0] if args else kwargs.get("hidden_states")
        probs = router(hidden, input_ids=fs.input_ids, attention_mask=fs.attention_mask, past_len=fs.past_len,
                       state=fs.history.view(fs.past_len, fs.batch))
        return router.select(probs, self.state.top_k)

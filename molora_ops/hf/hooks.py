"""Per-forward hooks of a patched model: what one forward of the backbone routes, and where it keeps it.

At the start of every forward of the model's backbone (the module holding the decoder blocks) :class:`BackboneHooks`
turns the active routing (a :class:`~molora_ops.hf.routing.RoutingSpec`, or the router run on the hidden states
entering its block) into top-k ids/weights for exactly this forward's tokens and puts a :class:`ForwardState` in a
per-call value (hf/state.py) that every patched layer reads; a closing hook resets it. Positions come from the KV cache object (or
``cache_position``), never from keyword names. See :mod:`molora_ops.hf.routing` for the user-facing rules.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..runtime import RoutedBatch
from .router_state import RouterHistory, attach, history_of
from .routing import RoutingSpec, spec_for
from .state import tracing

__all__ = ["BackboneHooks", "ForwardState", "tail_routing"]


@dataclass
class ForwardState:
    """What the patched layers of one backbone forward share. Lives in the model's ``fwd_var`` (hf/state.py) from the
    backbone's pre-hook to its post-hook (or to the top-level model's post-hook when lm_head is routed).

    batch, seq: the forward's rows and new tokens; past_len: cached positions before them; attention_mask: [B, seq]
    1 for the new tokens that are not padding (None: all are); kv_cache: the cache object the forward continues
    (None if it got none); history: the stateful routers' per-position state."""

    batch: int
    seq: int
    past_len: int
    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    kv_cache: Any = None
    backend: str = "auto"
    num_adapters: int = 1
    routing: Optional[RoutedBatch] = None
    router_pending: bool = False
    history: Optional[RouterHistory] = None
    block_routing: dict = field(default_factory=dict)  # per-layer routers: {block index: RoutedBatch}
    deltas: dict = field(default_factory=dict)  # sibling groups' shared shrinks and tail routings of this forward
    logits_to_keep: Any = None  # the top-level model's logits_to_keep argument (None if not given / unknown)
    token: Any = None

    def set_routing(self, ids: Optional[torch.Tensor], weights: Optional[torch.Tensor]) -> None:
        """Route this forward's tokens by ids/weights [..., K] (batch-major rows; None or K = 0: the base model).
        The ids come from a validated spec or a router's top-k, so their values are not re-read."""
        if ids is None or ids.shape[-1] == 0:
            self.routing = None
            return
        ids = ids.reshape(-1, ids.shape[-1]).contiguous()
        weights = weights.reshape(-1, weights.shape[-1]).contiguous()
        self.routing = RoutedBatch.build(ids, weights, self.num_adapters, backend=self.backend, validate=False)

    def set_spec(self, spec: RoutingSpec) -> None:
        """Route this forward by a user's spec: one adapter per sequence (names) as contiguous row runs, anything
        else as per-token top-k. ValueError if the forward's batch is not the spec's."""
        seq_ids = spec.sequence_ids(self.batch)
        if seq_ids is None:
            self.set_routing(*spec.resolve(self.batch, self.seq, self.past_len))
        elif spec.empty:
            self.routing = None
        else:
            self.routing = RoutedBatch.for_sequences(seq_ids, self.seq, self.num_adapters, backend=self.backend)


def tail_routing(r: RoutedBatch, batch: int, seq: int, keep: int) -> RoutedBatch:
    """The routing of the last `keep` of `seq` positions of each of `batch` sequences (rows are batch-major)."""
    dev = r.topk_ids.device
    rows = (torch.arange(batch, device=dev)[:, None] * seq + torch.arange(seq - keep, seq, device=dev)[None]).reshape(-1)
    ids = r.topk_ids.index_select(0, rows).contiguous()
    weights = r.topk_weights.index_select(0, rows).contiguous()
    return RoutedBatch.build(ids, weights, r.num_adapters, backend=r.backend, validate=False)


@dataclass
class _Call:
    """One forward of the patched top-level model: the tokens to reset when it ends."""

    fwd_token: Any = None
    logits_to_keep: Any = None
    spec_token: Any = None
    token: Any = None


# ------------------------------------------------------------------------------------------------- hooks
def _is_cache(value) -> bool:
    """A transformers KV cache object (duck-typed: whatever keyword or output field carries it)."""
    return value is not None and not isinstance(value, torch.Tensor) and hasattr(value, "get_seq_length")


def _cache_and_past(bound: dict, traced: bool):
    """(the KV cache object or None, cached positions) of a forward, whatever keyword carries the cache. The
    positions are an int, or while tracing whatever the cache reports (a tensor for a static cache: no host read)."""
    for value in bound.values():
        if _is_cache(value):
            past = value.get_seq_length()
            return value, past if traced else int(past)
    position = bound.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() > 0:
        first = position.reshape(-1)[0]
        return None, first if traced else int(first)
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
    return next((value for value in values if _is_cache(value)), None)


def _parameter_names(module: torch.nn.Module) -> Optional[tuple]:
    """The names of `module.forward`'s positional parameters, in order (None if it has no readable signature)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


class BackboneHooks:
    """The hooks of one patched model: routing kwargs on the top-level model, the forward state on the backbone
    (and on the top-level model when lm_head is routed), and the router's pre-hook on its block."""

    def __init__(self, state, model: torch.nn.Module, backbone: torch.nn.Module,
                 router_block: Optional[torch.nn.Module], top: Optional[torch.nn.Module] = None):
        """`model`: the object patch() was given (its calls take the routing kwargs). `top`: the patched
        top-level model, given when modules outside `backbone` (lm_head) are routed; the forward state then
        lives until the end of its forward."""
        self.state = state
        self.signature = _parameter_names(backbone)
        self.handles = [
            model.register_forward_pre_hook(self.kw_pre, with_kwargs=True),
            model.register_forward_hook(self.kw_post, always_call=True),
            backbone.register_forward_pre_hook(self.pre, with_kwargs=True),
            backbone.register_forward_hook(self.post, always_call=True),
        ]
        self.top_signature = None
        if top is not None and top is not backbone:
            self.top_signature = _parameter_names(top)
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

    def _bind(self, args, kwargs, names=False) -> dict:
        """{parameter name: value} of a forward call: positional args named by the forward's signature (read at
        patch time; plain Python, so torch.compile traces it), keyword args as given."""
        names = self.signature if names is False else names
        bound = dict(kwargs)
        for name, value in zip(names or ("input_ids",), args):
            bound.setdefault(name, value)
        return bound

    # --- routing kwargs on the top-level call: model(..., adapter_names=[...])
    # These two run eagerly even inside torch.compile: turning names into ids is host work, and traced it would
    # make the compiled code guard on every name (one recompile per distinct list). The top-level model's hooks
    # run outside its compiled forward's frame, so this costs no graph break; the forward reads the spec from the
    # per-model copy (hf/state.py), guarded on tensor metadata only.
    @torch.compiler.disable
    def kw_pre(self, module, args, kwargs):
        state = self.state
        names, weights = kwargs.pop("adapter_names", None), kwargs.pop("adapter_weights", None)
        call = _Call()
        if names is not None or weights is not None:
            call.spec_token = state.spec_var.set(spec_for(state, names, weights, by_reference=False))
        call.token = state.kw_var.set(call)
        return args, kwargs

    @torch.compiler.disable
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
        batch, seq = ref.shape[0], ref.shape[1]
        traced = tracing()
        cache, past_len = _cache_and_past(bound, traced)
        # the new tokens' padding mask is read only by stateful routers (never under a spec; traced, only for a
        # forward that starts its sequences, where the mask's slice needs no cache length)
        fresh = cache is None and isinstance(past_len, int) and past_len == 0
        needs_mask = spec is None and (fresh or not traced)
        mask = _new_token_mask(bound.get("attention_mask"), past_len, seq) if needs_mask else None
        fs = ForwardState(batch, seq, past_len, input_ids, mask, kv_cache=cache, backend=state.backend,
                          num_adapters=len(state.adapter_names))
        top = state.top_var.get()
        fs.logits_to_keep = top.logits_to_keep if top is not None else bound.get("logits_to_keep")
        if spec is not None:
            fs.set_spec(spec)
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
        fs.set_routing(*self._route(state.router, fs, args, kwargs))
        return None

    def layer_router_pre(self, module, args, kwargs, *, index, router):
        fs = self.state.fwd_var.get()
        if fs is None or not fs.router_pending or not isinstance(self.state.router, (list, tuple, torch.nn.ModuleList)):
            return None
        fs.set_routing(*self._route(router, fs, args, kwargs))
        fs.block_routing[index], fs.routing = fs.routing, None
        return None

    def _route(self, router, fs, args, kwargs):
        """Run `router` on the hidden states entering its block. Under grad mode the routing weights keep their
        graph (the router trains through the patched model); a stateful router's per-position state is stored
        detached beside the cache."""
        state = None
        if tracing():
            self._check_traceable(router, fs)
        elif getattr(router, "stateful", False):
            if fs.history is None:
                cached = history_of(fs.kv_cache) if fs.past_len > 0 else None
                fs.history = cached if cached is not None else RouterHistory()
            state = fs.history.view(fs.past_len, fs.batch)
        hidden = args[0] if args else kwargs.get("hidden_states")
        probs = router(hidden, input_ids=fs.input_ids, attention_mask=fs.attention_mask, past_len=fs.past_len,
                       state=state)
        return router.select(probs, self.state.top_k)

    @staticmethod
    def _check_traceable(router, fs) -> None:
        """While compiling or capturing: a stateless router always runs; a stateful one (ContextRouter) only on a
        forward that starts its sequences (no cache to continue: its state starts empty and is not kept beside the
        cache, so continuing that cache later raises a clear error). KeywordRouter matches keywords on the host."""
        name = type(router).__name__
        if not getattr(router, "traceable", True):
            raise NotImplementedError(
                f"molora_ops: {name} matches keywords with Python loops over the token ids, which torch.compile and "
                "CUDA-graph capture cannot follow; run it eagerly, or route with a TokenRouter or a routing() block"
            )
        fresh = fs.kv_cache is None and isinstance(fs.past_len, int) and fs.past_len == 0
        if getattr(router, "stateful", False) and not fresh:
            raise NotImplementedError(
                f"molora_ops: {name} keeps per-position state beside the KV cache in Python objects, which "
                "torch.compile and CUDA-graph capture cannot follow across cached steps; a compiled forward may start "
                "sequences (no cache), cached steps run eagerly; or route with a TokenRouter or a routing() block"
            )


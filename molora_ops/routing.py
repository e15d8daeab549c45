"""Which adapters each token uses, decided inside the forward pass and held per call in contextvars.

``with mo.routing(model, adapter_names=[...])`` or ``adapter_weights=...`` sets a :class:`RoutingSpec` in a
ContextVar owned by the patched model. At the start of every forward of the model's backbone (the module that
holds the decoder blocks) a hook turns the spec into ``topk_ids`` / ``topk_weights`` for exactly the tokens of
this forward, builds one :class:`~molora_ops.RoutingPlan` and puts both in a second ContextVar that every
patched layer reads; a closing hook clears it. When an adapter also targets a module that runs after the
backbone (the output embedding ``lm_head`` of a CausalLM), the state is cleared by a post-hook on the patched
top-level model instead (``always_call=True``, so an exception clears it too), so that ``lm_head`` still sees it.

``lm_head`` and ``logits_to_keep``: HF CausalLMs call ``self.lm_head(hidden_states[:, -logits_to_keep:, :])``
(``generate`` passes ``logits_to_keep=1``), so ``lm_head`` may see L < S of the S routed positions. Such a module
uses the routing of the LAST L positions of each sequence, which is exactly what an int ``logits_to_keep``
selects. A tensor ``logits_to_keep`` (explicit indices or a mask) raises a RuntimeError naming the module
instead of guessing which positions it kept. Prefill and each KV-cached decode step are separate forwards,
and the position of their tokens comes from the cache length, so per-token weights index the right positions
and the cache keeps working (routing never needs a second pass).

ContextVars are per thread (and per asyncio task), so two threads serving different requests through the same
patched model never see each other's routing.

Spec forms (N adapters, in the order given to ``patch``):
    adapter_names  list of B names, one per sequence; "__base__" = no adapter for that sequence
    adapter_weights
        dict {name: w}          one blend for every token (missing names weigh 0)
        [N]                     the same, as a tensor
        [B, N]                  one blend per sequence
        [B, S, N]               one blend per token; position p of a forward uses row min(p, S - 1), so decode
                                steps past the given length keep the last row's blend
Zero weights are dropped before the kernels see them: dense weights become top-k ids with K = the most
non-zero entries any token has, and -1 (an empty slot, which costs nothing) where a token has fewer.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .plan import RoutingPlan, build_plan

__all__ = ["routing", "RoutingSpec", "ForwardState", "dense_to_topk", "BASE"]

BASE = "__base__"
_FORWARDS = itertools.count()


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
            hit = self._moved[device] = ForwardRouting(
                ids, self.topk_weights.to(device),
                RoutingPlan(self.plan.sorted_pairs.to(device), self.plan.seg_offsets.to(device),
                            self.plan.num_tokens, self.plan.top_k, self.plan.num_adapters),
            )
        return hit


@dataclass
class ForwardState:
    """What the patched layers of one forward share. Lives in a ContextVar from the backbone's pre-hook to its
    post-hook."""

    batch: int
    seq: int
    past_len: int
    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    routing: Optional[ForwardRouting] = None
    router_pending: bool = False
    block_routing: dict = field(default_factory=dict)  # per-layer routers: {block index: ForwardRouting}
    cache: dict = field(default_factory=dict)  # fused q/k/v deltas of this forward, keyed by group
    logits_to_keep: Any = None  # the top-level model's logits_to_keep argument (None if not given / unknown)
    token: Any = None
    serial: int = field(default_factory=lambda: next(_FORWARDS))

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
class _TopCall:
    """One forward of the patched top-level model (when modules outside the backbone are routed)."""

    fwd_token: Any
    logits_to_keep: Any
    token: Any = None


class RoutingSpec:
    """A user's routing request, validated against the patched model's adapters and turned into per-forward
    top-k ids/weights by :meth:`resolve`."""

    def __init__(self, adapter_names_order: list[str], *, adapter_names=None, adapter_weights=None, device=None):
        self.order = list(adapter_names_order)
        n = len(self.order)
        index = {name: i for i, name in enumerate(self.order)}
        self.kind: str
        self.empty = False
        if (adapter_names is None) == (adapter_weights is None):
            raise ValueError("routing() takes exactly one of adapter_names=... or adapter_weights=...")
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
                raise TypeError(f"adapter_names must be a list of names (one per sequence), got {adapter_names!r}")
            ids = []
            for name in adapter_names:
                if name == BASE:
                    ids.append(-1)
                elif name in index:
                    ids.append(index[name])
                else:
                    raise ValueError(f"unknown adapter name {name!r} in routing(); known: {self.order + [BASE]}")
            self.kind = "seq"
            self.ids = torch.tensor(ids, dtype=torch.int64, device=device)[:, None]  # [B, 1]
            self.weights = torch.ones(self.ids.shape, dtype=torch.float32, device=device)
            self.ids_w = (self.ids, self.weights)
            self.empty = all(i < 0 for i in ids)
            self.batch = len(ids)
            return
        w = adapter_weights
        if isinstance(w, dict):
            unknown = [k for k in w if k not in index]
            if unknown:
                raise ValueError(f"unknown adapter name(s) {unknown} in routing(); known: {self.order}")
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
        self.empty = ids.shape[-1] == 0
        self.ids_w = (ids, tw)
        self.kind = {1: "all", 2: "seq", 3: "token"}[w.dim()]
        self.batch = None if w.dim() == 1 else w.shape[0]

    def resolve(self, batch: int, seq: int, past_len: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """topk ids/weights [batch * seq, K] for a forward of `seq` new tokens after `past_len` cached ones."""
        if self.empty:
            return None, None
        ids, w = self.ids_w
        if self.batch is not None and self.batch != batch:
            raise ValueError(
                f"routing was given for a batch of {self.batch} sequences but the forward has batch size {batch}"
            )
        if self.kind == "all":
            k = ids.shape[-1]
            return ids.expand(batch * seq, k), w.expand(batch * seq, k)
        if self.kind == "seq":
            return ids.repeat_interleave(seq, dim=0), w.repeat_interleave(seq, dim=0)
        # per token: absolute positions past_len .. past_len + seq - 1, clamped to the rows given
        pos = torch.arange(past_len, past_len + seq, device=ids.device).clamp_max(ids.shape[1] - 1)
        return ids[:, pos], w[:, pos]


@contextmanager
def routing(model, adapter_names=None, adapter_weights=None):
    """Route a patched model's forwards (and ``generate``) inside this block.

    Exactly one of:
        adapter_names: list of B adapter names, one per sequence ("__base__" for none), as PEFT's mixed batch.
        adapter_weights: dict {name: weight}, or a tensor [N], [B, N] (per sequence) or [B, S, N] (per token),
            N in the order of the adapters given to ``patch``. A blend computes sum_i w_i * s_i * B_i A_i x, which
            is PEFT's ``add_weighted_adapter(..., combination_type="cat")``.
    The routing is per thread / task (contextvars). Yields the validated RoutingSpec.
    """
    from .patch import _state_of

    state = _state_of(model)
    spec = RoutingSpec(
        state.adapter_names, adapter_names=adapter_names, adapter_weights=adapter_weights, device=state.device()
    )
    token = state.spec_var.set(spec)
    try:
        yield spec
    finally:
        state.spec_var.reset(token)


# ------------------------------------------------------------------------------------------------- hooks
def _past_length(pkv) -> int:
    if pkv is None:
        return 0
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(pkv[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class BackboneHooks:
    """Pre/post hooks on the backbone (and, for router mode, on the router's block) of one patched model."""

    def __init__(self, state, backbone: torch.nn.Module, router_block: Optional[torch.nn.Module],
                 top: Optional[torch.nn.Module] = None):
        """`top`: the patched top-level model, given when modules outside `backbone` (lm_head) are routed; the
        forward state then lives until the end of its forward."""
        self.state = state
        self.signature = self._signature(backbone)
        self.handles = [
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

    def top_pre(self, module, args, kwargs):
        """Start of the top-level model's forward: the backbone's post-hook leaves the state for top_post."""
        state = self.state
        keep = None
        if state.spec_var.get() is not None or state.router is not None:
            bound = self._bind(args, kwargs, self.top_signature)
            keep = bound.get("logits_to_keep", bound.get("num_logits_to_keep"))
        call = _TopCall(state.fwd_var.set(None), keep)
        call.token = state.top_var.set(call)
        return None

    def top_post(self, module, args, output):
        state = self.state
        call = state.top_var.get()
        if call is not None:
            state.fwd_var.reset(call.fwd_token)  # whatever the backbone's forwards set, cleared here
            state.top_var.reset(call.token)
        return None

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
        fs = ForwardState(batch, seq, _past_length(bound.get("past_key_values")), input_ids, bound.get("attention_mask"))
        top = state.top_var.get()
        fs.logits_to_keep = top.logits_to_keep if top is not None else bound.get("logits_to_keep")
        if spec is not None:
            ids, w = spec.resolve(batch, seq, fs.past_len)
            fs.set_routing(ids, w, len(state.adapter_names))
        else:
            fs.router_pending = True
        fs.token = state.fwd_var.set(fs)
        return None

    def post(self, module, args, output):
        if self.state.top_var.get() is not None:
            return None  # inside the top-level model's forward: its post-hook clears the state (lm_head runs later)
        fs = self.state.fwd_var.get()
        if fs is not None and fs.token is not None:
            self.state.fwd_var.reset(fs.token)
        return None

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
        state = self.state
        hidden = args[0] if args else kwargs.get("hidden_states")
        rstate = state.router_state_var.get()
        if rstate is None or (fs.past_len == 0 and rstate.get("_forward") != fs.serial):
            rstate = {"_forward": fs.serial}  # a new sequence: running router state starts empty
            state.router_state_var.set(rstate)
        with torch.no_grad():
            probs = router(hidden, input_ids=fs.input_ids, attention_mask=fs.attention_mask, past_len=fs.past_len,
                           state=rstate)
            return router.select(probs, state.top_k)

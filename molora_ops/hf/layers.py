"""The routed module classes of a patched model: what a patched projection does in its forward.

A patched ``nn.Linear`` / GPT-2 ``Conv1D`` instance gets the class ``Routed<Class>`` (the original class with
:class:`_RoutedMixin` in front): it runs the original forward, then adds the routed LoRA delta of this forward's
routing (read from the :class:`~molora_ops.hf.hooks.ForwardState`) into the output in place. Its
:class:`Slot` says where the stacked weights live and which sibling group it belongs to. The semantics are
``routed_lora``'s (:mod:`molora_ops.reference`).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

from .bias import add_routed_bias
from .hooks import tail_routing
from .tensor_parallel import all_reduce_rank_space, check_inference

__all__ = ["io_features", "routed_class", "Group", "Slot", "block_index"]

_counter = itertools.count()


def io_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of a supported projection, else None. GPT-2's Conv1D stores weight as [in, out]
    (fan_in_fan_out); PEFT's A [r, in] and B [out, r] are the same for both kinds."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)
    return None



# --------------------------------------------------------------------------------------- patched classes
class _RoutedMixin:
    """Mixed in front of the original class of a patched instance."""

    def forward(self, x, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        return self._molora_slot.apply(self, x, out)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, {self._molora_slot.describe()}" if base else self._molora_slot.describe()

    def __repr__(self) -> str:
        base_repr = self._molora_orig_class.__repr__
        if base_repr is nn.Module.__repr__:
            return nn.Module.__repr__(self)
        text = base_repr(self)  # e.g. Conv1D's own "Conv1D(nf=.., nx=..)"
        return f"Routed{text[:-1]}, {self._molora_slot.describe()})" if text.endswith(")") else text


_CLASSES: dict[type, type] = {}


def routed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Routed{cls.__name__}", (_RoutedMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


class Group:
    """Sibling modules that read the same input (q/k/v, gate/up): one shrink over their concatenated A
    (stored on the leader, ``molora_lora_a`` [N, R_1 + ... + R_m, H_in]) serves them all; each member keeps its own
    B (its scaling folded in) and adds its own delta straight into its own output."""

    def __init__(self, leader: nn.Module, names: list[str]):
        self.leader = leader
        self.names = names
        self.key = next(_counter)


class Slot:
    """Per patched module: where its stacked weights live and how to add its delta."""

    def __init__(self, state, name: str, in_f: int, out_f: int, ranks: list[int], group=None, rank_slice=None,
                 outside: bool = False, tp=None):
        """in_f / out_f: the sizes the module's forward sees (this rank's shard under tensor parallelism); tp: its
        :class:`~molora_ops.hf.tensor_parallel.Layout`, or None when the module is not tensor-parallel."""
        self.state = state
        self.tp = tp
        self.outside = outside  # lm_head: runs after the backbone, maybe on the last logits_to_keep positions only
        self.name = name
        self.block = block_index(state, name)
        self.in_f, self.out_f = in_f, out_f
        self.ranks = ranks  # each adapter's real rank; mixed ranks are also the module's int32 `molora_ranks` buffer
        self.group: Optional[Group] = group
        self.rank_slice = rank_slice  # this member's columns of the group's shared rank space
        self._cast: dict = {}

    def describe(self) -> str:
        text = f"adapters={len(self.ranks)}, r={max(self.ranks)}"
        if self.group is not None:
            text += f", fused={'+'.join(self.group.names)}"
        if self.tp is not None:
            text += f", {self.tp.describe()}"
        return text

    def _cast_to(self, owner: nn.Module, buffer: str, dtype: torch.dtype) -> torch.Tensor:
        """owner's stacked weight `buffer` in `dtype` (autocast: the base output's dtype), cast once. Read from
        ``_buffers`` directly (what ``model.to`` replaces), skipping nn.Module's attribute fallback per call."""
        w = owner._buffers[buffer]
        if w.dtype == dtype:
            return w
        if torch.compiler.is_compiling():
            return w.to(dtype)  # a graph op; the compiler hoists or fuses it
        key = (id(owner), buffer, dtype, w.device, w.data_ptr())
        hit = self._cast.get(key)
        if hit is None:
            hit = self._cast[key] = w.to(dtype)
        return hit

    def apply(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        fs = self.state.fwd_var.get()
        if fs is None:
            return out
        r = fs.routing
        if r is None:
            if self.outside and fs.router_pending and isinstance(self.state.router, (list, tuple, nn.ModuleList)):
                raise RuntimeError(
                    f"molora_ops: {self.name} is targeted by an adapter but lies outside the decoder blocks, and "
                    "per-layer routers route only the blocks; use a routing() context or a single router"
                )
            if not fs.block_routing or self.block is None:
                return out
            r = fs.block_routing.get(self.block)  # per-layer routers
            if r is None:
                return out
        r = r.to(x.device)
        x2 = x.reshape(-1, self.in_f)
        if self.outside:
            r = self._outside_routing(fs, r, x, x2)
        if x2.shape[0] != r.topk_ids.shape[0]:
            raise RuntimeError(
                f"molora_ops: {self.name} got {x2.shape[0]} tokens but this forward was routed for "
                f"{r.topk_ids.shape[0]} (batch x new tokens); modules called on other token sets are not supported"
            )
        o2 = out.view(-1, self.out_f)
        x2 = x2.to(o2.dtype).contiguous()  # under autocast the base output's dtype is the compute dtype
        if torch.is_autocast_enabled(x.device.type):
            # The LoRA math runs in the base output's dtype with float32 accumulation, not re-cast by autocast.
            with torch.autocast(x.device.type, enabled=False):
                return self._add(module, fs, r, x, x2, out, o2)
        return self._add(module, fs, r, x, x2, out, o2)

    def _outside_routing(self, fs, r, x, x2):
        """lm_head's routing: all S positions, or the last L of each sequence (an int logits_to_keep = L)."""
        keep = fs.logits_to_keep
        if isinstance(keep, torch.Tensor):
            raise RuntimeError(
                f"molora_ops: {self.name} is routed, but logits_to_keep was given as a tensor (explicit positions or "
                "a mask), so which routed positions it sees is not known; pass an int logits_to_keep (last N "
                "positions) or 0 (all)"
            )
        b, s, t = fs.batch, fs.seq, x2.shape[0]
        if t == b * s:
            return r
        keep_n = int(x.shape[-2]) if x.dim() >= 3 else -1
        if x.dim() >= 3 and x.shape[0] == b and 0 < keep_n < s and t == b * keep_n:
            key = ("tail", keep_n, r.topk_ids.device)
            hit = fs.deltas.get(key)
            if hit is None:
                hit = fs.deltas[key] = tail_routing(r, b, s, keep_n)
            return hit
        raise RuntimeError(
            f"molora_ops: {self.name} got input {tuple(x.shape)} but this forward was routed for {b} sequences x {s} "
            "new tokens; only all positions or the last N of each sequence (logits_to_keep=N) are supported"
        )

    def _add(self, module, fs, r, x, x2, out, o2):
        """Add this module's routed LoRA delta (and routed bias delta, if its adapters changed its bias) into
        the base output; returns the output (a new tensor only when autograd needs the bias add out of place)."""
        dtype = x2.dtype
        lora_b = self._cast_to(module, "molora_lora_b", dtype)
        if self.tp is not None:
            check_inference(self.name, x2, o2, lora_b, r.topk_weights)
        # mixed ranks: int32 [N] bound (a member's, within its rank_slice; the group's shared shrink is unbounded,
        # its padding being zero); uniform ranks: no buffer, so the kernels take their unbounded path at no cost
        ranks = module._buffers.get("molora_ranks")
        if self.group is None:
            lora_a = self._cast_to(module, "molora_lora_a", dtype)
            if self.tp is not None and self.tp.kind == "shard_in":  # partial shrink of this rank's columns, summed
                h = r.shrink(x2, lora_a, ranks=ranks)
                all_reduce_rank_space(h, self.tp.group)
                r.expand_(h, lora_b, o2, scale=module._buffers["molora_scaling"], ranks=ranks)
            else:
                r.add_(x2, lora_a, lora_b, o2, scale=module._buffers["molora_scaling"], ranks=ranks)
        else:
            hit = fs.deltas.get(self.group.key)
            if hit is None or hit[0] is not x:  # the first member called with this input shrinks for the group
                lora_a = self._cast_to(self.group.leader, "molora_lora_a", dtype)
                hit = fs.deltas[self.group.key] = (x, r.shrink(x2, lora_a))
            r.expand_(hit[1], lora_b, o2, rank_slice=self.rank_slice, ranks=ranks)  # scaling folded into B
        bias = module._buffers.get("molora_bias_delta")
        if bias is None:
            return out
        return add_routed_bias(o2, r.topk_ids, r.topk_weights, bias).view(out.shape)


def block_index(state, module_name: str) -> Optional[int]:
    prefix = state.blocks_prefix
    if prefix is None or not module_name.startswith(prefix):
        return None
    head = module_name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


"""Per-token top-k mixtures of adapters inside vLLM: a punica-wrapper subclass and the router's layer hook.

A routed adapter (``route:<router>``, built by :mod:`molora_ops.vllm.store`) is one vLLM LoRA whose rank axis
holds the router's N adapters in equal segments of `width` ranks, adapter i's scaling folded into its A rows, so
slot s of a layer's stacked weights views as A [N, width, in] and B [N, out, width] (:func:`compat.slot_weights`).

Per step (``update_metadata``) the wrapper hands vLLM's own kernels a mapping in which routed tokens have no LoRA,
and marks which tokens belong to which routed adapter in static buffers. A forward pre-hook on decoder layer
``router.layer`` runs the router on the residual stream entering that layer, takes each token's top-k
(``router.select``), writes ids (-1 for tokens that are not routed) and weights into static [max_tokens, K]
buffers and builds one routing plan for the forward; a pre-hook on layer 0 first resets the ids to -1, so layers
before ``router.layer`` add no routed delta (as ``molora_ops.patch`` does). ``add_lora_linear`` then adds, for
each slice, ``lora_expand(lora_shrink(x, A, ids, weights), B, ids)`` (molora_ops' ops, backend from
``MOLORA_VLLM_BACKEND``, default "auto") into the layer's output after vLLM's own LoRA for the other tokens.
On platforms whose punica ops read the last slot for a token without LoRA (:func:`compat.empty_slot_reads_last_lora`),
the rows of such tokens (routed or base) are restored after vLLM's own LoRA in batches that mix them with LoRA tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..hf.routers import load_router
from ..ops import lora_expand, lora_shrink
from ..plan import build_plan
from . import compat
from .store import ROUTER_SUBDIR, ROUTING_MARKER

__all__ = ["RoutedAdapter", "make_wrapper_class", "on_adapter_loaded"]


@dataclass
class RoutedAdapter:
    """One loaded routed adapter: its router, layout and static per-token buffers."""

    lora_id: int
    router: torch.nn.Module
    num_adapters: int
    width: int
    top_k: int
    ids: torch.Tensor          # [max_tokens, top_k] int64, -1 = no routed delta
    weights: torch.Tensor      # [max_tokens, top_k] float32
    member: torch.Tensor       # [max_tokens] bool: the token belongs to this adapter in the current batch
    slot: int = -1             # its vLLM slot in the current batch, -1 when it has no tokens
    plan: object = field(default=None)


def _read_marker(path: str) -> dict | None:
    marker = os.path.join(path, ROUTING_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as fh:
        return json.load(fh)


def _mixin(base: type) -> type:
    class RoutedPunicaWrapper(base):
        """The platform's punica wrapper, plus per-token top-k mixtures for routed adapters (module docstring)."""

        def __init__(self, max_num_batched_tokens: int, *args, **kwargs):
            super().__init__(max_num_batched_tokens, *args, **kwargs)
            self.molora_max_tokens = int(max_num_batched_tokens)
            self.molora_routed: dict[int, RoutedAdapter] = {}
            self.molora_active: list[RoutedAdapter] = []
            self.molora_backend = os.environ.get("MOLORA_VLLM_BACKEND", "auto")
            # tokens without a LoRA for vLLM's kernels (routed ones included) whose rows must stay untouched by them
            self.molora_keep = torch.zeros(self.molora_max_tokens, dtype=torch.bool, device=self.device)
            self.molora_guard = False
            self.molora_fix_empty = compat.empty_slot_reads_last_lora(base)

        def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
            present = {i for i in lora_index_to_id if i is not None} & set(self.molora_routed)
            self.molora_active = []
            if present:
                for lora_id in present:
                    routed = self.molora_routed[lora_id]
                    member = torch.tensor([i == lora_id for i in mapping.index_mapping], dtype=torch.bool)
                    routed.member[: member.numel()].copy_(member)
                    routed.slot = lora_index_to_id.index(lora_id)
                    self.molora_active.append(routed)
                mapping = compat.without_ids(mapping, present)
            ids = mapping.index_mapping
            self.molora_guard = self.molora_fix_empty and 0 < sum(i == 0 for i in ids) < len(ids)
            if self.molora_guard:
                self.molora_keep[: len(ids)].copy_(torch.tensor([i == 0 for i in ids], dtype=torch.bool))
            return super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)

        def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs):
            before = y.clone() if self.molora_guard else None
            result = super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
            target = y if result is None else result
            if before is not None:  # undo what vLLM's torch ops added to tokens without a LoRA (compat docstring)
                flat = target.view(-1, target.shape[-1])
                keep = self.molora_keep[: flat.shape[0], None]
                flat.copy_(torch.where(keep, before.view_as(flat), flat))
            for routed in self.molora_active:
                self._add_routed(routed, target, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
            return result

        def _add_routed(self, routed, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
            x = x.reshape(-1, x.shape[-1])
            y = y.view(-1, y.shape[-1])
            t = x.shape[0]
            ids, weights = routed.ids[:t], routed.weights[:t]
            plan = routed.plan if routed.plan is not None and routed.plan.num_tokens == t else None
            offset = 0
            for a_stacked, b_stacked, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
                a, b = compat.slot_weights(a_stacked, b_stacked, routed.slot, routed.num_adapters, routed.width)
                h = lora_shrink(x, a, ids, weights, scaling=float(scale), backend=self.molora_backend, plan=plan)
                lora_expand(h, b, ids, out=y[:, offset:offset + size], backend=self.molora_backend, plan=plan)
                offset += size

        def molora_route(self, layer_index: int, stream: torch.Tensor) -> None:
            """The pre-hook of decoder layer `layer_index`: reset at layer 0, then run the routers of this layer."""
            t = stream.shape[0]
            if layer_index == 0:
                for routed in self.molora_active:
                    routed.ids[:t].fill_(-1)
                    routed.plan = None
            for routed in self.molora_active:
                if routed.router.layer != layer_index:
                    continue
                probs = routed.router(stream.unsqueeze(0)).squeeze(0)        # [T, N]
                ids, weights = routed.router.select(probs, routed.top_k)     # [T, K]
                ids = torch.where(routed.member[:t, None], ids, torch.full_like(ids, -1))
                routed.ids[:t].copy_(ids)
                routed.weights[:t].copy_(weights)
                routed.plan = build_plan(routed.ids[:t], routed.num_adapters)

    return RoutedPunicaWrapper


def make_wrapper_class(base: type) -> type:
    """A subclass of the platform's punica wrapper class `base` that also serves routed adapters."""
    cls = _mixin(base)
    cls.__qualname__ = cls.__name__ = f"Routed{base.__name__}"
    return cls


def _install_hooks(model, wrapper) -> None:
    """Pre-hooks on every decoder layer calling ``wrapper.molora_route`` (once per model)."""
    if getattr(model, "_molora_hooked", False):
        return
    for index, layer in enumerate(compat.decoder_layers(model)):
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=index: wrapper.molora_route(i, compat.block_input(args, kwargs)),
            with_kwargs=True,
        )
    model._molora_hooked = True


def on_adapter_loaded(lora_id: int, path: str, model, wrapper) -> None:
    """Register a routed adapter with the worker's punica wrapper (plain and blend adapters need nothing)."""
    marker = _read_marker(path)
    if marker is None:
        return
    if not hasattr(wrapper, "molora_routed"):
        raise RuntimeError("molora_ops.vllm: a routed adapter was loaded but the punica wrapper is "
                           f"{type(wrapper).__name__}; the molora plugin did not install its wrapper in this process")
    router = load_router(os.path.join(path, ROUTER_SUBDIR))
    names = marker["adapter_names"]
    if list(router.adapter_names) != list(names):
        raise RuntimeError(f"{path}: router adapters {router.adapter_names} differ from the marker's {names}")
    device = wrapper.device
    n_max, k = wrapper.molora_max_tokens, int(marker["top_k"])
    wrapper.molora_routed[lora_id] = RoutedAdapter(
        lora_id=lora_id, router=router.to(device).eval(), num_adapters=len(names), width=int(marker["width"]),
        top_k=k, ids=torch.full((n_max, k), -1, dtype=torch.long, device=device),
        weights=torch.zeros(n_max, k, dtype=torch.float32, device=device),
        member=torch.zeros(n_max, dtype=torch.bool, device=device),
    )
    _install_hooks(model, wrapper)

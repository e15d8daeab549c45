"""The per-model state of a patched model: adapters, backend, router, and the per-call context variables.

This module is the bottom of the integration layer: :mod:`molora_ops.routing` and :mod:`molora_ops.patch` import
it, it imports neither. Integration code reads the state through :func:`state_of`, never through the model's
private attribute.

Context variables (one set per patched model; values are per thread and per asyncio task, and every value set is
reset by the hook or context manager that set it, so nothing outlives the call):
    spec_var   the active RoutingSpec (a routing() block, adapter_names=/adapter_weights= kwargs, generate)
    fwd_var    the ForwardState of the backbone forward running now
    top_var    the top-level forward running now (when modules after the backbone, lm_head, are routed)
    kw_var     the top-level call that took routing kwargs
"""

from __future__ import annotations

import contextvars
import itertools
from typing import Optional

from torch import nn

__all__ = ["PatchState", "state_of", "is_patched"]

_ATTR = "_molora_state"
_ids = itertools.count()


class PatchState:
    """What :func:`molora_ops.patch` set up on one model (see the module docstring for the context variables)."""

    def __init__(self, adapter_names, backend, router, top_k):
        self.uid = next(_ids)
        self.adapter_names = list(adapter_names)
        self.backend = backend
        self.router = router
        self.top_k = top_k
        self.spec_var = contextvars.ContextVar(f"molora_spec_{self.uid}", default=None)
        self.fwd_var = contextvars.ContextVar(f"molora_forward_{self.uid}", default=None)
        self.top_var = contextvars.ContextVar(f"molora_top_call_{self.uid}", default=None)
        self.kw_var = contextvars.ContextVar(f"molora_kwargs_call_{self.uid}", default=None)
        self.patched: list[tuple[nn.Module, type]] = []
        self.hooks = None  # routing.BackboneHooks
        self.peft_layers: list[tuple[nn.Module, bool]] = []
        self.first_module: Optional[nn.Module] = None
        self.blocks: Optional[nn.ModuleList] = None
        self.blocks_prefix: Optional[str] = None
        self.generate = None  # the model's own generate, under routing.routed_generate
        self.generate_was_attr = False  # whether it was an instance attribute (restored as such by unpatch)

    def device(self):
        if self.first_module is None:
            return None
        return self.first_module.molora_lora_a.device if hasattr(self.first_module, "molora_lora_a") else None


def state_of(model) -> PatchState:
    """The PatchState of a patched model; ValueError if `model` is not patched."""
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("this model is not patched; call molora_ops.patch(model, adapters=...) first")
    return state


def is_patched(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def set_state(model, state: Optional[PatchState]) -> None:
    """Attach `state` to `model` (None removes it)."""
    if state is None:
        model.__dict__.pop(_ATTR, None)
    else:
        setattr(model, _ATTR, state)

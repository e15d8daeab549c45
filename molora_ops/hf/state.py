"""The per-model state of a patched model: adapters, backend, router, and the per-call context variables.

This module is the bottom of the integration layer: :mod:`molora_ops.routing` and :mod:`molora_ops.patch` import
it, it imports neither. Integration code reads the state through :func:`state_of`, never through the model's
private attribute.

Per-call values (one set per patched model, each a :class:`CallLocal`; every value set is reset by the hook or
context manager that set it, so nothing outlives the call):
    spec_var   the active RoutingSpec (a routing() block, adapter_names=/adapter_weights= kwargs, generate)
    fwd_var    the ForwardState of the backbone forward running now
    top_var    the top-level forward running now (when modules after the backbone, lm_head, are routed)
    kw_var     the top-level call that took routing kwargs

Eager code reads them from contextvars: per thread and per asyncio task. torch.compile cannot trace contextvars,
so code being compiled reads a plain per-model copy instead ("traced mode", :func:`tracing`). Every set and reset
also updates that copy, so a compiled forward sees the routing() block entered around it. The copy is one per
model, not per thread: a compiled model serves one routing at a time (concurrent requests to one compiled model
give their routing per call, as kwargs, or use one compiled model per thread).
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["PatchState", "CallLocal", "state_of", "is_patched", "tracing"]

_ATTR = "_molora_state"
_ids = itertools.count()


def tracing() -> bool:
    """Whether the code running now is being traced by torch.compile or captured into a CUDA graph: then nothing
    may read a contextvar (compile) or device memory on the host (both), and positions and routing stay tensors."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CallLocal:
    """One per-call value (see the module docstring): a ContextVar in eager code, a plain per-model copy while
    torch.compile traces. set() returns a token for reset(), which restores both.

    The copy follows the eager sets too (a compiled forward inside a routing() block sees it). With several eager
    threads the copy is the latest set still active, and None once none is (a count of active sets), so no
    finished call's value is left behind for a later compiled forward."""

    def __init__(self, name: str):
        self._var = contextvars.ContextVar(name, default=None)
        self._traced: Any = None
        self._active = 0  # eager sets not yet reset, over all threads
        self._lock = threading.Lock()

    def get(self):
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value) -> tuple:
        if torch.compiler.is_compiling():
            token = (None, self._traced, value)
            self._traced = value
            return token
        with self._lock:
            self._active += 1
            token = (self._var.set(value), self._traced, value)
            self._traced = value
        return token

    def reset(self, token: tuple) -> None:
        var_token, previous, value = token
        if var_token is None:  # set while tracing: restore within the traced frame
            self._traced = previous
            return
        with self._lock:
            self._var.reset(var_token)
            self._active -= 1
            if self._active == 0:
                self._traced = None
            elif self._traced is value:  # still ours (no other thread set it since): the value under it
                self._traced = previous


class PatchState:
    """What :func:`molora_ops.patch` set up on one model (see the module docstring for the context variables)."""

    def __init__(self, adapter_names, backend, router, top_k):
        self.uid = next(_ids)
        self.adapter_names = list(adapter_names)
        self.backend = backend
        self.router = router
        self.top_k = top_k
        self.spec_var = CallLocal(f"molora_spec_{self.uid}")
        self.fwd_var = CallLocal(f"molora_forward_{self.uid}")
        self.top_var = CallLocal(f"molora_top_call_{self.uid}")
        self.kw_var = CallLocal(f"molora_kwargs_call_{self.uid}")
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

"""molora_ops.vllm: a vLLM general plugin for blends and per-token top-k mixtures of LoRA adapters.

Installed with ``pip install molora-ops[vllm]``; vLLM runs :func:`register` in every engine and worker process
(entry point ``vllm.general_plugins: molora``). It

* registers :class:`~molora_ops.vllm.resolver.MoloraResolver` when ``MOLORA_VLLM_ADAPTERS`` names an adapter
  root, so requests may name ``blend:code=0.5,math=0.5``, ``route:<router>`` or a plain adapter;
* makes the platform's punica wrapper a subclass that serves routed adapters (:mod:`molora_ops.vllm.routed`),
  and lets the worker recognise them when they load.

Modules: names (parsing), build (rank concatenation), store (on-disk cache), resolver, routed (wrapper and router
hook), compat (every use of vLLM internals; the supported versions are stated there).
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """The general plugin: idempotent, safe to call in every vLLM process."""
    from . import compat, routed
    from .resolver import resolver_from_env

    compat.check_version()
    compat.install_punica_wrapper(routed.make_wrapper_class)
    compat.on_adapter_loaded(routed.on_adapter_loaded)
    resolver = resolver_from_env()
    if resolver is not None:
        compat.register_resolver("molora", resolver)

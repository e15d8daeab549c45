"""The LoRA resolver: serves ``blend:...``, ``route:...`` and plain adapter names (:mod:`molora_ops.vllm.names`).

Configuration (environment, read when the resolver is created):
    MOLORA_VLLM_ADAPTERS   the adapter root: one subfolder per PEFT adapter and per saved router (required)
    MOLORA_VLLM_CACHE      where built adapters are kept (default ``~/.cache/molora_ops/vllm``)

A plain name that is not a folder of the root is left to other resolvers (None); a malformed ``blend:`` or
``route:`` name, or one naming a missing adapter, raises ValueError with the reason.
"""

from __future__ import annotations

import asyncio
import os

from . import compat
from .names import BLEND_PREFIX, ROUTE_PREFIX, parse_name
from .store import AdapterStore

__all__ = ["MoloraResolver", "resolver_from_env"]

ROOT_ENV = "MOLORA_VLLM_ADAPTERS"
CACHE_ENV = "MOLORA_VLLM_CACHE"


class MoloraResolver(compat.LoRAResolver):
    """Builds (once, cached on disk) the adapter a requested name means and returns its LoRARequest."""

    def __init__(self, store: AdapterStore):
        self.store = store

    def path_for(self, lora_name: str) -> str | None:
        """The built adapter's folder, or None for a plain name this root does not hold."""
        if lora_name.startswith(ROUTE_PREFIX) and compat.RoutedPunicaWrapper is None:
            raise ValueError(f"{lora_name!r}: the molora plugin's punica wrapper is not installed in this process "
                             "(vLLM did not load the 'molora' entry point of vllm.general_plugins, or VLLM_PLUGINS "
                             "leaves it out), so vLLM would serve the router's adapters unweighted")
        if lora_name.startswith((BLEND_PREFIX, ROUTE_PREFIX)):
            return self.store.build(parse_name(lora_name))
        try:
            parsed = parse_name(lora_name)
        except ValueError:
            return None
        return self.store.build(parsed) if self.store.has_adapter(parsed.adapter) else None

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        path = await asyncio.to_thread(self.path_for, lora_name)
        return None if path is None else compat.make_request(lora_name, path)


def resolver_from_env() -> MoloraResolver | None:
    """The resolver configured by MOLORA_VLLM_ADAPTERS / MOLORA_VLLM_CACHE, or None when no root is set."""
    root = os.environ.get(ROOT_ENV)
    if not root:
        return None
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "molora_ops", "vllm")
    return MoloraResolver(AdapterStore(os.path.expanduser(root), os.path.expanduser(cache)))

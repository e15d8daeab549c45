"""The Hugging Face transformers integration: patch a model for routed multi-LoRA, route it, train routers.

It is built on the op layer (:mod:`molora_ops.ops`, :mod:`molora_ops.runtime`) and never imported by it.
Modules, bottom up: ``state`` (per-model patch state), ``peft_io`` (reading PEFT adapters), ``bias``
(routed bias deltas), ``router_state`` and ``routers`` (routers and their per-position state), ``routing``
(routing specs, ``routing()``, ``generate``), ``hooks`` (per-forward state), ``layers`` (the routed module
classes), ``patch`` (``patch`` / ``unpatch``), ``train_router`` and ``merge``.

The public names are exported by :mod:`molora_ops` (``mo.patch``, ``mo.routing``, ...); this package re-exports
nothing, so ``molora_ops.hf.patch`` and ``molora_ops.hf.routing`` stay the modules.
"""

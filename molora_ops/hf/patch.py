"""Drop-in routed multi-LoRA for Hugging Face transformers models.

Usage::

    import molora_ops as mo
    model = mo.patch(model, adapters={"code": "dir/code", "math": "dir/math", "qa": "dir/qa"},
                     router=None, top_k=2, backend="auto")        # in place; returns the model
    with mo.routing(model, adapter_names=["code", "__base__", "qa"]):   # one adapter per sequence
        out = model.generate(input_ids, max_new_tokens=32)
    with mo.routing(model, adapter_weights={"code": 0.5, "math": 0.4, "qa": 0.1}):   # one blend for all
        logits = model(input_ids).logits
    with mo.routing(model, adapter_weights=W):   # W [B, N] per sequence or [B, S, N] per token
        ...
    mo.unpatch(model)                            # original modules back, bit-identical outputs

Without a routing context the ``router`` given to ``patch`` picks the ``top_k`` adapters of every token (from
the hidden state entering block ``router.layer``) and that one routing (one plan) serves every layer; a list of
routers, one per decoder block (None for none), routes each block from its own input instead (per-layer routing).
Without a router either the model computes exactly the base.

How it works. Every module that some adapter targets (``nn.Linear`` or GPT-2's ``Conv1D``) is patched as an
*instance*: its class is swapped for a subclass ``Routed<Class>`` (:mod:`molora_ops.hf.layers`) that runs the
original forward and then adds the routed LoRA delta into the output in place through the forward's
:class:`~molora_ops.runtime.RoutedBatch` (validation, backend, plan and CPU strategy prepared once per forward and
shared by every layer). Attribute names are unchanged, the stacked weights are non-persistent
buffers, so ``state_dict()`` keys and loading are unchanged and ``model.to(...)`` moves them; ``print(model)``
shows ``RoutedLinear(..., adapters=3, r=16)``. ``unpatch`` restores the classes and removes the buffers and hooks.

Per target module the N adapters are stacked as lora_a [N, R, H_in] and lora_b [N, H_out, R], zero-padded to
the largest rank R (a missing adapter is all zeros), with per-adapter scaling [N]. Sibling projections that read
the same input (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``: the table ``SIBLING_GROUPS``) share
one shrink: their A's are concatenated along R on the first member, the first member called shrinks for the whole
group, and each member expands its own columns of that rank space with its own B and scaling straight into its own
output (no block-diagonal B, no extra adds). Fused modules (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``)
are one module already.

Modules outside the backbone. The routing of a forward is computed at the start of the backbone (the module that
holds the decoder blocks). The one module outside it that may be targeted is the model's output embedding
(``lm_head``, ``get_output_embeddings()``): then the routing state is kept until the top-level model's forward
ends (a post-hook on the patched model, ``always_call=True``). HF CausalLMs call ``lm_head`` on the last
``logits_to_keep`` positions only (``generate`` uses 1), so a module that sees L < S positions uses the routing of
the LAST L positions of each sequence; a tensor ``logits_to_keep`` (indices or a mask) raises a RuntimeError
naming the module, as does ``lm_head`` under per-layer routers (they route decoder blocks only; use a
``routing()`` context or a single router). Any other targeted module outside the backbone (one that could run
before the routing exists, or on other tokens) is refused at patch time with an AdapterError.

Tensor parallelism. On a model loaded with transformers TP (``distributed_config=DistributedConfig(tp_size=N)``)
each rank patches its own shard: :mod:`molora_ops.hf.tensor_parallel` reads each target's plan style, keeps this
rank's rows of B (colwise) or columns of A (rowwise, whose [T, K, R] shrink result is all-reduced), and wraps the
instance-level ``tp_forward`` that transformers installs (the class swap alone would be bypassed). Every rank must
call ``patch`` (and run the same forwards) together; inference only.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from .bias import bias_deltas
from .hooks import BackboneHooks
from .layers import Group, Slot, io_features, routed_class
from .peft_io import AdapterError, LoraAdapter, adapters_from_peft_model, load_adapter
from .routers import check_router
from .routing import BASE, install_generate, remove_generate
from .state import PatchState, is_patched, set_state, state_of
from . import tensor_parallel as tp

__all__ = ["patch", "unpatch", "SIBLING_GROUPS", "is_patched"]

# Projections of one block that read the same input tensor and can share one launch. Names that differ
# per architecture live here (and in io_features), never in per-model copies.
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma
    ("gate_proj", "up_proj"),  # Llama, Mistral, Qwen2, Gemma MLP
    ("query", "key", "value"),  # BERT-style
    ("w1", "w3"),  # Mixtral-style experts
)


def _find_backbone(root: nn.Module, target_names: list[str]):
    """The ModuleList holding the most patched modules is the block list; its parent is the backbone.
    Returns (backbone, blocks, blocks' name)."""
    best, best_count = None, 0
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList):
            prefix = name + "." if name else ""
            count = sum(1 for t in target_names if t.startswith(prefix))
            if count > best_count:
                best, best_count = name, count
    if best is None:
        # no decoder blocks among the targets (e.g. lm_head only): the backbone is still HF's base model
        base = getattr(root, "base_model", None)
        prefix = getattr(root, "base_model_prefix", "")
        if isinstance(base, nn.Module) and base is not root and prefix and getattr(root, prefix, None) is base:
            return base, None, None
        return root, None, None
    parent = best.rsplit(".", 1)[0] if "." in best else ""
    return root.get_submodule(parent), root.get_submodule(best), best


def _module_name(root: nn.Module, module: nn.Module) -> Optional[str]:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    return None


def _output_embedding(root: nn.Module) -> Optional[nn.Module]:
    get = getattr(root, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError, TypeError):
        return None


def _resolve_adapters(adapters) -> dict[str, LoraAdapter]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty dict {name: PEFT directory | (config, state_dict)}")
    out = {}
    for name, source in adapters.items():
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter names must be non-empty strings other than {BASE!r}, got {name!r}")
        out[name] = load_adapter(name, source)
    return out


def _refuse_instance_forwards(targets: Mapping[str, nn.Module], layouts: Mapping[str, "tp.Layout"]) -> None:
    """Refuse modules whose ``forward`` is replaced on the instance, which bypasses the class swap (the patch would
    silently compute the base model), unless it is transformers' tensor-parallel forward (`layouts`, which patch
    wraps); accelerate's offload hooks and other wrappers are named as such."""
    for name, mod in targets.items():
        if "forward" not in mod.__dict__ or name in layouts:
            continue
        raise NotImplementedError(
            f"molora_ops.patch: module {name!r} has its forward replaced on the instance (by accelerate's offload "
            "hooks, e.g. device_map with CPU/disk offload or cpu_offload, or another wrapper), which would bypass "
            "the routed LoRA; load the model without offloading (or remove the wrapper) to patch it"
        )


def _hidden_size(root: nn.Module) -> Optional[int]:
    config = getattr(root, "config", None)
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def _check_routers(routers, names: list[str], hidden_size: Optional[int]) -> None:
    """Each router (None skipped) must have N = len(names) outputs for these adapters in this order, finite
    parameters, and read hidden states of the model's size."""
    for r in routers:
        if r is None:
            continue
        num = getattr(r, "num_adapters", len(names))
        if num != len(names):
            raise ValueError(f"router has {num} outputs but {len(names)} adapters were given")
        check_router(r, hidden_size=hidden_size, adapter_names=names)


def _sibling_groups(targets: Mapping[str, nn.Module], layouts: Mapping[str, "tp.Layout"]) -> dict[str, list[str]]:
    """{module name: its group's full names} for siblings fused into one launch: same parent, names in one
    SIBLING_GROUPS row, same input size, same dtype; under tensor parallelism also the same style, one that sees the
    whole (replicated) input (colwise: each member then expands into its own rows with its own B shard)."""
    grouped: dict[str, list[str]] = {}
    by_parent: dict[str, list[str]] = {}
    for mod_name in targets:
        parent, _, leaf = mod_name.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    for parent, leaves in by_parent.items():
        for row in SIBLING_GROUPS:
            members = [leaf for leaf in row if leaf in leaves]
            full = [f"{parent}.{m}" if parent else m for m in members]
            if len(members) < 2:
                continue
            mods = [targets[f] for f in full]
            if len({io_features(m)[0] for m in mods}) != 1 or len({m.weight.dtype for m in mods}) != 1:
                continue
            styles = {getattr(layouts.get(f), "style", None) for f in full}
            if len(styles) != 1 or any(getattr(layouts.get(f), "kind", None) == "shard_in" for f in full):
                continue
            for f in full:
                grouped[f] = full
    return grouped


def patch(model, adapters=None, router=None, top_k: int = 2, backend: str = "auto"):
    """Patch `model` in place for routed multi-LoRA and return it.

    Args:
        model: a transformers model (the model the adapters were trained on, e.g. LlamaForCausalLM), or a
            PeftModel with LoRA adapters loaded (adapters=None takes all of them, or a list of their names).
        adapters: {name: PEFT directory | (config, state_dict) | {"config", "state_dict"}}; order = adapter ids.
        router: optional TokenRouter / ContextRouter / KeywordRouter used when no routing() context is active,
            or a list with one router (or None) per decoder block for per-layer routing.
        top_k: adapters per token chosen by the router.
        backend: "auto" | "torch" | "triton" | "cuda" (see molora_ops.routed_lora).
    """
    _check_arguments(model, backend, top_k)
    peft_model, root, loaded = _load(model, adapters)
    names = list(loaded)
    targets, wrappers = _discover_targets(root, loaded, peft_model is not None)
    layouts = tp.detect(root, targets)
    _check_tensor_parallel(layouts, loaded, peft_model is not None)
    _check_saved_base_weights(loaded, targets)
    _refuse_instance_forwards(targets, layouts)
    per_layer = isinstance(router, (list, tuple, nn.ModuleList))
    _check_routers(router if per_layer else [router], names, _hidden_size(root))
    deltas = bias_deltas(root, loaded, names, targets)

    state = PatchState(names, backend, router, top_k)
    backbone, blocks, blocks_name = _find_backbone(root, list(targets))
    outside = _modules_after_backbone(root, backbone, targets, wrappers, loaded)
    state.blocks = blocks
    state.blocks_prefix = None if blocks_name is None else (blocks_name + "." if blocks_name else "")
    try:
        _swap_classes(state, loaded, names, targets, outside, deltas, layouts)
        router_block = _place_routers(router, per_layer, blocks, _device_of(targets))
        state.hooks = BackboneHooks(state, model, backbone, router_block, top=root if outside else None)
        if per_layer:
            state.hooks.set_layer_routers(blocks, router)
        if peft_model is not None:
            _disable_peft_layers(state, root)
        install_generate(model, state)
    except Exception:
        _restore(state)
        raise
    set_state(model, state)
    return model


def _check_arguments(model, backend, top_k) -> None:
    if is_patched(model):
        raise ValueError("model is already patched; call molora_ops.unpatch(model) first")
    if backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'cuda', got {backend!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")


def _load(model, adapters):
    """(the PeftModel or None, the transformers model to patch, {name: LoraAdapter}) for patch()'s arguments."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        if isinstance(adapters, Mapping):
            raise ValueError("for a PeftModel pass adapters=None (all loaded) or a list of loaded adapter names")
        root, loaded = adapters_from_peft_model(model, None if adapters is None else list(adapters))
        return model, root, loaded
    if adapters is None:
        raise ValueError("patch() needs adapters={name: PEFT directory or state} (or a PeftModel)")
    return None, model, _resolve_adapters(adapters)


def _discover_targets(root, loaded, from_peft: bool):
    """({module name: the projection to patch}, {module name: the module at that name}) over every adapter's
    targets; for a PeftModel the projection is the LoRA layer's base layer. AdapterError for a missing module, an
    unsupported kind, or weights of the wrong size."""
    targets: dict[str, nn.Module] = {}
    wrappers: dict[str, nn.Module] = {}
    for adapter in loaded.values():
        for mod_name, w in adapter.modules.items():
            try:
                mod = root.get_submodule(mod_name)
            except AttributeError:
                raise AdapterError(
                    f"adapter {adapter.name!r} targets module {mod_name!r}, which this model does not have"
                ) from None
            wrappers[mod_name] = mod
            if from_peft and hasattr(mod, "base_layer"):
                mod = mod.get_base_layer()
            io = io_features(mod)
            if io is None:
                raise AdapterError(
                    f"adapter {adapter.name!r}: module {mod_name!r} is a {type(mod).__name__}; only nn.Linear and "
                    "Conv1D projections are supported"
                )
            in_f, out_f = io
            if w.lora_a.shape[1] != in_f or w.lora_b.shape[0] != out_f:
                raise AdapterError(
                    f"adapter {adapter.name!r} does not fit module {mod_name!r} ({type(mod).__name__} in={in_f}, "
                    f"out={out_f}): lora_A {tuple(w.lora_a.shape)}, lora_B {tuple(w.lora_b.shape)}"
                )
            targets[mod_name] = mod
    return targets, wrappers


def _check_tensor_parallel(layouts, loaded, from_peft: bool) -> None:
    """What tensor parallelism does not support yet: a PeftModel (its LoRA layers wrap the sharded projections) and
    adapters that carry biases (bias deltas would need the bias's shard). TensorParallelError naming the module."""
    if not layouts:
        return
    first = next(iter(layouts))
    if from_peft:
        raise tp.TensorParallelError(
            f"molora_ops.patch: module {first!r} is tensor-parallel ({layouts[first].style}); patching a PeftModel "
            "under tensor parallelism is not supported: pass the adapters' PEFT directories to patch() instead"
        )
    for adapter in loaded.values():
        carrying = [m for m in layouts if m in adapter.biases or getattr(adapter.modules.get(m), "lora_b_bias", None)
                    is not None]
        if carrying:
            raise tp.TensorParallelError(
                f"molora_ops.patch: adapter {adapter.name!r} carries a bias for module {carrying[0]!r}, which is "
                f"tensor-parallel ({layouts[carrying[0]].style}); adapters with biases are not supported under "
                "tensor parallelism"
            )


def _check_saved_base_weights(loaded, targets) -> None:
    """PEFT may save lm_head's full base weight (save_embedding_layers): fine only if it is this model's weight."""
    for adapter in loaded.values():
        for mod_name, saved in adapter.base_weights.items():
            weight = getattr(targets.get(mod_name), "weight", None)
            weight = None if weight is None else tp.full_weight(weight)
            if weight is None or tuple(saved.shape) != tuple(weight.shape) or not torch.equal(
                saved.to(device=weight.device, dtype=weight.dtype), weight.detach()
            ):
                raise AdapterError(
                    f"adapter {adapter.name!r} carries a full weight for {mod_name!r} (PEFT save_embedding_layers) "
                    "that differs from this model's (a resized or fine-tuned embedding?); molora_ops only adds LoRA "
                    "deltas, so load that weight into the model first (or save the adapter with "
                    "save_embedding_layers=False if the base weight was not changed)"
                )


def _modules_after_backbone(root, backbone, targets, wrappers, loaded) -> set[str]:
    """Names of targets that run after the backbone: only the output embedding (lm_head) may. AdapterError for any
    other target outside the backbone (routing exists only inside the backbone's forward, and for lm_head after)."""
    outside: set[str] = set()
    if backbone is root:
        return outside
    bb_name = _module_name(root, backbone)
    bb_prefix = bb_name + "." if bb_name else ""
    out_emb = _output_embedding(root)
    for mod_name in targets:
        if mod_name.startswith(bb_prefix):
            continue
        if out_emb is not None and wrappers[mod_name] is out_emb:
            outside.add(mod_name)
            continue
        users = [a.name for a in loaded.values() if mod_name in a.modules]
        raise AdapterError(
            f"adapter(s) {users} target module {mod_name!r}, which lies outside the model's backbone "
            f"({bb_name or type(backbone).__name__}) and is not its output embedding (lm_head); routing exists "
            "only inside the backbone's forward (and for lm_head after it), so this module is not supported"
        )
    return outside


def _swap_classes(state, loaded, names, targets, outside, deltas, layouts) -> None:
    """Stack every target's adapters into buffers (this rank's shard of them under tensor parallelism: `layouts`)
    and swap its class (sibling groups together)."""
    grouped = _sibling_groups(targets, layouts)
    done = set()
    for mod_name, mod in targets.items():
        if mod_name in done:
            continue
        if mod_name in grouped:
            full = grouped[mod_name]
            _patch_group(state, loaded, names, full, [targets[f] for f in full], layouts)
            done.update(full)
        else:
            _patch_single(state, loaded, names, mod_name, mod, layouts.get(mod_name), outside=mod_name in outside)
            done.add(mod_name)
    for mod_name, delta in deltas.items():
        targets[mod_name].register_buffer("molora_bias_delta", delta, persistent=False)


def _device_of(targets) -> torch.device:
    return next(iter(targets.values())).weight.device


def _place_routers(router, per_layer: bool, blocks, device) -> Optional[nn.Module]:
    """Move the router(s) to the model's device; returns the block whose input a single router reads."""
    if per_layer:
        if blocks is None or len(router) != len(blocks):
            raise ValueError(
                f"per-layer routing needs one router (or None) per decoder block: {len(router)} routers for "
                f"{0 if blocks is None else len(blocks)} blocks"
            )
        for r in router:
            if r is not None:
                r.to(device=device)
        return None
    if router is None:
        return None
    layer = int(getattr(router, "layer", 0))
    if blocks is None or not (0 <= layer < len(blocks)):
        raise ValueError(f"router.layer={layer} is not a block index of this model")
    router.to(device=device)
    return blocks[layer]


def _disable_peft_layers(state, root) -> None:
    """A PeftModel's own LoRA layers are switched off (our patched base layers add the adapters instead)."""
    from peft.tuners.lora import LoraLayer

    for mod in root.modules():
        if isinstance(mod, LoraLayer):
            state.peft_layers.append((mod, mod.disable_adapters))
            mod._disable_adapters = True


def _stack(loaded, names, mod_name, in_f, out_f, dtype, device):
    ranks = [loaded[a].modules[mod_name].rank if mod_name in loaded[a].modules else 0 for a in names]
    r = max(max(ranks), 1)
    n = len(names)
    a = torch.zeros(n, r, in_f, dtype=dtype, device=device)
    b = torch.zeros(n, out_f, r, dtype=dtype, device=device)
    s = torch.zeros(n, dtype=torch.float32, device=device)
    for i, name in enumerate(names):
        w = loaded[name].modules.get(mod_name)
        if w is None:
            continue
        a[i, : w.rank] = w.lora_a.to(device=device, dtype=torch.float32).to(dtype)
        b[i, :, : w.rank] = w.lora_b.to(device=device, dtype=torch.float32).to(dtype)
        s[i] = w.scaling
    return a, b, s, ranks


def _register(state, mod, slot, a, b, s):
    """Stacked weights as non-persistent buffers (state_dict keys unchanged; a is None for group members other than
    the leader, which holds the group's A; s is None when folded into b), then the class swap."""
    if a is not None:
        mod.register_buffer("molora_lora_a", a, persistent=False)
    mod.register_buffer("molora_lora_b", b, persistent=False)
    if s is not None:  # None: folded into b (sibling group members)
        mod.register_buffer("molora_scaling", s, persistent=False)
    if len(set(slot.ranks)) > 1:  # mixed ranks: the kernels bound their rank loops by it
        mod.register_buffer("molora_ranks", torch.tensor(slot.ranks, dtype=torch.int32, device=b.device),
                            persistent=False)
    _install(state, mod, slot)


def _install(state, mod, slot):
    orig = type(mod)
    mod._molora_slot = slot
    mod._molora_orig_class = orig
    mod.__class__ = routed_class(orig)
    state.patched.append((mod, orig))
    if slot.tp is not None:  # transformers' instance-level tp_forward bypasses the class swap: wrap it
        tp.install_forward(mod, slot.name)
    if state.first_module is None and hasattr(mod, "molora_lora_a"):
        state.first_module = mod


def _patch_single(state, loaded, names, mod_name, mod, layout, outside=False):
    in_f, out_f = io_features(mod)
    a, b, s, ranks = _stack(loaded, names, mod_name, in_f, out_f, mod.weight.dtype, mod.weight.device)
    a, b = tp.shard_stack(layout, a, b)
    if layout is not None:
        in_f, out_f = layout.in_f, layout.out_f
    _register(state, mod, Slot(state, mod_name, in_f, out_f, ranks, outside=outside, tp=layout), a, b, s)


def _patch_group(state, loaded, names, full, mods, layouts):
    """Siblings (same input): the leader holds the concatenated A [N, R_1 + ... + R_m, H_in]; every member its own
    B [N, H_out_i, R_i], with its per-adapter scaling folded in (in float32, before the cast: the shared shrink is
    unscaled, and a per-member scale would cost every expand extra work), and its columns of the shared rank space."""
    weight = mods[0].weight
    in_f = io_features(mods[0])[0]
    stacks = [_stack(loaded, names, f, in_f, io_features(m)[1], torch.float32, weight.device) for f, m in zip(full, mods)]
    a_cat = torch.cat([a for a, _, _, _ in stacks], dim=1).to(weight.dtype)
    group = Group(mods[0], [f.rpartition(".")[2] for f in full])
    offset = 0
    for i, (f, m, (a, b, s, ranks)) in enumerate(zip(full, mods, stacks)):
        in_i, out_i = io_features(m)
        layout = layouts.get(f)  # None, or a style that sees the whole input (see _sibling_groups)
        _, b = tp.shard_stack(layout, a, b)
        if layout is not None:
            out_i = layout.out_f
        slot = Slot(state, f, in_i, out_i, ranks, group=group, rank_slice=slice(offset, offset + a.shape[1]),
                    tp=layout)
        offset += a.shape[1]
        _register(state, m, slot, a_cat if i == 0 else None, (b * s[:, None, None]).to(weight.dtype), None)


def _restore(state) -> None:
    for mod, orig in reversed(state.patched):
        tp.restore_forward(mod)
        mod.__class__ = orig
        for buf in ("molora_lora_a", "molora_lora_b", "molora_scaling", "molora_ranks", "molora_bias_delta"):
            mod._buffers.pop(buf, None)
        for attr in ("_molora_slot", "_molora_orig_class"):
            mod.__dict__.pop(attr, None)
    state.patched = []
    if state.hooks is not None:
        state.hooks.remove()
        state.hooks = None
    for mod, was_disabled in state.peft_layers:
        mod._disable_adapters = was_disabled
    state.peft_layers = []


def unpatch(model):
    """Undo :func:`patch`: original classes, no extra buffers or hooks; outputs bit-identical to before."""
    state = state_of(model)
    remove_generate(model, state)
    _restore(state)
    set_state(model, None)
    return model


"""Patch / unpatch cycles leave nothing behind in the calling context, and a failed forward leaves nothing set.

Routing state lives in ContextVars (:mod:`molora_ops.hf.state`): every value a hook or ``routing()`` sets must be
reset by whoever set it, or it stays in the caller's context for as long as that context lives (a server's thread:
for ever), holding whatever it references. Each patch makes new ContextVars, so one value left set per forward shows
up as one more variable in ``contextvars.copy_context()`` per patch / unpatch cycle, and as tensors kept alive.

Older code (e.g. 0e0edce) kept the routers' running state in a per-patch ``router_state_var`` that the router hook
set and never reset: +1 ContextVar per cycle in router mode, and +2 live tensors (running sum and count) per cycle
with a ContextRouter. ``test_cycles_leave_no_context_variables_or_tensors`` fails on that code in both router modes,
and with the context checks removed the tensor count alone fails it for the ContextRouter (+2.00 per cycle); checked
by running this file against a worktree of 0e0edce.

Measured per mode after one warm-up cycle (which may fill lazy caches of torch / transformers): the context's length
and the molora variables in it after 3 and 6 more cycles, and the number of live tensors (``gc.get_objects()``) after 3
and after 6 cycles, which must not grow with the number of cycles (it may fall: garbage left by earlier tests can be
freed meanwhile).
"""

from __future__ import annotations

import contextvars
import copy
import gc

import pytest
import torch

from _hf import ADAPTERS, shared_setup

import molora_ops as mo

peft = pytest.importorskip("peft")

MODES = ("token_router", "context_router", "routing_context", "kwargs")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return shared_setup("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def lm_head_dirs(gpt2, tmp_path_factory):
    """Adapters for the same GPT-2 of which one also targets lm_head (routed after the backbone: the top-level
    forward's state, top_var, is then used too)."""
    root = tmp_path_factory.mktemp("leak_lm_head")
    dirs = dict(gpt2.dirs)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(gpt2.targets) + ["lm_head"],
                          init_lora_weights=False)
    torch.manual_seed(77)
    pm = peft.get_peft_model(copy.deepcopy(gpt2.base), cfg)
    pm.save_pretrained(str(root / "code"), save_embedding_layers=False)
    dirs["code"] = str(root / "code")
    return dirs


def _router(kind):
    torch.manual_seed(5)
    router = (mo.TokenRouter if kind == "token" else mo.ContextRouter)(32, list(ADAPTERS), temperature=0.5)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    return router


def _molora_vars():
    return sorted(v.name for v in contextvars.copy_context() if v.name.startswith("molora"))


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _cycle(model, dirs, mode, ids, routers):
    """One patch, a forward and a cached greedy generate in `mode`, one unpatch."""
    router = routers.get(mode)
    mo.patch(model, adapters=dirs, router=router, top_k=2, backend="torch")
    try:
        names = ["code", "__base__", "qa"]
        gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        if mode in ("token_router", "context_router"):
            model(ids)
            model.generate(ids, **gen)
        elif mode == "routing_context":
            with mo.routing(model, adapter_names=names):
                model(ids)
                model.generate(ids, **gen)
        else:
            model(ids, adapter_names=names)
            model.generate(ids, adapter_names=names, **gen)
    finally:
        mo.unpatch(model)


@torch.no_grad()
@pytest.mark.parametrize("lm_head", [False, True], ids=["blocks", "lm_head"])
@pytest.mark.parametrize("mode", MODES)
def test_cycles_leave_no_context_variables_or_tensors(gpt2, lm_head_dirs, mode, lm_head):
    dirs = lm_head_dirs if lm_head else gpt2.dirs
    model = copy.deepcopy(gpt2.base)
    ids = gpt2.ids
    routers = {"token_router": _router("token"), "context_router": _router("context")}
    base = model(ids).logits
    hooks = _hook_count(model)

    molora = _molora_vars()  # other tests' leaks (if any) are not this test's business
    _cycle(model, dirs, mode, ids, routers)  # warm-up: lazy caches of torch / transformers
    ctx_len = len(contextvars.copy_context())
    counts = {}
    for done in range(1, 7):
        _cycle(model, dirs, mode, ids, routers)
        if done in (3, 6):
            counts[done] = _live_tensors()
            assert len(contextvars.copy_context()) == ctx_len, (
                f"{mode}: {done} patch/unpatch cycles left {len(contextvars.copy_context()) - ctx_len} more "
                f"context variable(s) set in the caller's context; molora ones now: {_molora_vars()}"
            )
    left = sorted(set(_molora_vars()) - set(molora))
    assert not left, f"{mode}: molora ContextVars left set in the caller's context: {left}"
    # no growth: the count may fall when garbage from earlier tests (not this model's) is freed during the cycles
    assert counts[6] <= counts[3], (
        f"{mode}: live tensors grow with patch/unpatch cycles: {counts[3]} after 3 cycles, {counts[6]} after 6 "
        f"({(counts[6] - counts[3]) / 3:+.2f} per cycle)"
    )
    # and the model itself is back to what it was: no hooks, the exact base outputs
    assert _hook_count(model) == hooks
    assert "generate" not in model.__dict__
    assert torch.equal(model(ids).logits, base)


def _assert_nothing_set(model):
    from molora_ops.hf.state import state_of

    state = state_of(model)
    left = {name: getattr(state, name).get() for name in ("spec_var", "fwd_var", "top_var", "kw_var")}
    assert all(v is None for v in left.values()), f"left set after the failed call: {left}"


class _Boom(RuntimeError):
    pass


def _raise_in_block(model, index=1):
    """A pre-hook that raises inside decoder block `index`: after the routing of the forward was computed."""
    def boom(module, args):
        raise _Boom("failure inside the backbone")

    return model.transformer.h[index].register_forward_pre_hook(boom)


@torch.no_grad()
@pytest.mark.parametrize("lm_head", [False, True], ids=["blocks", "lm_head"])
def test_failed_forward_leaves_nothing_set(gpt2, lm_head_dirs, lm_head):
    dirs = lm_head_dirs if lm_head else gpt2.dirs
    ids = gpt2.ids  # 3 sequences
    ctx_len = len(contextvars.copy_context())
    model = mo.patch(copy.deepcopy(gpt2.base), adapters=dirs, backend="torch")
    base = gpt2.base(ids).logits
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        routed = model(ids).logits
    assert not torch.equal(routed, base)
    two = ["code", "qa"]

    # a routing for 2 sequences on a batch of 3: PEFT's ValueError, from every form
    with pytest.raises(ValueError, match="batch"):
        model(ids, adapter_names=two)
    _assert_nothing_set(model)
    with pytest.raises(ValueError, match="batch"):
        model(input_ids=ids, adapter_weights=torch.ones(2, len(ADAPTERS)))
    _assert_nothing_set(model)
    with pytest.raises(ValueError, match="batch"):
        with mo.routing(model, adapter_names=two):
            model(ids)
    _assert_nothing_set(model)
    with pytest.raises(ValueError, match="batch"):
        model.generate(ids, adapter_names=two, max_new_tokens=2, do_sample=False, pad_token_id=0)
    _assert_nothing_set(model)
    # an unknown name fails before anything is set
    with pytest.raises(ValueError, match="unknown adapter"):
        model(ids, adapter_names=["code", "nope", "qa"])
    _assert_nothing_set(model)

    # an exception inside the backbone, after this forward's routing was set
    handle = _raise_in_block(model)
    try:
        with pytest.raises(_Boom):
            model(ids, adapter_names=["code", "math", "qa"])
        _assert_nothing_set(model)
        with pytest.raises(_Boom):
            with mo.routing(model, adapter_names=["code", "math", "qa"]):
                model(ids)
        _assert_nothing_set(model)
        with pytest.raises(_Boom):
            model.generate(ids, adapter_names=["code", "math", "qa"], max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
        _assert_nothing_set(model)
    finally:
        handle.remove()

    # the next calls see no stale routing: the exact base without one, the same routed logits with one
    assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids, adapter_names=["code", "math", "qa"]).logits, routed)
    _assert_nothing_set(model)
    mo.unpatch(model)
    assert len(contextvars.copy_context()) == ctx_len


@torch.no_grad()
@pytest.mark.parametrize("kind", ["token", "context"])
def test_failed_forward_in_router_mode_leaves_nothing_set(gpt2, lm_head_dirs, kind):
    """Router mode: the router ran (and, for ContextRouter, recorded its running state) before the failure."""
    ids = gpt2.ids
    ctx_len = len(contextvars.copy_context())
    for dirs in (gpt2.dirs, lm_head_dirs):
        model = mo.patch(copy.deepcopy(gpt2.base), adapters=dirs, router=_router(kind), top_k=2, backend="torch")
        routed = model(ids).logits
        handle = _raise_in_block(model)
        try:
            with pytest.raises(_Boom):
                model(ids)
            _assert_nothing_set(model)
            with pytest.raises(_Boom):
                model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            _assert_nothing_set(model)
        finally:
            handle.remove()
        assert torch.equal(model(ids).logits, routed)
        # a routing() block that fails inside overrides the router only while it is open
        with pytest.raises(ValueError, match="batch"):
            with mo.routing(model, adapter_names=["code"]):
                model(ids)
        _assert_nothing_set(model)
        assert torch.equal(model(ids).logits, routed)
        mo.unpatch(model)
    assert len(contextvars.copy_context()) == ctx_len

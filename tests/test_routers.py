"""Routers inside the patched forward (with the KV cache), router training, save/load, keyword rules."""

import copy
import random

import pytest
import torch

from _hf import ADAPTERS, CODE, FILLER, MATH, shared_setup, assert_logits_close, word_tokenizer

import molora_ops as mo
from molora_ops.hf.state import state_of
from molora_ops.hf.routers import load_router, select_topk



@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def _texts(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) if rng.random() < 0.8 else rng.choice(FILLER) for _ in range(rng.randint(6, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return shared_setup("gpt2", tmp_path_factory)


def _block0_hidden(model, ids):
    got = {}

    def grab(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    h = model.transformer.h[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(ids)
    finally:
        h.remove()
    return got["h"]


def _dense(ids, w, n):
    dense = torch.zeros(*ids.shape[:-1], n)
    valid = ids >= 0
    dense.scatter_add_(-1, ids.clamp_min(0), torch.where(valid, w, torch.zeros_like(w)))
    return dense


def test_select_topk_renormalises_and_drops_zeros():
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    ids, w = select_topk(probs, 2)
    assert ids.tolist() == [[0, 1], [0, -1]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375], [1.0, 0.0]]))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["token", "context"])
def test_router_mode_equals_explicit_per_token_routing_and_kv_cache(gpt2, kind):
    cls = mo.TokenRouter if kind == "token" else mo.ContextRouter
    router = cls(32, list(ADAPTERS), temperature=0.5)
    for p in router.parameters():
        p.normal_(0, 1.0)
    ids = gpt2.ids
    hidden = _block0_hidden(gpt2.base, ids)
    r_ids, r_w = router.select(router(hidden, past_len=0), 2)
    w = _dense(r_ids, r_w, len(ADAPTERS))
    explicit = gpt2.patched()
    with mo.routing(explicit, adapter_weights=w):
        ref = explicit(ids).logits
    model = gpt2.patched(router=router, top_k=2)
    out = model(ids).logits
    assert_logits_close(out, ref)
    # prefill + one cached decode step: routing (and ContextRouter's running mean) carried across the steps
    s = ids.shape[1]
    pre = model(ids[:, : s - 1], use_cache=True)
    step = model(ids[:, s - 1 :], past_key_values=pre.past_key_values, use_cache=True).logits
    assert_logits_close(step[:, -1], out[:, -1], name="decode step")
    # a routing() context overrides the router
    with mo.routing(model, adapter_names=["__base__"] * 3):
        assert torch.equal(model(ids).logits, gpt2.base(ids).logits)


def test_context_router_is_causal():
    router = mo.ContextRouter(16, ["a", "b", "c"])
    h = torch.randn(2, 9, 16)
    full = router(h)
    h2 = h.clone()
    h2[:, 5:] = torch.randn(2, 4, 16)
    part = router(h2)
    torch.testing.assert_close(full[:, :5], part[:, :5])
    assert not torch.allclose(full[:, 5:], part[:, 5:])


@torch.no_grad()
def test_keyword_router(gpt2, tokenizer):
    kw = mo.KeywordRouter({"code": {"def": 0.5, "import": 0.5}, "math": {"sum": 0.4}, "qa": ["the"]}, tokenizer)
    ids = torch.tensor([tokenizer.encode("a def on sum the it")])
    probs = kw(input_ids=ids)
    assert probs[0, 0].tolist() == [0.0, 0.0, 0.0]  # nothing seen yet: base model
    torch.testing.assert_close(probs[0, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(probs[0, 4], torch.tensor([0.5, 0.4, 1.0]) / 1.9)
    # in the patched model, a token before any keyword runs the base model
    model = gpt2.patched(router=kw, top_k=3)
    seq = ids[:, :2].clamp_max(63)
    out = model(seq).logits
    base = gpt2.base(seq).logits
    assert torch.equal(out[:, 0], base[:, 0]) and not torch.equal(out[:, 1], base[:, 1])


def test_train_router_separates_domains_and_round_trips(gpt2, tokenizer, tmp_path):
    texts = {"code": _texts(CODE, 24, 1), "math": _texts(MATH, 24, 2)}
    model = mo.patch(copy.deepcopy(gpt2.base), adapters={k: gpt2.dirs[k] for k in ("code", "math")}, backend="torch")
    for kind in ("token", "context"):
        router = mo.train_router(model, texts, tokenizer, kind=kind, epochs=40, lr=3e-2, progress=False,
                                 save_to=str(tmp_path / kind))
        assert router.report["val_sequence_accuracy"] > 0.95, router.report
        if kind == "context":
            assert router.report["val_token_accuracy"] >= 0.8, router.report
        assert state_of(model).router is router
        assert all(not p.requires_grad for p in model.parameters() if p.requires_grad is False)
        loaded = load_router(str(tmp_path / kind))
        h = torch.randn(2, 5, 32)
        torch.testing.assert_close(loaded(h), router(h))
    ids = torch.tensor([tokenizer.encode(" ".join(MATH[:6]))])
    with torch.no_grad():
        r_ids, _ = router.select(router(_block0_hidden(model, ids)), 1)
    assert (r_ids[0, 2:] == 1).all()  # math text routed to "math"


@torch.no_grad()
def test_per_layer_routers_match_hook_reference(gpt2):
    """One router per block, each reading that block's input: checked against hooks on PEFT's layers that
    route every block from the (already routed) hidden state entering it."""
    from _hf import lora_layers

    routers = [mo.TokenRouter(32, list(ADAPTERS), temperature=0.5), mo.ContextRouter(32, list(ADAPTERS))]
    for r in routers:
        for p in r.parameters():
            p.normal_(0, 1.0)
    pm, names = gpt2.pm, list(ADAPTERS)
    current = {}
    handles = []
    for i, block in enumerate(pm.base_model.model.transformer.h):
        def route(module, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            ids, w = routers[i].select(routers[i](h), 2)
            current[i] = _dense(ids, w, len(names))

        handles.append(block.register_forward_pre_hook(route, with_kwargs=True))
    for name, layer in lora_layers(pm).items():
        block = int(name.split(".h.")[1].split(".")[0])

        def add(mod, inp, out, layer=layer, block=block):
            x, w = inp[0], current[block]
            for n, adapter in enumerate(names):
                if adapter in layer.lora_A:
                    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                    out = out + w[..., n, None] * layer.scaling[adapter] * ((x @ a.t()) @ b.t())
            return out

        handles.append(layer.get_base_layer().register_forward_hook(add))
    try:
        with pm.disable_adapter():
            ref = pm(gpt2.ids).logits
    finally:
        for h in handles:
            h.remove()
    model = gpt2.patched(router=routers, top_k=2)
    assert_logits_close(model(gpt2.ids).logits, ref)
    with pytest.raises(ValueError, match="one router"):
        gpt2.patched(router=routers[:1])

"""Cached decoding equals full recomputation, and equals PEFT, for every way of routing (torch backend).

Each case generates twice with the same routing: with the KV cache (prefill, then one token per forward, routed
by the cache's length) and without it (every step recomputes the whole sequence from position 0). Greedy and
beam search (beam search reorders the cache, and with it the stateful routers' state), left padding, a static
cache, and prompt-lookup decoding (which crops the cache). Run against the newest transformers and, in CI, the
oldest that pyproject.toml admits.
"""

import copy

import pytest
import torch

from _hf import ADAPTERS, CODE, MATH, assert_logits_close, peft_cat, shared_setup, word_tokenizer

import molora_ops as mo

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=("gpt2", "llama"))
def setup(request, tmp_path_factory):
    return shared_setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def _prompt(setup):
    """[3, 7] ids, the middle row left-padded by 2 (pad id 0, attention_mask 0)."""
    ids = setup.ids.clone()
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask


def _generate(model, ids, mask, *, use_cache, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, use_cache=use_cache, return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)


def _assert_cached_equals_recompute(model, ids, mask, **kw):
    seq_c, scores_c = _generate(model, ids, mask, use_cache=True, **kw)
    seq_f, scores_f = _generate(model, ids, mask, use_cache=False, **kw)
    assert torch.equal(seq_c, seq_f), f"cached {seq_c.tolist()} != recomputed {seq_f.tolist()}"
    assert_logits_close(scores_c, scores_f, name="step scores")
    return seq_c


def _per_token_weights(batch, seq, generator_seed=7):
    g = torch.Generator().manual_seed(generator_seed)
    w = torch.rand(batch, seq, len(ADAPTERS), generator=g)
    w[w < 0.35] = 0.0  # empty slots, and some tokens with no adapter at all
    return w


def _routings(batch, seq):
    return {
        "names": dict(adapter_names=["qa", "__base__", "code"]),
        "blend": dict(adapter_weights={"code": 0.5, "math": 0.4, "qa": 0.1}),
        "per-seq": dict(adapter_weights=torch.tensor([[0.7, 0.3, 0.0], [0.0, -0.5, 1.2], [0.2, 0.3, 0.5]])),
        "per-token": dict(adapter_weights=_per_token_weights(batch, seq + NEW_TOKENS)),
    }


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["names", "blend", "per-seq", "per-token"])
def test_routing_kwargs_cached_equals_recompute(setup, kind, num_beams):
    ids, mask = _prompt(setup)
    route = _routings(*ids.shape)[kind]
    model = setup.patched()
    seq_kw = _assert_cached_equals_recompute(model, ids, mask, num_beams=num_beams, **route)
    with mo.routing(model, **route):  # the context form expands for beams the same way
        seq_ctx = _assert_cached_equals_recompute(model, ids, mask, num_beams=num_beams)
    assert torch.equal(seq_kw, seq_ctx)
    assert not torch.equal(seq_kw, setup.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                                        do_sample=False, pad_token_id=0, num_beams=num_beams))


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_adapter_names_generate_equals_peft(setup, num_beams):
    """PEFT repeats each name per beam; so does the patched model, with the names as a kwarg or a context."""
    ids, mask = _prompt(setup)
    names = ["qa", "__base__", "code"]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
              num_beams=num_beams)
    ref = setup.pm.generate(adapter_names=names, **kw)
    model = setup.patched()
    assert torch.equal(model.generate(adapter_names=names, **kw), ref)
    with mo.routing(model, adapter_names=names):
        assert torch.equal(model.generate(**kw), ref)


@torch.no_grad()
def test_blend_generate_equals_peft_cat(setup):
    ids, mask = _prompt(setup)
    blend = {"code": 0.5, "math": 0.4, "qa": 0.1}
    pm = copy.deepcopy(setup.pm)
    pm.set_adapter(peft_cat(pm, blend, "blend"))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = pm.generate(**kw)
    assert torch.equal(setup.patched().generate(adapter_weights=blend, **kw), ref)


@torch.no_grad()
def test_forward_kwargs_equal_peft_mixed_batch(setup):
    names = ["math", "code", "__base__"]
    ref = setup.pm(setup.ids, adapter_names=names).logits
    model = setup.patched()
    assert_logits_close(model(setup.ids, adapter_names=names).logits, ref)
    assert_logits_close(model(input_ids=setup.ids, adapter_names=names).logits, ref)
    assert torch.equal(model(setup.ids).logits, setup.base(setup.ids).logits)  # the kwargs lasted one call


@torch.no_grad()
def test_batch_mismatch_raises_like_peft(setup):
    model = setup.patched()
    nine = torch.randint(1, 60, (9, 4))
    with pytest.raises(ValueError, match="5 sequences"):  # all-base routing too: PEFT raises, so do we
        with mo.routing(model, adapter_names=["__base__"] * 5):
            model(nine)
    with pytest.raises(ValueError, match="2 sequences"):
        model(nine, adapter_names=["code", "qa"])
    with pytest.raises(ValueError, match="2 sequences"):
        model.generate(input_ids=nine, adapter_names=["code", "qa"], max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        model(nine[:1], adapter_names=["nope"])
    with pytest.raises(TypeError, match="adapter_names"):
        model(nine[:1], adapter_names="code")
    with pytest.raises(ValueError, match="exactly one"):
        model(nine[:1], adapter_names=["code"], adapter_weights={"code": 1.0})
    # nothing was left behind by the failed calls
    state = mo.hf.state.state_of(model)
    assert state.spec_var.get() is None and state.fwd_var.get() is None and state.kw_var.get() is None
    assert torch.equal(model(nine).logits, setup.base(nine).logits)


@torch.no_grad()
def test_num_return_sequences_repeats_each_sequence_routing(setup):
    """Sampling with num_return_sequences=2 equals sampling from inputs and names repeated by hand."""
    ids, mask = _prompt(setup)
    names = ["qa", "__base__", "code"]
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, pad_token_id=0)
    model = setup.patched()
    torch.manual_seed(3)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, num_return_sequences=2, **kw)
    torch.manual_seed(3)
    ref = model.generate(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                         adapter_names=[n for n in names for _ in range(2)], **kw)
    assert torch.equal(out, ref)


def _routers(setup, tokenizer):
    hidden = setup.base.config.hidden_size
    torch.manual_seed(11)
    token = mo.TokenRouter(hidden, list(ADAPTERS), temperature=0.5)
    context = mo.ContextRouter(hidden, list(ADAPTERS), temperature=0.3)
    for r in (token, context):
        for p in r.parameters():
            p.data.normal_(0, 1.0)
    keyword = mo.KeywordRouter({"code": CODE[:4], "math": MATH[:4], "qa": ["the", "of"]}, tokenizer)
    return {"token": token, "context": context, "keyword": keyword}


def _keyword_prompt(setup, tokenizer):
    texts = ["def sum the import", "integral of matrix proof", "the class yield the"]
    ids = torch.tensor([tokenizer.encode(t) for t in texts])
    mask = torch.ones_like(ids)
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["token", "context", "keyword"])
def test_router_cached_equals_recompute(setup, tokenizer, kind, num_beams):
    router = _routers(setup, tokenizer)[kind]
    ids, mask = _keyword_prompt(setup, tokenizer) if kind == "keyword" else _prompt(setup)
    model = setup.patched(router=router, top_k=2)
    seq = _assert_cached_equals_recompute(model, ids, mask, num_beams=num_beams)
    base = setup.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0, num_beams=num_beams)
    assert not torch.equal(seq, base)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["context", "keyword"])
def test_router_state_follows_a_cropped_cache(setup, tokenizer, kind):
    """Prompt-lookup decoding proposes tokens, then crops the cache back past the rejected ones: the router's
    per-position state must be cropped with it, so the output equals plain greedy decoding."""
    router = _routers(setup, tokenizer)[kind]
    ids, mask = _keyword_prompt(setup, tokenizer)
    ids, mask = ids[:1].repeat(1, 3), mask[:1].repeat(1, 3)  # repetitive: prompt lookup finds candidates
    model = setup.patched(router=router, top_k=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(**kw)
    assert torch.equal(model.generate(prompt_lookup_num_tokens=3, **kw), plain)
    assert torch.equal(model.generate(use_cache=False, **kw), plain)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["context", "per-token"])
def test_static_cache_equals_recompute(setup, tokenizer, kind):
    ids, mask = _prompt(setup)
    if kind == "context":
        model = setup.patched(router=_routers(setup, tokenizer)["context"], top_k=2)
        route = {}
    else:
        model = setup.patched()
        route = _routings(*ids.shape)["per-token"]
    static, _ = _generate(model, ids, mask, use_cache=True, cache_implementation="static", **route)
    full, _ = _generate(model, ids, mask, use_cache=False, **route)
    assert torch.equal(static, full)


@torch.no_grad()
def test_stateful_router_refuses_a_cache_filled_without_it(setup, tokenizer):
    router = _routers(setup, tokenizer)["context"]
    model = setup.patched(router=router, top_k=2)
    ids, _ = _prompt(setup)
    with mo.routing(model, adapter_names=["code"] * 3):
        pre = model(ids, use_cache=True)
    cache = pre.past_key_values if hasattr(pre, "past_key_values") and pre.past_key_values is not None else pre.cache
    with pytest.raises(RuntimeError, match="router's state"):
        model(ids[:, :1], past_key_values=cache, use_cache=True)

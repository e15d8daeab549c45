"""torch.compile(fullgraph=True) of a patched model: 0 graph breaks under every routing form, outputs equal to eager,
and no recompile from one static-cache decode step to the next or for new routing values.

Most cases use dynamo's "eager" backend: it traces exactly as inductor does (graph breaks, guards, recompiles) but
runs the captured graph with PyTorch ops, so a case costs seconds. One case compiles with inductor end to end.
Every case fails on a patch whose layers read contextvars in the compiled region (a graph break, so fullgraph=True
raises), or whose routing is frozen at trace time (the new-routing cases then differ from eager).
"""

from __future__ import annotations

import pytest
import torch

from _hf import ADAPTERS, assert_logits_close, shared_setup

import molora_ops as mo
from molora_ops.hf.state import state_of

transformers = pytest.importorskip("transformers")
dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

N = len(ADAPTERS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_setup("llama", tmp_path_factory)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _compiled(model, backend="eager"):
    return torch.compile(model, fullgraph=True, backend=backend)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _assert_no_breaks():
    assert not counters["graph_break"], dict(counters["graph_break"])


def _forms(batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "names": dict(adapter_names=["code", "__base__", "qa"][:batch]),
        "blend": dict(adapter_weights={"code": 0.5, "math": 0.4, "qa": 0.1}),
        "vector": dict(adapter_weights=torch.rand(N, generator=g)),
        "per_sequence": dict(adapter_weights=torch.rand(batch, N, generator=g)),
        "per_token": dict(adapter_weights=torch.rand(batch, seq, N, generator=g)),
    }


@torch.no_grad()
@pytest.mark.parametrize("form", ["names", "blend", "vector", "per_sequence", "per_token"])
@pytest.mark.parametrize("given_as", ["kwargs", "context"])
def test_every_routing_form_traces_in_one_graph_and_equals_eager(setup, form, given_as):
    model = setup.patched()
    ids = setup.ids
    kw = _forms(*ids.shape)[form]
    compiled = _compiled(model)
    if given_as == "kwargs":
        expected, got = model(ids, **kw).logits, compiled(ids, **kw).logits
    else:
        with mo.routing(model, **kw):
            expected, got = model(ids).logits, compiled(ids).logits
    _assert_no_breaks()
    assert _graphs() == 1
    assert_logits_close(got, expected, name=f"compiled {form} ({given_as})")
    base = setup.base(ids).logits
    assert (got - base).abs().max() > 1e-3  # the adapters really were applied in the compiled graph


@torch.no_grad()
@pytest.mark.parametrize("per_layer", [False, True], ids=["one_router", "per_layer_routers"])
def test_token_router_traces_in_one_graph_and_equals_eager(setup, per_layer):
    hidden = setup.base.config.hidden_size
    torch.manual_seed(3)
    if per_layer:
        router = [mo.TokenRouter(hidden, list(ADAPTERS), layer=i) for i in range(setup.base.config.num_hidden_layers)]
    else:
        router = mo.TokenRouter(hidden, list(ADAPTERS), layer=1)
    model = setup.patched(router=router, top_k=2)
    expected = model(setup.ids).logits
    got = _compiled(model)(setup.ids).logits
    _assert_no_breaks()
    assert_logits_close(got, expected, name="compiled TokenRouter")


@torch.no_grad()
def test_new_names_and_weights_do_not_recompile(setup):
    """Routing values enter the graph as tensors: new names lists and new weight tensors of the same shape reuse
    the compiled graph (a graph specialised on the names would recompile per list and hit the recompile limit)."""
    model = setup.patched()
    compiled = _compiled(model)
    ids = setup.ids
    for names in (["code", "__base__", "qa"], ["qa", "qa", "math"], ["__base__", "math", "code"]):
        assert_logits_close(compiled(ids, adapter_names=names).logits, model(ids, adapter_names=names).logits)
    assert _graphs() == 1
    for seed in range(3):
        w = torch.rand(ids.shape[0], N, generator=torch.Generator().manual_seed(seed))
        assert_logits_close(compiled(ids, adapter_weights=w).logits, model(ids, adapter_weights=w).logits)
    assert _graphs() == 2  # one graph per routing kind (names, per-sequence weights), not per value
    _assert_no_breaks()


def _cache_kw(cache) -> dict:
    """The KV cache as the installed transformers takes it: ``cache=`` from 5.24, ``past_key_values=`` before."""
    import inspect

    params = inspect.signature(transformers.LlamaModel.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}


def _prefill(model, ids, cache):
    return model(ids, **_cache_kw(cache)).logits[:, -1:].argmax(-1)


@torch.no_grad()
@pytest.mark.parametrize("form", ["per_token", "names"])
def test_static_cache_decode_does_not_recompile_and_equals_eager(setup, form):
    """Cached decode steps with HF's StaticCache: one graph for every step (positions are tensors, not Python ints)
    and each step equals the eager patched model's step on its own cache."""
    model = setup.patched()
    ids = setup.ids
    kw = _forms(*ids.shape)[form]
    config = setup.base.config
    compiled = _compiled(model)
    with mo.routing(model, **kw):
        cache_c = transformers.StaticCache(config=config, max_cache_len=32)
        cache_e = transformers.StaticCache(config=config, max_cache_len=32)
        token = _prefill(model, ids, cache_c)
        assert torch.equal(token, _prefill(model, ids, cache_e))
        graphs = None
        for step in range(4):
            got = compiled(token, **_cache_kw(cache_c)).logits
            expected = model(token, **_cache_kw(cache_e)).logits
            assert_logits_close(got, expected, name=f"decode step {step}")
            graphs = _graphs() if graphs is None else graphs
            assert _graphs() == graphs, f"decode step {step} recompiled"
            assert int(cache_c.get_seq_length()) == ids.shape[1] + step + 1  # the cache really was used
            token = expected[:, -1:].argmax(-1)
    _assert_no_breaks()


@torch.no_grad()
def test_weights_updated_in_place_route_the_next_compiled_call(setup):
    """A float32 adapter_weights tensor is used by reference in compiled (and captured) forwards: W.copy_(new)
    routes the next call by the new weights, without recompiling."""
    model = setup.patched()
    ids = setup.ids
    w = torch.zeros(ids.shape[0], ids.shape[1], N)  # all zero at entry: no adapter yet, but W is read per call
    compiled = _compiled(model)
    with mo.routing(model, adapter_weights=w):
        assert_logits_close(compiled(ids).logits, setup.base(ids).logits, name="all-zero weights")
        for seed in range(3):
            fresh = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed))
            fresh[0, :, 1] = 0.0  # zero entries become empty slots
            w.copy_(fresh)
            got = compiled(ids).logits
            with mo.routing(model, adapter_weights=fresh.clone()):
                expected = model(ids).logits
            assert_logits_close(got, expected, name=f"in-place weights {seed}")
    assert _graphs() == 1
    _assert_no_breaks()


@torch.no_grad()
def test_lm_head_routed_traces_and_equals_eager(tmp_path_factory):
    """lm_head targeted by an adapter: its routing (the last logits_to_keep positions) is traced too."""
    from test_patch_lm_head import LmHeadSetup

    lm = LmHeadSetup("llama", tmp_path_factory.mktemp("lm_head_compile"))
    model, ids = lm.patched(), lm.ids
    kw = dict(adapter_weights=torch.rand(ids.shape[0], ids.shape[1], N))
    expected = model(ids, logits_to_keep=1, **kw).logits
    got = _compiled(model)(ids, logits_to_keep=1, **kw).logits
    _assert_no_breaks()
    assert_logits_close(got, expected, name="compiled lm_head routing")


@torch.no_grad()
def test_context_router_traces_a_forward_that_starts_its_sequences(setup):
    """ContextRouter's running mean needs no stored state when the forward starts its sequences (no cache): it
    traces in one graph and equals eager, left padding included (the padding mask reaches the router)."""
    hidden = setup.base.config.hidden_size
    torch.manual_seed(4)
    model = setup.patched(router=mo.ContextRouter(hidden, list(ADAPTERS), layer=1), top_k=2)
    ids = setup.ids
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of the first sequence
    expected = model(ids, attention_mask=mask, use_cache=False).logits
    got = _compiled(model)(ids, attention_mask=mask, use_cache=False).logits
    _assert_no_breaks()
    assert_logits_close(got, expected, name="compiled ContextRouter")


@pytest.mark.parametrize("kind", ["context", "keyword"])
def test_stateful_routers_refuse_what_tracing_cannot_follow_with_a_clear_error(setup, kind):
    """KeywordRouter (host-side matching) never traces; ContextRouter refuses a cached step (its per-position
    state lives in Python objects beside the cache); eager use is unaffected."""
    hidden = setup.base.config.hidden_size
    if kind == "context":
        router = mo.ContextRouter(hidden, list(ADAPTERS))
        expected = "across cached steps"
    else:
        from _hf import word_tokenizer

        router = mo.KeywordRouter({"code": ["def"]}, word_tokenizer(), adapter_names=list(ADAPTERS))
        expected = "Python loops over the token ids"
    model = setup.patched(router=router, top_k=2)
    cache = transformers.StaticCache(config=setup.base.config, max_cache_len=32)
    with torch.no_grad():
        token = _prefill(model, setup.ids, cache) if kind == "context" else setup.ids
        kw = _cache_kw(cache) if kind == "context" else {}
        with pytest.raises(Exception, match=expected):
            _compiled(model)(token, **kw)
        model(setup.ids)  # eager still works


@torch.no_grad()
def test_no_routing_leaks_into_a_later_compiled_call(setup):
    """The per-model copy that compiled code reads is cleared when the last routing() block or call ends."""
    model = setup.patched()
    compiled = _compiled(model)
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        compiled(setup.ids)
    assert state_of(model).spec_var._traced is None
    assert_logits_close(compiled(setup.ids).logits, setup.base(setup.ids).logits, name="no routing after the block")


@torch.no_grad()
def test_inductor_decode_equals_eager_without_recompiles(setup):
    """One real inductor compile (CPU C++ codegen): a routed static-cache decode step, three steps, one graph."""
    model = setup.patched()
    ids = setup.ids
    config = setup.base.config
    compiled = _compiled(model, backend="inductor")
    w = torch.rand(ids.shape[0], N)
    with mo.routing(model, adapter_weights=w):
        cache_c = transformers.StaticCache(config=config, max_cache_len=32)
        cache_e = transformers.StaticCache(config=config, max_cache_len=32)
        token = _prefill(model, ids, cache_c)
        _prefill(model, ids, cache_e)
        for step in range(3):
            got = compiled(token, **_cache_kw(cache_c)).logits
            expected = model(token, **_cache_kw(cache_e)).logits
            assert_logits_close(got, expected, name=f"inductor decode step {step}", rel=1e-4)
            token = expected[:, -1:].argmax(-1)
    assert _graphs() == 1
    _assert_no_breaks()


@torch.no_grad()
def test_per_call_weights_trace_with_their_top_k_and_a_block_with_n_slots(setup, monkeypatch):
    """Per-call adapter_weights cannot change before their forward, so the compiled forward routes their top-k
    (K = 2 slots here, not N); a routing() block's tensor is read in place, so it gets N slots."""
    from molora_ops.runtime import RoutedBatch

    slots = []
    real = RoutedBatch.build.__func__

    def recording(cls, topk_ids, *args, **kwargs):
        slots.append(int(topk_ids.shape[1]))
        return real(cls, topk_ids, *args, **kwargs)

    monkeypatch.setattr(RoutedBatch, "build", classmethod(recording))
    model = setup.patched()
    ids = setup.ids
    w = torch.rand(ids.shape[0], ids.shape[1], N)
    w[..., 0] = 0.0  # two non-zero weights per token
    compiled = _compiled(model)
    assert_logits_close(compiled(ids, adapter_weights=w).logits, model(ids, adapter_weights=w).logits)
    assert slots and set(slots) == {2}, slots
    slots.clear()
    dynamo.reset()
    with mo.routing(model, adapter_weights=w):
        compiled = _compiled(model)
        compiled(ids)
    assert slots and set(slots) == {N}, slots

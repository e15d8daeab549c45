"""PEFT bias adapters (bias="lora_only" / "all", lora_bias=True): molora_ops.hf.bias against PEFT's own models.

The LoRA term is added by forward hooks here (patch() wiring is tested with the patch), so these tests check the
bias deltas alone: values, signs, weighting, which modules, and the errors."""

import copy

import pytest
import torch

from _hf import VOCAB, make_model, peft

from molora_ops.hf.bias import add_routed_bias, bias_deltas
from molora_ops.hf.peft_io import AdapterError, LoraAdapter, LoraModuleWeights, load_adapter

TARGETS = ["c_attn", "c_proj"]  # GPT-2: attn.c_attn, attn.c_proj and mlp.c_proj; c_fc and the LayerNorms are not


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    base, _ = make_model("gpt2")
    return base


def _save(base, path, *, seed, bias="lora_only", lora_bias=False, noise=lambda name: True):
    """A PEFT GPT-2 adapter whose trainable base biases (those `noise` selects) got random offsets, saved to `path`."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, fan_in_fan_out=True,
                          bias=bias, lora_bias=lora_bias)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and name.endswith(".bias") and "lora_" not in name and noise(name):
                p.add_(0.5 * torch.randn_like(p))
    pm.save_pretrained(str(path))
    return str(path)


def _targets(model, adapter):
    return {m: model.get_submodule(m) for m in adapter.modules}


@torch.no_grad()
def _hooked_logits(base, adapters: dict, weights: list, ids):
    """Logits of `base` with hooks adding sum_n weights[n] * (s B A x) and add_routed_bias (every token routed to
    every adapter with its weight) on each targeted module."""
    model = copy.deepcopy(base)
    names = list(adapters)
    targets = {m: model.get_submodule(m) for a in adapters.values() for m in a.modules}
    deltas = bias_deltas(model, adapters, names, targets)
    handles = []
    for mod_name, mod in targets.items():
        def hook(module, inp, out, mod_name=mod_name):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            out2d = out.reshape(-1, out.shape[-1]).clone()
            for n, name in enumerate(names):
                w = adapters[name].modules.get(mod_name)
                if w is not None:
                    out2d += weights[n] * w.scaling * ((x @ w.lora_a.t()) @ w.lora_b.t())
            if mod_name in deltas:
                t = out2d.shape[0]
                topk_ids = torch.arange(len(names)).expand(t, -1)
                topk_w = torch.tensor(weights).expand(t, -1)
                out2d = add_routed_bias(out2d, topk_ids, topk_w, deltas[mod_name])
            return out2d.reshape(out.shape)

        handles.append(mod.register_forward_hook(hook))
    try:
        return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _peft_logits(base, path, ids):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        return pm(ids).logits


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bias, lora_bias", [("lora_only", False), ("all", False), ("none", True), ("lora_only", True)])
def test_one_adapter_equals_peft(gpt2, tmp_path, bias, lora_bias):
    # bias="all": only the LoRA targets' biases change (the others are saved, equal to the model's, and ignored)
    path = _save(gpt2, tmp_path / "a", seed=1, bias=bias, lora_bias=lora_bias, noise=lambda n: "base_layer" in n)
    adapter = load_adapter("a", path)
    saved = set(adapter.biases)
    if bias == "all":
        assert "transformer.h.0.ln_1" in saved and "transformer.h.0.mlp.c_fc" in saved
    assert (bias == "none") == (not saved)
    assert all((w.lora_b_bias is not None) == lora_bias for w in adapter.modules.values())
    deltas = bias_deltas(gpt2, {"a": adapter}, ["a"], _targets(gpt2, adapter))
    assert set(deltas) == set(adapter.modules)  # every target changed; LayerNorms and c_fc (equal) are left out
    assert all(d.shape == (1, gpt2.get_submodule(m).bias.shape[0]) and d.dtype == torch.float32
               for m, d in deltas.items())
    ours = _hooked_logits(gpt2, {"a": adapter}, [1.0], IDS)
    ref = _peft_logits(gpt2, path, IDS)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    without = _hooked_logits(gpt2, {"a": LoraAdapter("a", adapter.modules, adapter.config)}, [1.0], IDS)
    if not lora_bias:
        assert (without - ref).abs().max() > 1e-2  # the bias deltas matter


def test_unchanged_biases_add_nothing(gpt2, tmp_path):
    adapter = load_adapter("a", _save(gpt2, tmp_path / "a", seed=1, bias="all", noise=lambda n: False))
    assert adapter.biases
    assert bias_deltas(gpt2, {"a": adapter}, ["a"], _targets(gpt2, adapter)) == {}


@torch.no_grad()
def test_per_token_blend_is_the_mixture_of_the_adapters_models(gpt2, tmp_path):
    """At a module: base + sum_k w_k (y_k - base), where y_k is adapter k's PEFT layer; one adapter has no bias."""
    paths = {"a": _save(gpt2, tmp_path / "a", seed=1, lora_bias=True),
             "b": _save(gpt2, tmp_path / "b", seed=2, bias="none"),
             "c": _save(gpt2, tmp_path / "c", seed=3)}
    loaded = {n: load_adapter(n, p) for n, p in paths.items()}
    names = list(paths)
    mod_name = "transformer.h.1.attn.c_attn"
    deltas = bias_deltas(gpt2, loaded, names, {m: gpt2.get_submodule(m) for m in loaded["a"].modules})
    assert deltas[mod_name][1].eq(0).all() and deltas[mod_name][0].ne(0).any()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    base_layer = gpt2.get_submodule(mod_name)
    y0 = base_layer(x)
    ys = [peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), paths[n]).base_model.model.get_submodule(mod_name)(x)
          for n in names]
    topk_ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [0, 0]])
    topk_w = torch.tensor([[0.7, 0.3], [1.0, float("nan")], [0.25, 0.5], [float("nan"), 2.0], [0.5, 0.5]])
    ours = y0.clone()
    for t in range(5):
        for k in range(2):
            e = int(topk_ids[t, k])
            if e >= 0:
                w = loaded[names[e]].modules[mod_name]
                ours[t] += topk_w[t, k] * w.scaling * (w.lora_b @ (w.lora_a @ x[t]))
    ours = add_routed_bias(ours, topk_ids, topk_w, deltas[mod_name])
    expected = y0.clone()
    for t in range(5):
        for k in range(2):
            e = int(topk_ids[t, k])
            if e >= 0:
                expected[t] += topk_w[t, k] * (ys[e][t] - y0[t])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[3], y0[3])  # empty slots add nothing, NaN weights included


# -------------------------------------------------------------------------------------------- errors
def test_changed_bias_outside_the_targets_is_refused(gpt2, tmp_path):
    path = _save(gpt2, tmp_path / "a", seed=1, bias="all", noise=lambda n: "h.1.ln_2" in n)
    adapter = load_adapter("a", path)
    with pytest.raises(AdapterError, match=r"'a'.*'transformer\.h\.1\.ln_2'.*ln_2\.bias.*not a LoRA target"):
        bias_deltas(gpt2, {"a": adapter}, ["a"], _targets(gpt2, adapter))


def _in_memory(biases: dict, module="transformer.h.0.attn.c_attn", out=96):
    w = LoraModuleWeights(torch.zeros(2, 32), torch.zeros(out, 2), 1.0)
    return LoraAdapter("x", {module: w}, biases={m: (m + ".bias", b) for m, b in biases.items()})


def test_bias_errors_name_adapter_module_and_key(gpt2):
    targets = {"transformer.h.0.attn.c_attn": gpt2.get_submodule("transformer.h.0.attn.c_attn")}
    bad_shape = _in_memory({"transformer.h.0.attn.c_attn": torch.ones(95)})
    with pytest.raises(AdapterError, match=r"'x'.*'transformer\.h\.0\.attn\.c_attn'.*c_attn\.bias.*\(95,\).*\(96,\)"):
        bias_deltas(gpt2, {"x": bad_shape}, ["x"], targets)
    nowhere = _in_memory({"transformer.h.0.nope": torch.ones(3)})
    with pytest.raises(AdapterError, match=r"'x'.*'transformer\.h\.0\.nope'.*does not have"):
        bias_deltas(gpt2, {"x": nowhere}, ["x"], targets)
    llama, _ = make_model("llama")  # Llama's projections have no bias
    q = "model.layers.0.self_attn.q_proj"
    no_bias = _in_memory({q: torch.ones(32)}, module=q, out=32)
    with pytest.raises(AdapterError, match=r"'x'.*q_proj.*q_proj\.bias.*Linear there has no bias"):
        bias_deltas(llama, {"x": no_bias}, ["x"], {q: llama.get_submodule(q)})


# ------------------------------------------------------------------------------------------ add_routed_bias
def _reference(out2d, ids, w, deltas):
    res = out2d.double().clone()
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            if ids[t, k] >= 0:
                res[t] += w[t, k].double() * deltas[ids[t, k]].double()
    return res


def test_add_routed_bias_values_rounding_and_in_place():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 2, -1], [1, 1, 0], [-1, -1, -1], [2, 0, 1]], dtype=torch.int32)
    w = torch.rand(4, 3, generator=g)
    w[ids < 0] = float("nan")
    deltas = torch.randn(3, 7, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out2d = torch.randn(4, 7, generator=g).to(dtype)
        expected = _reference(out2d, ids, w, deltas)
        res = add_routed_bias(out2d, ids, w, deltas)
        assert res is out2d  # in place: nothing requires grad
        if dtype == torch.float32:
            torch.testing.assert_close(res.double(), expected, atol=1e-6, rtol=1e-6)
        else:  # float32 accumulation, then one rounding
            assert torch.equal(res, expected.float().to(dtype))
    empty = torch.zeros(0, 7)
    assert add_routed_bias(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), deltas).shape == (0, 7)


def test_add_routed_bias_non_finite_delta_stays_with_its_tokens():
    deltas = torch.ones(3, 4)
    deltas[1] = float("nan")
    deltas[0, 0] = float("inf")
    ids = torch.tensor([[2, -1], [1, 2], [-1, -1], [2, 2]])
    w = torch.tensor([[1.0, 0.5], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5]])
    res = add_routed_bias(torch.zeros(4, 4), ids, w, deltas)
    assert torch.isfinite(res[[0, 2, 3]]).all() and torch.isnan(res[1]).all()


def test_add_routed_bias_autograd():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0, 1], [1, -1], [2, 0]])
    out2d = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    deltas = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, ww, d: add_routed_bias(o, ids, ww, d), (out2d, w, deltas))
    before = out2d.detach().clone()
    res = add_routed_bias(out2d, ids, w, deltas)  # a leaf that requires grad: left alone
    assert res is not out2d and torch.equal(out2d.detach(), before)
    res.sum().backward()
    assert w.grad[1, 1] == 0 and torch.equal(w.grad[0, 0], deltas[0].detach().sum())
    with torch.no_grad():
        assert add_routed_bias(before, ids, w, deltas) is before


def test_add_routed_bias_argument_errors():
    out2d, ids, w, d = torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(3, 4)
    with pytest.raises(ValueError, match="deltas must be \\[N, 4\\]"):
        add_routed_bias(out2d, ids, w, torch.ones(3, 5))
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        add_routed_bias(out2d, ids, torch.ones(2, 2), d)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        add_routed_bias(out2d, ids.float(), w, d)
    with pytest.raises(TypeError, match="deltas must be a floating tensor"):
        add_routed_bias(out2d, ids, w, d.long())
    with pytest.raises(ValueError, match="out2d must be 2-D"):
        add_routed_bias(out2d[None], ids, w, d)
    with pytest.raises(TypeError, match="topk_weights must be a torch.Tensor"):
        add_routed_bias(out2d, ids, None, d)


def test_merge_refuses_bias_adapters(gpt2, tmp_path):
    """A PEFT merge keeps one shared set of base biases, so it cannot be the blend of bias-changing adapters."""
    import molora_ops as mo

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), _save(gpt2, tmp_path / "a", seed=1), adapter_name="a")
    pm.load_adapter(_save(gpt2, tmp_path / "b", seed=2, bias="none"), adapter_name="b")  # PEFT loads one bias adapter
    with pytest.raises(ValueError, match=r"\['a'\] change biases"):
        mo.merge(pm, {"a": 0.5, "b": 0.5})
    assert "merged" not in pm.peft_config

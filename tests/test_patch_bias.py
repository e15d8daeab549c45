"""PEFT bias adapters (bias="lora_only" / "all", lora_bias=True) routed end to end through mo.patch.

Adapters are made with real PEFT (random offsets added to their trainable biases) and saved. References:
  - adapter_names: row i equals the PeftModel with ONLY adapter i loaded (PEFT loads the saved biases into the base
    layers, so that model is "adapter i's model"); "__base__" rows equal the base model.
  - blends (dict and per-token [B, S, N]): forward hooks on the base model adding, on each targeted module,
    sum_n W[..., n] * (s_n B_n A_n x + (b_n - b) + s_n * lora_B bias_n), with every tensor read from adapter n's
    PeftModel (an implementation independent of molora_ops.hf.bias).
GPT-2's Conv1D projections and Qwen2's q/k/v (a fused sibling group in the patch) have biases; Llama-like tiny
models have none. fp32 tolerances are assert_logits_close's, never loosened.
"""

import copy

import pytest
import torch

from _hf import VOCAB, assert_logits_close, make_model, peft

import molora_ops as mo
from molora_ops.hf.state import is_patched
from molora_ops.hf.peft_io import AdapterError

NAMES = ("a", "b", "c")


def _save(base, path, cfg, *, seed, noise=lambda name: True):
    """A PEFT adapter whose trainable biases that `noise` selects (base-layer biases for bias="lora_only"/"all",
    every bias for "all", lora_B biases for lora_bias=True) got random offsets, saved to `path`."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    changed = []
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and name.endswith(".bias") and noise(name):
                p.add_(0.5 * torch.randn_like(p))
                changed.append(name)
    pm.save_pretrained(str(path))
    return str(path), changed


def _configs(arch):
    """a: bias="lora_only"; b: bias="lora_only" + lora_bias=True, rslora, fewer targets; c: plain LoRA."""
    LC = peft.LoraConfig
    if arch == "gpt2":
        targets, fifo = ["c_attn", "c_proj", "c_fc"], True
    else:  # qwen2: q/k/v have biases, o_proj and the MLP do not
        targets, fifo = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False
    return {
        "a": LC(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fifo,
                bias="lora_only"),
        "b": LC(r=2, lora_alpha=4, target_modules=targets[:2] + targets[-1:], init_lora_weights=False,
                fan_in_fan_out=fifo, bias="lora_only", lora_bias=True, use_rslora=True),
        "c": LC(r=6, lora_alpha=3, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fifo),
    }


class BiasSetup:
    def __init__(self, arch, root):
        torch.manual_seed(0)
        self.arch = arch
        self.base, _ = make_model(arch)
        self.dirs, self.changed = {}, {}
        for i, (name, cfg) in enumerate(_configs(arch).items()):
            self.dirs[name], self.changed[name] = _save(self.base, root / name, cfg, seed=100 + i)
        # adapter i's own model: a PeftModel with only adapter i (its saved biases loaded into the base layers)
        self.single = {n: peft.PeftModel.from_pretrained(copy.deepcopy(self.base), d).eval()
                       for n, d in self.dirs.items()}

    def patched(self, **kw):
        return mo.patch(copy.deepcopy(self.base), adapters=self.dirs, backend="torch", **kw)


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def setup(request, tmp_path_factory):
    s = BiasSetup(request.param, tmp_path_factory.mktemp(f"{request.param}_bias"))
    # the adapters really changed biases (base-layer biases for a and b, lora_B biases for b), c none
    assert any("base_layer.bias" in n for n in s.changed["a"]) and any("lora_B" in n for n in s.changed["b"])
    assert not s.changed["c"]
    return s


def _ids(batch, seq=7):
    return torch.randint(1, VOCAB, (batch, seq))


# ----------------------------------------------------------------------------------------- the reference
def _lora_layer(pm, module_name):
    from peft.tuners.lora import LoraLayer

    mod = pm.base_model.model.get_submodule(module_name)
    return mod if isinstance(mod, LoraLayer) else None


def _bias(mod):
    b = getattr(mod, "bias", None)
    return None if b is None else b.detach()


def _module_terms(setup, module_name, base_mod):
    """[(LoRA fn x -> s B A x or None, bias delta or None)] per adapter in NAMES order, read from each adapter's
    own PeftModel: bias delta = (its base-layer bias - the model's) + s * its lora_B bias."""
    terms = []
    for name in NAMES:
        layer = _lora_layer(setup.single[name], module_name)
        if layer is None:
            mod = setup.single[name].base_model.model.get_submodule(module_name)
            b_i, b = _bias(mod), _bias(base_mod)
            terms.append((None, None if b is None else b_i - b))
            continue
        a, bmat, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        delta = None
        b_i, b = _bias(layer.get_base_layer()), _bias(base_mod)
        if b is not None:
            delta = b_i - b
        lb = getattr(layer.lora_B["default"], "bias", None)
        if lb is not None:
            delta = s * lb.detach() if delta is None else delta + s * lb.detach()
        terms.append((lambda x, a=a, bmat=bmat, s=s: s * ((x @ a.t()) @ bmat.t()), delta))
    return terms


def hook_reference(setup, weights, forward_kwargs, *, with_bias=True):
    """Logits of a copy of the base model with hooks adding sum_n W[..., n] (s_n B_n A_n x + d_n) on every module
    some adapter targets; W = `weights` broadcastable to [B, S, N]."""
    model = copy.deepcopy(setup.base)
    targeted = set()
    for name in NAMES:
        targeted |= {n for n, m in setup.single[name].base_model.model.named_modules()
                     if _lora_layer(setup.single[name], n) is m}
    handles = []
    for module_name in sorted(targeted):
        mod = model.get_submodule(module_name)
        terms = _module_terms(setup, module_name, mod)

        def hook(m, inp, out, terms=terms):
            x = inp[0]
            for n, (lora, delta) in enumerate(terms):
                w = weights[..., n, None]
                if lora is not None:
                    out = out + w * lora(x)
                if with_bias and delta is not None:
                    out = out + w * delta
            return out

        handles.append(mod.register_forward_hook(hook))
    try:
        return model(**forward_kwargs).logits
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("form", ["kwargs", "context"])
@torch.no_grad()
def test_adapter_names_equal_each_adapters_own_model(setup, form):
    names = ["b", "a", "__base__", "c", "a"]
    ids = _ids(len(names))
    model = setup.patched()
    if form == "kwargs":
        out = model(ids, adapter_names=names).logits
    else:
        with mo.routing(model, adapter_names=names):
            out = model(ids).logits
    base = setup.base(ids).logits
    for row, name in enumerate(names):
        ref = base[row] if name == "__base__" else setup.single[name](ids).logits[row]
        assert_logits_close(out[row], ref, name=f"row {row} ({name})")
    # the biases matter: the same adapters without their bias parts are far from it
    w = torch.zeros(len(names), 1, len(NAMES))
    for row, name in enumerate(names):
        if name != "__base__":
            w[row, 0, NAMES.index(name)] = 1.0
    no_bias = hook_reference(setup, w, dict(input_ids=ids), with_bias=False)
    assert (no_bias[[0, 1, 4]] - out[[0, 1, 4]]).abs().max() > 1e-2


@torch.no_grad()
def test_dict_blend_equals_hand_reference(setup):
    blend = {"a": 0.7, "b": -0.4, "c": 0.5}
    ids = _ids(3)
    w = torch.tensor([blend[n] for n in NAMES])
    ref = hook_reference(setup, w, dict(input_ids=ids))
    model = setup.patched()
    out = model(ids, adapter_weights=blend).logits
    assert_logits_close(out, ref)
    assert (hook_reference(setup, w, dict(input_ids=ids), with_bias=False) - out).abs().max() > 1e-2


@torch.no_grad()
def test_per_token_blend_equals_hand_reference(setup):
    ids = _ids(3)
    w = torch.randn(3, ids.shape[1], len(NAMES))
    w[torch.rand(w.shape) < 0.3] = 0.0  # empty slots
    w[1, 2] = 0.0  # a token with no adapter
    ref = hook_reference(setup, w, dict(input_ids=ids))
    model = setup.patched()
    with mo.routing(model, adapter_weights=w):
        out = model(ids).logits
    assert_logits_close(out, ref)


def test_grads_and_logits_under_autograd(setup):
    """With grad enabled the bias add runs out of place: the same logits as under no_grad (to float32 rounding: the
    no-grad path sums in the per-forward CPU strategy's order), and d loss / d inputs_embeds
    of each row equals that adapter's own model's."""
    names = ["a", "__base__", "b"]
    ids = _ids(len(names))
    embeds = torch.randn(len(names), ids.shape[1], setup.base.config.hidden_size)
    R = torch.randn(*ids.shape, VOCAB)
    model = setup.patched()
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, adapter_names=names).logits
    e = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=e, adapter_names=names).logits
    assert torch.allclose(logits.detach(), plain, rtol=2e-5, atol=2e-5)
    (grad,) = torch.autograd.grad((logits * R).sum(), e)
    for row, name in enumerate(names):
        ref_model = setup.base if name == "__base__" else setup.single[name]
        er = embeds.clone().requires_grad_(True)
        (ref_grad,) = torch.autograd.grad((ref_model(inputs_embeds=er).logits * R).sum(), er)
        assert_logits_close(grad[row], ref_grad[row], name=f"d loss / d inputs_embeds, row {row} ({name})")


@torch.no_grad()
def test_unpatch_removes_everything(setup):
    ids = _ids(2)
    base_sd = setup.base.state_dict()
    ref = setup.base(ids).logits
    model = setup.patched()
    assert any(n.endswith("molora_bias_delta") for n, _ in model.named_buffers())
    sd = model.state_dict()
    assert set(sd) == set(base_sd)
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())  # the saved biases were not loaded into the model
    assert torch.equal(model(ids).logits, ref)  # no routing: the base model, bias deltas not added
    with mo.routing(model, adapter_names=["a", "b"]):
        assert not torch.equal(model(ids).logits, ref)
    mo.unpatch(model)
    assert not any("molora" in n for n, _ in model.named_buffers())
    assert set(model.state_dict()) == set(base_sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_sd.items())
    assert torch.equal(model(ids).logits, ref)
    assert repr(model) == repr(setup.base)


# ----------------------------------------------------------------------------------------- bias="all"
def _all_targets(arch):
    return ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj"]


def _all_adapter(arch, base, path, noise, bias="all", seed=7):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_all_targets(arch), init_lora_weights=False,
                          fan_in_fan_out=arch == "gpt2", bias=bias)
    return _save(base, path, cfg, seed=seed, noise=noise)


# (arch, a module that the bias="all" adapter does not target, whose bias it changes)
UNTARGETED = [("gpt2", "transformer.h.1.ln_2"), ("gpt2", "transformer.h.0.mlp.c_fc"),
              ("qwen2", "model.layers.1.self_attn.k_proj")]


@pytest.mark.parametrize("arch, module", UNTARGETED)
def test_bias_all_with_a_changed_untargeted_bias_is_refused(tmp_path, arch, module):
    """No adapter targets `module`, so its changed bias cannot be routed: AdapterError naming adapter and module."""
    torch.manual_seed(0)
    base, _ = make_model(arch)
    path, changed = _all_adapter(arch, base, tmp_path / "bad", noise=lambda n: f"{module}.bias" in n)
    assert changed, "the adapter changed no bias: the test would prove nothing"
    ok, _ = _all_adapter(arch, base, tmp_path / "ok", noise=lambda n: False, bias="none", seed=3)  # same targets
    model = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=rf"'bad_one'.*'{module.replace('.', '[.]')}'"):
        mo.patch(model, adapters={"ok": ok, "bad_one": path}, backend="torch")
    # refused cleanly: nothing patched, nothing left behind
    assert not is_patched(model)
    assert repr(model) == repr(base)
    assert not any("molora" in n for n, _ in model.named_buffers())


@pytest.mark.parametrize("arch, module", UNTARGETED[1:])
@torch.no_grad()
def test_bias_all_change_on_a_module_another_adapter_targets_is_routed(tmp_path, arch, module):
    """The bias="all" adapter does not target `module` but changed its bias; another adapter targets it, so the
    module is patched and the delta is routed with the bias adapter's weight: each row is its adapter's model."""
    torch.manual_seed(0)
    base, _ = make_model(arch)
    path, changed = _all_adapter(arch, base, tmp_path / "all", noise=lambda n: f"{module}.bias" in n)
    assert changed
    other = _save(base, tmp_path / "other", _configs(arch)["c"], seed=3)[0]  # targets every projection
    names = ["all", "__base__", "other"]
    ids = _ids(len(names))
    model = mo.patch(copy.deepcopy(base), adapters={"other": other, "all": path}, backend="torch")
    out = model(ids, adapter_names=names).logits
    refs = {"all": peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(ids).logits,
            "other": peft.PeftModel.from_pretrained(copy.deepcopy(base), other).eval()(ids).logits,
            "__base__": base(ids).logits}
    for row, name in enumerate(names):
        assert_logits_close(out[row], refs[name][row], name=f"row {row} ({name})")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@torch.no_grad()
def test_bias_all_with_equal_untargeted_biases_equals_peft(tmp_path, arch):
    """bias="all" saves every bias; those of untargeted modules equal the model's and are ignored, the targeted
    ones changed and are routed."""
    torch.manual_seed(0)
    base, _ = make_model(arch)
    path, changed = _all_adapter(arch, base, tmp_path / "all", noise=lambda n: "base_layer" in n)
    assert changed
    ids = _ids(2)
    model = mo.patch(copy.deepcopy(base), adapters={"all": path}, backend="torch")
    out = model(ids, adapter_names=["all", "__base__"]).logits
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(ids).logits
    assert_logits_close(out[0], ref[0], name="bias='all' adapter")
    assert_logits_close(out[1], base(ids).logits[1], name="__base__ row")

"""Adapters that target lm_head: routed after the backbone, on the last logits_to_keep positions (torch backend)."""

import copy

import pytest
import torch
from torch import nn

from _hf import VOCAB, make_model, peft_model_with, assert_logits_close, hook_reference_logits, peft_cat

import molora_ops as mo
from molora_ops.hf.state import state_of
from molora_ops.hf.peft_io import AdapterError

peft = pytest.importorskip("peft")

ADAPTERS = ("code", "math", "qa")


class LmHeadSetup:
    """code: saved with PEFT's default (which also saves lm_head.base_layer.weight); math: rslora, saved with
    save_embedding_layers=False; qa: no lm_head at all (so lm_head mixes adapters with and without it)."""

    def __init__(self, arch, root):
        torch.manual_seed(0)
        self.arch = arch
        self.base, targets = make_model(arch)
        fifo = arch == "gpt2"  # PEFT switches it off for lm_head (an nn.Linear) by itself
        LC = peft.LoraConfig
        configs = {
            "code": (LC(r=4, lora_alpha=8, target_modules=targets + ["lm_head"], init_lora_weights=False,
                        fan_in_fan_out=fifo), "auto"),
            "math": (LC(r=8, lora_alpha=4, target_modules=targets + ["lm_head"], init_lora_weights=False,
                        fan_in_fan_out=fifo, use_rslora=True, rank_pattern={"lm_head": 2}), False),
            "qa": (LC(r=6, lora_alpha=12, target_modules=[targets[0], targets[-1]], init_lora_weights=False,
                      fan_in_fan_out=fifo), "auto"),
        }
        self.dirs = {}
        for i, (name, (cfg, save_emb)) in enumerate(configs.items()):
            torch.manual_seed(1000 + i)
            pm = peft.get_peft_model(copy.deepcopy(self.base), cfg)
            d = root / name
            with pytest.warns(UserWarning) if save_emb == "auto" and name != "qa" else _nothing():
                pm.save_pretrained(str(d), save_embedding_layers=save_emb)
            self.dirs[name] = str(d)
        self.pm = peft_model_with(self.base, self.dirs)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, VOCAB, (3, 7), generator=g)

    def patched(self, **kw):
        return mo.patch(copy.deepcopy(self.base), adapters=self.dirs, backend="torch", **kw)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_SETUPS = {}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
    if request.param not in _SETUPS:
        _SETUPS[request.param] = LmHeadSetup(request.param, tmp_path_factory.mktemp(f"lmh_{request.param}"))
    return _SETUPS[request.param]


def test_adapters_really_target_lm_head(setup):
    from safetensors.torch import load_file

    keys = load_file(setup.dirs["code"] + "/adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_A.weight" in keys
    assert "base_model.model.lm_head.base_layer.weight" in keys  # PEFT's save_embedding_layers="auto"
    assert not any("base_layer" in k for k in load_file(setup.dirs["math"] + "/adapter_model.safetensors"))
    model = setup.patched()
    assert "Routed" in repr(model.lm_head)


@torch.no_grad()
@pytest.mark.parametrize("names", [["code", "__base__", "math"], ["math", "qa", "code"]])
def test_adapter_names_match_peft_mixed_batch(setup, names):
    ref = setup.pm(setup.ids, adapter_names=names).logits
    with torch.no_grad(), setup.pm.disable_adapter():
        base = setup.pm(setup.ids).logits
    model = setup.patched()
    with mo.routing(model, adapter_names=names):
        out = model(setup.ids).logits
    assert_logits_close(out, ref)
    assert (ref - base).abs().max() > 1e-2  # the adapters (lm_head included) change the logits
    # and lm_head's delta is part of it: the same routing without lm_head's LoRA differs
    mo.unpatch(model)
    assert torch.equal(model(setup.ids).logits, base) or torch.allclose(model(setup.ids).logits, base)


@torch.no_grad()
def test_lm_head_delta_is_applied(setup):
    """The bug: lm_head was patched but never routed. Switch PEFT's lm_head LoRA off and the results must differ."""
    names = ["code", "math", "code"]
    model = setup.patched()
    with mo.routing(model, adapter_names=names):
        out = model(setup.ids).logits
    pm = setup.pm
    head = pm.base_model.model.lm_head
    saved = head.disable_adapters
    head._disable_adapters = True
    try:
        no_head = pm(setup.ids, adapter_names=names).logits
    finally:
        head._disable_adapters = saved
    assert (out - no_head).abs().max() > 1e-2


@torch.no_grad()
def test_logits_to_keep_uses_last_positions(setup):
    names = ["math", "__base__", "code"]
    ref = setup.pm(setup.ids, adapter_names=names, logits_to_keep=2).logits
    model = setup.patched()
    with mo.routing(model, adapter_names=names):
        out = model(setup.ids, logits_to_keep=2).logits
        full = model(setup.ids).logits
    assert out.shape[1] == 2
    assert_logits_close(out, ref)
    assert_logits_close(out, full[:, -2:], name="last 2 of the full forward")


@torch.no_grad()
def test_per_token_blend_with_logits_to_keep(setup):
    """Per-token routing: lm_head on the last L positions uses exactly those positions' weights."""
    b, s = setup.ids.shape
    g = torch.Generator().manual_seed(3)
    w = torch.rand(b, s, len(ADAPTERS), generator=g)
    w[w < 0.3] = 0.0
    ref = hook_reference_logits(setup.pm, setup.ids, w, list(ADAPTERS))
    model = setup.patched()
    with mo.routing(model, adapter_weights=w):
        full = model(setup.ids).logits
        for keep in (1, 3):
            assert_logits_close(model(setup.ids, logits_to_keep=keep).logits, full[:, -keep:], name=f"keep={keep}")
    assert_logits_close(full, ref)


@torch.no_grad()
def test_dict_blend_matches_peft_cat(setup):
    blend = {"code": 0.5, "math": 0.4, "qa": 0.1}
    pm = copy.deepcopy(setup.pm)
    pm.set_adapter(peft_cat(pm, blend, "mix"))
    ref = pm(setup.ids).logits
    model = setup.patched()
    with mo.routing(model, adapter_weights=blend):
        out = model(setup.ids).logits
    assert_logits_close(out, ref)


@torch.no_grad()
def test_greedy_generate_matches_peft(setup):
    names = ["qa", "math", "code"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(setup.ids)
    ref = setup.pm.generate(input_ids=setup.ids, attention_mask=mask, adapter_names=names, **kw)
    model = setup.patched()
    with mo.routing(model, adapter_names=names):
        out = model.generate(input_ids=setup.ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)
    assert state_of(model).fwd_var.get() is None and state_of(model).top_var.get() is None


@torch.no_grad()
def test_patched_peft_model_matches_peft(setup):
    names = ["code", "__base__", "math"]
    ref = setup.pm(setup.ids, adapter_names=names).logits
    pm = mo.patch(copy.deepcopy(setup.pm), backend="torch")
    with mo.routing(pm, adapter_names=names):
        out = pm(setup.ids).logits
    assert_logits_close(out, ref)


@torch.no_grad()
def test_no_routing_is_base_and_unpatch_bit_identical(setup):
    ref = setup.base(setup.ids).logits
    model = setup.patched()
    assert torch.equal(model(setup.ids).logits, ref)
    assert set(model.state_dict()) == set(setup.base.state_dict())
    mo.unpatch(model)
    assert "Routed" not in repr(model)
    assert not model.lm_head._forward_hooks and not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(model(setup.ids).logits, ref)


@torch.no_grad()
def test_tensor_logits_to_keep_raises(setup):
    model = setup.patched()
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        with pytest.raises(RuntimeError, match="lm_head.*logits_to_keep"):
            model(setup.ids, logits_to_keep=torch.tensor([0, 3]))
        # the failed forward left no routing state behind
        assert state_of(model).fwd_var.get() is None and state_of(model).top_var.get() is None
        model(setup.ids)  # and the next forward works


@torch.no_grad()
def test_state_cleared_after_an_exception_in_forward(setup):
    model = setup.patched()

    def boom(mod, args, out):
        raise ValueError("boom")

    h = model.lm_head.register_forward_hook(boom)
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        with pytest.raises(ValueError, match="boom"):
            model(setup.ids)
    h.remove()
    assert state_of(model).fwd_var.get() is None and state_of(model).top_var.get() is None


@torch.no_grad()
def test_backbone_called_alone_clears_its_state(setup):
    model = setup.patched()
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        model.base_model(setup.ids)
    assert state_of(model).fwd_var.get() is None


def test_changed_base_weight_is_refused(setup):
    """The PEFT-saved copy of lm_head's weight must equal the model's: otherwise the adapter expects another base."""
    model = copy.deepcopy(setup.base)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    with pytest.raises(AdapterError, match="'code'.*lm_head.*differs"):
        mo.patch(model, adapters=setup.dirs, backend="torch")
    mo.patch(model, adapters={"math": setup.dirs["math"]}, backend="torch")  # saved without the base weight: fine


def test_other_module_outside_backbone_is_refused():
    torch.manual_seed(0)
    model, _ = make_model("llama")
    model.extra_head = nn.Linear(32, 32)
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "extra_head"])
    sd = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2),
        "base_model.model.extra_head.lora_A.weight": torch.randn(2, 32),
        "base_model.model.extra_head.lora_B.weight": torch.randn(32, 2),
    }
    with pytest.raises(AdapterError, match="extra_head.*outside"):
        mo.patch(model, adapters={"a": (cfg, sd)}, backend="torch")
    assert getattr(model, "_molora_state", None) is None and "Routed" not in repr(model)


@torch.no_grad()
def test_lm_head_only_adapter(setup):
    """An adapter on lm_head alone (no decoder block targeted) is routed too, logits_to_keep included."""
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lm_head"], init_lora_weights=False)
    torch.manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(setup.base), cfg, adapter_name="head").eval()
    sd = {k: v for k, v in peft.get_peft_model_state_dict(pm, adapter_name="head").items() if "lora_" in k}
    names = ["head", "__base__", "head"]
    ref = pm(setup.ids, adapter_names=names, logits_to_keep=1).logits
    model = mo.patch(copy.deepcopy(setup.base), adapters={"head": (cfg, sd)}, backend="torch")
    with mo.routing(model, adapter_names=names):
        out = model(setup.ids, logits_to_keep=1).logits
    assert_logits_close(out, ref)


@torch.no_grad()
def test_single_router_routes_lm_head_per_layer_routers_refuse_it(setup):
    """A single router's per-token routing serves lm_head too (last positions under logits_to_keep); per-layer
    routers route decoder blocks only, so lm_head raises instead of silently getting no delta."""
    torch.manual_seed(5)
    router = mo.TokenRouter(32, list(ADAPTERS), temperature=0.5)
    for p in router.parameters():
        p.normal_(0, 1.0)
    model = setup.patched(router=router, top_k=2)
    full = model(setup.ids).logits
    assert_logits_close(model(setup.ids, logits_to_keep=2).logits, full[:, -2:])
    head = model.lm_head
    saved = head.molora_lora_b.clone()
    head.molora_lora_b.zero_()
    assert (model(setup.ids).logits - full).abs().max() > 1e-3  # lm_head's delta was part of it
    head.molora_lora_b.copy_(saved)

    routers = [mo.TokenRouter(32, list(ADAPTERS)), None]
    model = setup.patched(router=routers, top_k=1)
    with pytest.raises(RuntimeError, match="lm_head.*per-layer routers"):
        model(setup.ids)
    with mo.routing(model, adapter_names=["code", "math", "qa"]):
        assert_logits_close(model(setup.ids).logits, setup.pm(setup.ids, adapter_names=["code", "math", "qa"]).logits)

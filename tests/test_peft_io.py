"""Reading PEFT adapters: the formats, the config fields, PeftModel / in-memory sources, merge, and the errors."""

import copy
import json
import pickle

import pytest
import torch

from _hf import shared_setup, assert_logits_close, make_model, peft

import molora_ops as mo
from molora_ops.peft_io import AdapterError, load_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return shared_setup("llama", tmp_path_factory)


def _save(base, cfg, path, **kw):
    torch.manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(str(path), **kw)
    return str(path)


def test_reader_honours_config_fields(llama):
    code = load_adapter("code", llama.dirs["code"])
    math_ = load_adapter("math", llama.dirs["math"])
    assert code.modules["model.layers.0.self_attn.q_proj"].scaling == 8 / 4
    q = math_.modules["model.layers.1.self_attn.q_proj"]  # rank_pattern q_proj: 2, rslora
    assert q.rank == 2 and q.scaling == pytest.approx(4 / 2**0.5)
    k = math_.modules["model.layers.0.self_attn.k_proj"]  # alpha_pattern k_proj: 16, rslora, r 8
    assert k.rank == 8 and k.scaling == pytest.approx(16 / 8**0.5)
    qa = load_adapter("qa", llama.dirs["qa"])
    assert {n.rsplit(".", 1)[1] for n in qa.modules} == {"q_proj", "down_proj"}


@torch.no_grad()
def test_regex_target_modules_and_bin_format(llama, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=r".*\.(v_proj|up_proj)", init_lora_weights=False)
    d = _save(llama.base, cfg, tmp_path / "rx", safe_serialization=False)
    assert (tmp_path / "rx" / "adapter_model.bin").exists()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama.base), d, adapter_name="rx").eval()
    model = mo.patch(copy.deepcopy(llama.base), adapters={"rx": d}, backend="torch")
    names = ["rx", "__base__", "rx"]
    with mo.routing(model, adapter_names=names):
        out = model(llama.ids).logits
    assert_logits_close(out, pm(llama.ids, adapter_names=names).logits)


@torch.no_grad()
def test_in_memory_state_and_peft_model(llama):
    from peft import get_peft_model_state_dict

    pm = llama.pm
    sources = {n: (pm.peft_config[n], get_peft_model_state_dict(pm, adapter_name=n)) for n in ("qa", "code")}
    model = mo.patch(copy.deepcopy(llama.base), adapters=sources, backend="torch")
    names = ["qa", "code", "__base__"]
    ref = pm(llama.ids, adapter_names=names).logits
    with mo.routing(model, adapter_names=names):
        assert_logits_close(model(llama.ids).logits, ref)

    pm2 = copy.deepcopy(pm)
    before = pm2(llama.ids).logits  # PEFT's active adapter
    mo.patch(pm2, backend="torch")
    assert "RoutedLinear" in repr(pm2)
    with mo.routing(pm2, adapter_names=names):
        assert_logits_close(pm2(llama.ids).logits, ref)
    assert torch.equal(pm2.get_base_model()(llama.ids).logits, llama.base(llama.ids).logits)  # no context: base
    mo.unpatch(pm2)
    assert torch.equal(pm2(llama.ids).logits, before)


@torch.no_grad()
def test_merge_cat_equals_blend_and_linear_does_not(llama):
    blend = {"math": 0.5, "code": 0.4, "qa": 0.1}  # rslora adapter first: merge fixes PEFT's scaling quirk
    pm = mo.merge(copy.deepcopy(llama.pm), blend, adapter_name="mix")
    model = llama.patched()
    with mo.routing(model, adapter_weights=blend):
        ours = model(llama.ids).logits
    assert_logits_close(ours, pm(llama.ids).logits)
    assert "`linear` is NOT" in mo.merge.__doc__ and "`cat` is" in mo.merge.__doc__


# -------------------------------------------------------------------------------------------- errors
def test_missing_directory_and_files(tmp_path, llama):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter("x", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter("x", tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(AdapterError, match="neither"):
        load_adapter("x", d)


def test_corrupt_files(tmp_path, llama):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(llama.dirs["code"], d)
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter("code", d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter("code", d)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bin_is_never_unpickled_beyond_weights_only(tmp_path, llama):
    import shutil

    d = tmp_path / "evil"
    shutil.copytree(llama.dirs["code"], d)
    (d / "adapter_model.safetensors").unlink()
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    with pytest.raises(AdapterError, match="weights_only"):
        load_adapter("code", d)


def test_dora_and_variants_are_refused(tmp_path, llama):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    d = _save(llama.base, cfg, tmp_path / "dora")
    with pytest.raises(AdapterError, match="DoRA"):
        mo.patch(copy.deepcopy(llama.base), adapters={"d": d})
    with pytest.raises(AdapterError, match="IA3|LORA"):
        load_adapter("ia3", ({"peft_type": "IA3", "r": 1, "lora_alpha": 1}, {}))
    with pytest.raises(AdapterError, match="bias"):
        load_adapter("b", ({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "lora_bias": True}, {}))


def test_shape_mismatch_names_adapter_module_and_shapes(tmp_path):
    torch.manual_seed(0)
    small, targets = make_model("llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    big = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    d = _save(big, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False), tmp_path / "big")
    with pytest.raises(AdapterError, match=r"'wide'.*o_proj.*lora_A \(4, 48\)"):
        mo.patch(small, adapters={"wide": d})
    assert "Routed" not in repr(small)  # a failed patch leaves nothing behind
    assert getattr(small, "_molora_state", None) is None


@torch.no_grad()
def test_routing_errors(llama):
    model = llama.patched()
    with pytest.raises(ValueError, match="unknown adapter name 'nope'"):
        with mo.routing(model, adapter_names=["code", "nope", "qa"]):
            pass
    with pytest.raises(ValueError, match="unknown adapter"):
        with mo.routing(model, adapter_weights={"code": 1.0, "zz": 1.0}):
            pass
    with pytest.raises(ValueError, match=r"\[N\], \[B, N\] or \[B, S, N\]"):
        with mo.routing(model, adapter_weights=torch.ones(3, 2)):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        with mo.routing(model):
            pass
    with pytest.raises(ValueError, match="batch"):
        with mo.routing(model, adapter_names=["code", "qa"]):
            model(llama.ids)
    with pytest.raises(ValueError, match="not patched"):
        with mo.routing(llama.base, adapter_names=["code"] * 3):
            pass
    with pytest.raises(ValueError, match="already patched"):
        mo.patch(model, adapters=llama.dirs)
    with pytest.raises(ValueError, match="backend"):
        mo.patch(copy.deepcopy(llama.base), adapters=llama.dirs, backend="fast")
    # after an error inside a context the model is back to the base model
    assert torch.equal(model(llama.ids).logits, llama.base(llama.ids).logits)

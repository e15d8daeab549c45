"""Reading PEFT adapters: the formats, the config fields, PeftModel / in-memory sources, merge, and the errors."""

import copy
import json
import pickle

import pytest
import torch

from _hf import shared_setup, assert_logits_close, make_model, peft

import molora_ops as mo
from molora_ops.hf.peft_io import AdapterError, load_adapter


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


@torch.no_grad()
@pytest.mark.parametrize("weight", (1.0, 0.5))
def test_merge_of_one_rslora_adapter_equals_routing_it(llama, weight):
    """PEFT turns a one-adapter "cat" into "linear" and keeps the rslora flag of the source: its merged scaling
    would be sqrt(r) (0.4 logits off here) unless merge resets it."""
    assert llama.pm.peft_config["math"].use_rslora  # the case under test
    pm = mo.merge(copy.deepcopy(llama.pm), {"math": weight}, adapter_name="one")
    model = llama.patched()
    with mo.routing(model, adapter_weights={"math": weight}):
        ours = model(llama.ids).logits
    assert_logits_close(ours, pm(llama.ids).logits)


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
    with pytest.raises(ValueError, match="unknown adapter.*'nope'"):
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


# ------------------------------------------------------------------------------ malformed configs and weights
def _state(prefix="base_model.model.", infix="", r=2, dtype=torch.float32, module="model.layers.0.self_attn.q_proj"):
    return {f"{prefix}{module}.lora_A{infix}.weight": torch.ones(r, 32, dtype=dtype),
            f"{prefix}{module}.lora_B{infix}.weight": torch.ones(32, r, dtype=dtype)}


CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def _bad_config_dir(tmp_path, llama, text: bytes):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(llama.dirs["code"], d)
    (d / "adapter_config.json").write_bytes(text)
    return d


def test_config_not_utf8_names_the_file(tmp_path, llama):
    d = _bad_config_dir(tmp_path, llama, json.dumps({"r": 4, "lora_alpha": 8}).encode() + b"\xff\xfe")
    with pytest.raises(AdapterError, match=r"adapter_config\.json is not UTF-8"):
        load_adapter("code", d)


@pytest.mark.parametrize("key, value, expected", [
    ("r", "4", "a positive int"), ("r", True, "a positive int"), ("r", 0, "a positive int"),
    ("r", 4.0, "a positive int"), ("lora_alpha", "8", "a finite number"), ("lora_alpha", True, "a finite number"),
    ("lora_alpha", float("nan"), "a finite number"), ("lora_alpha", float("inf"), "a finite number"),
    ("lora_alpha", 10**400, "a finite number"), ("rank_pattern", ["q_proj"], "a dict"),
    ("rank_pattern", {"q_proj": "2"}, "a positive int"), ("rank_pattern", {"q_proj": True}, "a positive int"),
    ("alpha_pattern", {"k_proj": float("-inf")}, "a finite number"), ("rank_pattern", {"(": 2}, "not a valid regex"),
    ("target_modules", 5, "a regex string or a list"), ("target_modules", ["q_proj", 3], "a regex string or a list"),
    ("target_modules", "model.*(q_proj", "not a valid regex"), ("use_rslora", "yes", "true or false"),
    ("bias", "some", "'none' or 'all' or 'lora_only'"), ("lora_bias", 1.5, "true or false"),
], ids=lambda v: repr(v)[:16])
def test_ill_typed_config_names_file_and_key(tmp_path, llama, key, value, expected):
    with open(f"{llama.dirs['code']}/adapter_config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg[key] = value
    d = _bad_config_dir(tmp_path, llama, json.dumps(cfg).encode())  # NaN/Infinity: JSON extensions json reads
    with pytest.raises(AdapterError, match=rf"'code'.*adapter_config\.json.*'?{key}.*{expected}"):
        load_adapter("code", d)
    with pytest.raises(AdapterError, match=rf"'code'.*<memory> config.*'?{key}.*{expected}"):
        load_adapter("code", (dict(CFG, **{key: value}), _state()))


def test_integer_and_bool_weights_name_the_key():
    for dtype in (torch.int64, torch.int8, torch.bool):
        with pytest.raises(AdapterError, match=rf"'base_model\.model\..*q_proj\.lora_A\.weight' is a {dtype}"):
            load_adapter("x", (CFG, _state(dtype=dtype)))
    state = _state()
    state["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] = torch.ones(32, dtype=torch.int32)
    with pytest.raises(AdapterError, match=r"q_proj\.base_layer\.bias' is a torch\.int32"):
        load_adapter("x", (dict(CFG, bias="lora_only"), state))


@pytest.mark.parametrize("other_prefix, other_infix", [("", ""), ("base_model.model.", ".default"), ("", ".default")])
def test_two_tensors_for_one_module_name_both_keys(other_prefix, other_infix):
    state = _state()
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    other = f"{other_prefix}model.layers.0.self_attn.q_proj.lora_A{other_infix}.weight"
    state[other] = torch.ones(2, 32)
    with pytest.raises(AdapterError, match=rf"'{a}' and '{other}' are both the lora_A of module"):
        load_adapter("x", (CFG, state))


@pytest.mark.parametrize("what", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_key(what, bad):
    """A NaN/Inf adapter weight is refused at load: a compiled patched model's dense path could not keep it from
    reaching tokens routed elsewhere (0 * NaN in one GEMM over all adapters)."""
    state = _state()
    key = f"base_model.model.model.layers.0.self_attn.q_proj.{what}.weight"
    state[key] = state[key].clone()
    state[key][0, 1] = bad
    with pytest.raises(AdapterError, match=rf"'{key}' has NaN or infinite values"):
        load_adapter("x", (CFG, state))


def test_non_finite_weights_in_a_peft_model_name_the_module(llama):
    pm = copy.deepcopy(llama.pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["code"].weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"adapter 'code': module '.*q_proj' has NaN or infinite lora_B values"):
        mo.patch(pm)


def test_keys_of_several_adapters_are_refused():
    state = {**_state(infix=".code"), **_state(infix=".math", module="model.layers.1.self_attn.q_proj")}
    with pytest.raises(AdapterError, match=r"several adapters \('.*q_proj\.lora_A\.code\.weight' and '.*lora_A\.math"):
        load_adapter("x", (CFG, state))
    one = load_adapter("x", (CFG, {**_state(infix=".default")}))  # one adapter's keys with its name: fine
    assert list(one.modules) == ["model.layers.0.self_attn.q_proj"]


def test_malformed_state():
    with pytest.raises(AdapterError, match="expected a mapping from PEFT keys to tensors, got list"):
        load_adapter("x", (CFG, [torch.ones(1)]))
    with pytest.raises(AdapterError, match="key 3 is not a string"):
        load_adapter("x", (CFG, {3: torch.ones(1)}))
    with pytest.raises(AdapterError, match="'.*lora_A\\.weight' is not a tensor"):
        load_adapter("x", (CFG, {k: v.tolist() for k, v in _state().items()}))
    with pytest.raises(AdapterError, match="lora_A has no bias"):
        load_adapter("x", (CFG, {**_state(), "model.layers.0.self_attn.q_proj.lora_A.bias": torch.ones(2)}))


def test_bias_keys_are_read():
    q = "model.layers.0.self_attn.q_proj"
    state = {**_state(), f"base_model.model.{q}.base_layer.bias": torch.ones(32),
             "base_model.model.model.norm.bias": torch.zeros(32), f"{q}.lora_B.bias": torch.full((32,), 3.0)}
    adapter = load_adapter("x", (dict(CFG, bias="all", lora_bias=True), state))
    assert set(adapter.biases) == {q, "model.norm"}
    assert adapter.biases[q][0] == f"base_model.model.{q}.base_layer.bias"
    assert torch.equal(adapter.modules[q].lora_b_bias, torch.full((32,), 3.0))
    with pytest.raises(AdapterError, match=r"'.*q_proj\.base_layer\.bias' and '.*q_proj\.bias' are both the bias"):
        load_adapter("x", (CFG, {**state, f"{q}.bias": torch.ones(32)}))
    with pytest.raises(AdapterError, match="has a lora_B bias but <memory> config says lora_bias=False"):
        load_adapter("x", (CFG, state))
    with pytest.raises(AdapterError, match="lacks a lora_B bias but <memory> config says lora_bias=True"):
        load_adapter("x", (dict(CFG, lora_bias=True), _state()))
    with pytest.raises(AdapterError, match=r"bias '.*norm\.bias' has shape \(2, 16\); expected \[out\]"):
        load_adapter("x", (CFG, {**_state(), "model.norm.bias": torch.zeros(2, 16)}))

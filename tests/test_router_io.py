"""Router.save / load_router round trips, the clear errors for malformed router.json / router.safetensors
(checked before anything is allocated), and check_router."""

import json
import time

import pytest
import torch

import molora_ops as mo
from molora_ops.hf.routers import ContextRouter, KeywordRouter, TokenRouter, check_router, load_router

NAMES = ["code", "math", "qa"]


def _routers():
    torch.manual_seed(0)
    return {
        "token": TokenRouter(8, NAMES, temperature=0.5, normalize=False),
        "mlp": TokenRouter(8, NAMES, hidden=4, layer=1),
        "context": ContextRouter(8, NAMES),
        "keyword": KeywordRouter({"code": {"def": 0.5}, "math": ["sum", "plus"]}, adapter_names=NAMES),
    }


@pytest.mark.parametrize("kind", ["token", "mlp", "context", "keyword"])
def test_round_trip(tmp_path, kind):
    router = _routers()[kind]
    router.save(str(tmp_path))
    loaded = mo.load_router(str(tmp_path))  # public at the top level
    assert type(loaded) is type(router) and loaded._config() == router._config()
    assert loaded.state_dict().keys() == router.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in router.state_dict().items())
    assert type(router).load(str(tmp_path))._config() == router._config()


def test_round_trip_keeps_dtype_and_load_checks_the_class(tmp_path):
    router = _routers()["context"].to(torch.bfloat16)
    router.save(str(tmp_path))
    loaded = load_router(str(tmp_path))
    assert loaded.gate.weight.dtype == torch.bfloat16 and torch.equal(loaded.gate.weight, router.gate.weight)
    with pytest.raises(ValueError, match="holds a ContextRouter, not a KeywordRouter"):
        KeywordRouter.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------- router.json
def _saved(tmp_path, kind="token"):
    _routers()[kind].save(str(tmp_path))
    return json.loads((tmp_path / "router.json").read_text())


def _write(tmp_path, meta):
    (tmp_path / "router.json").write_text(json.dumps(meta))


def test_router_json_not_utf8_or_not_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "router.json").write_bytes(b'{"class": "TokenRouter\xff"}')
    with pytest.raises(ValueError, match=r"router\.json is not UTF-8"):
        load_router(str(tmp_path))
    (tmp_path / "router.json").write_text('{"class": ')
    with pytest.raises(ValueError, match=r"router\.json is not valid JSON"):
        load_router(str(tmp_path))
    (tmp_path / "router.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"router\.json must hold a JSON object"):
        load_router(str(tmp_path))
    (tmp_path / "router.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no router.json"):
        load_router(str(tmp_path))


def test_router_json_class_and_keys(tmp_path):
    meta = _saved(tmp_path)
    _write(tmp_path, {**meta, "class": "Router"})
    with pytest.raises(ValueError, match=r"router\.json: 'class' must be one of .*got 'Router'"):
        load_router(str(tmp_path))
    _write(tmp_path, {"config": meta["config"]})
    with pytest.raises(ValueError, match=r"'class' must be one of .*got None"):
        load_router(str(tmp_path))
    _write(tmp_path, {**meta, "config": [1]})
    with pytest.raises(ValueError, match=r"router\.json: 'config' must be a JSON object"):
        load_router(str(tmp_path))
    cfg = dict(meta["config"])
    del cfg["hidden_size"]
    _write(tmp_path, {**meta, "config": {**cfg, "bias": True}})
    with pytest.raises(ValueError, match=r"missing \['hidden_size'\], unexpected \['bias'\]"):
        load_router(str(tmp_path))


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "8"), ("hidden_size", True), ("hidden_size", 0), ("adapter_names", []),
    ("adapter_names", ["code", "code", "qa"]), ("adapter_names", ["code", 1, "qa"]), ("adapter_names", "code"),
    ("layer", -1), ("layer", 1.0), ("temperature", 0), ("temperature", float("nan")), ("temperature", "1"),
    ("hidden", -1), ("normalize", "yes"),
])
def test_router_json_ill_typed_config(tmp_path, key, value):
    meta = _saved(tmp_path)
    meta["config"][key] = value
    _write(tmp_path, meta)
    with pytest.raises(ValueError, match=rf"router\.json: config key '{key}' must be"):
        load_router(str(tmp_path))


def test_keyword_config_checked(tmp_path):
    meta = _saved(tmp_path, "keyword")
    meta["config"]["keywords"] = {"code": {"def": "high"}}
    _write(tmp_path, meta)
    with pytest.raises(ValueError, match=r"config key 'keywords' must be"):
        load_router(str(tmp_path))


def test_sizes_are_checked_against_the_saved_tensors_before_allocating(tmp_path):
    meta = _saved(tmp_path)
    meta["config"]["hidden_size"] = 2**40  # a 161-byte router.json; allocating this gate would need 13 TB
    _write(tmp_path, meta)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"'gate\.weight' has shape \[3, 8\] but router\.json's config .* \[3, 1099511627776\]"):
        load_router(str(tmp_path))
    assert time.perf_counter() - start < 5
    meta["config"]["hidden_size"] = 8
    meta["config"]["adapter_names"] = NAMES + ["extra"]
    _write(tmp_path, meta)
    with pytest.raises(ValueError, match=r"'gate\.weight' has shape \[3, 8\] .* makes it \[4, 8\]"):
        load_router(str(tmp_path))


# ------------------------------------------------------------------------------------------ router.safetensors
def test_router_safetensors_errors(tmp_path):
    from safetensors.torch import save_file

    router = _routers()["token"]
    router.save(str(tmp_path))
    st = tmp_path / "router.safetensors"
    good = {k: v.clone() for k, v in router.state_dict().items()}
    cases = [
        ({"gate.weight": good["gate.weight"]}, r"missing tensors \['gate\.bias'\], unexpected \[\]"),
        ({**good, "gate.extra": torch.ones(1)}, r"missing tensors \[\], unexpected \['gate\.extra'\]"),
        ({**good, "gate.bias": torch.ones(4)}, r"'gate\.bias' has shape \[4\] .* makes it \[3\]"),
        ({**good, "gate.bias": torch.ones(3, dtype=torch.int64)}, r"'gate\.bias' is I64; expected a floating"),
        ({**good, "gate.weight": good["gate.weight"].index_fill(1, torch.tensor([2]), float("nan"))},
         r"router\.safetensors: TokenRouter parameter 'gate\.weight' holds NaN or inf"),
        ({**good, "gate.bias": torch.tensor([0.0, float("inf"), 0.0])}, r"parameter 'gate\.bias' holds NaN or inf"),
    ]
    for tensors, message in cases:
        save_file(tensors, str(st))
        with pytest.raises(ValueError, match=message):
            load_router(str(tmp_path))
    st.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read .*router\.safetensors: the file is corrupt"):
        load_router(str(tmp_path))
    st.unlink()
    with pytest.raises(ValueError, match=r"has no router\.safetensors, which a TokenRouter needs"):
        load_router(str(tmp_path))


# ---------------------------------------------------------------------------------------------- check_router
def test_check_router():
    routers = _routers()
    for r in routers.values():
        check_router(r, hidden_size=8, adapter_names=NAMES)
    with pytest.raises(ValueError, match="reads hidden states of size 8, but this model's are 32"):
        check_router(routers["context"], hidden_size=32)
    check_router(routers["keyword"], hidden_size=32)  # reads token ids, not hidden states
    with pytest.raises(ValueError, match=r"built for adapters \['code', 'math', 'qa'\] but the patch has"):
        check_router(routers["token"], adapter_names=["math", "code", "qa"])
    bad = routers["mlp"]
    with torch.no_grad():
        bad.gate[2].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 'gate\.2\.bias' holds NaN or inf"):
        check_router(bad)
    with pytest.raises(TypeError, match="router must be an nn.Module"):
        check_router("router")


def test_save_refuses_what_load_would(tmp_path):
    bad = _routers()["token"]
    with torch.no_grad():
        bad.gate.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        bad.save(str(tmp_path / "a"))
    kw = KeywordRouter({"code": {"def": torch.tensor(0.5)}}, adapter_names=NAMES)
    with pytest.raises(ValueError, match="config is not plain JSON"):
        kw.save(str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

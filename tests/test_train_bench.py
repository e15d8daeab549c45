"""``bench --suite train`` at tiny sizes: it runs from the CLI, every provider's loss and gradients agree with
ours (a wrong provider is reported as wrong), the targets are evaluated right. No timing is asserted; results go
to tmp_path."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from molora_ops.benchmarking import train_suite  # noqa: E402
from molora_ops.cli import main  # noqa: E402


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cli_smoke(tmp_path, restore_threads):
    out = tmp_path / "train.jsonl"
    assert main(["bench", "--suite", "train", "--grid", "smoke", "--device", "cpu", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["kind"], r["provider"]) for r in records} == {
        (k, p) for k in ("layer", "delta", "model") for p in train_suite.PROVIDERS}
    for r in records:
        assert r["status"] == "ok" and r["max_rel_err_vs_ours"] <= 1e-4, r
        assert r["time"]["median_ms"] > 0 and r["env"]["torch_threads"] == 1


@pytest.mark.parametrize("point_type", [train_suite.LayerPoint, train_suite.DeltaPoint])
@pytest.mark.parametrize("t", [0, 1, 9])
def test_layer_providers_agree_on_edge_sizes(t, point_type):
    """T = 0 and 1 and an odd size, with and without the base projection; every gradient (x, A, B, weights) of
    dense and the PEFT loop equals ours."""
    point = point_type(hidden=23, tokens=t, adapters=4, rank=3)
    fns = train_suite.layer_providers(point, torch.device("cpu"), seed=t)
    ref = fns["ours"]()
    assert len(ref) == 5
    for name in ("dense", "peft-loop"):
        assert train_suite._check(ref, fns[name]()) <= 1e-5, name


def test_a_wrong_provider_is_caught():
    point = train_suite.LayerPoint(hidden=16, tokens=7, adapters=3, rank=2)
    fns = train_suite.layer_providers(point, torch.device("cpu"))
    ref = fns["ours"]()
    broken = tuple(g * 1.01 for g in fns["dense"]())
    assert train_suite._check(ref, broken) > 1e-4


def test_check_targets():
    def rec(h, x, kind="layer"):
        return {"provider": "ours", "kind": kind, "config": {"hidden": h, "adapters": 8, "top_k": 2},
                "speedup_vs": {"dense": x}}
    got = train_suite.check_targets([rec(512, 1.6), rec(1024, 1.9), rec(256, 9.0), rec(1024, 2.1, "delta"),
                                     rec(512, 9.0, "model")])
    assert got == {"layer h=512": (1.6, 1.5, True), "layer h=1024": (1.9, 2.0, False),
                   "delta h=1024": (2.1, 2.0, True)}


def test_delta_point_has_no_base_projection():
    """A delta point's output is the adapter term alone: the layer point's minus the base projection."""
    kw = dict(hidden=16, tokens=7, adapters=3, rank=2)
    layer = train_suite.layer_providers(train_suite.LayerPoint(**kw), torch.device("cpu"))["dense"]()
    delta = train_suite.layer_providers(train_suite.DeltaPoint(**kw), torch.device("cpu"))["ours"]()
    x, w, *_, dy = train_suite._layer_setup(train_suite.LayerPoint(**kw), torch.device("cpu"), 0)
    assert torch.allclose(delta[0], layer[0] - x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(delta[1], layer[1] - dy @ w, rtol=1e-5, atol=1e-5)

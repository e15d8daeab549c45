"""The end-to-end demo (`python -m molora_ops demo --quick`): the JSON's structure, the artifacts it saves in
PEFT format, the direction of the seeds' claims on held-out text, and the --model path on those artifacts."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

import molora_ops  # noqa: E402

if not hasattr(molora_ops, "patch"):
    pytest.skip("molora_ops has no patch API yet", allow_module_level=True)

from molora_ops.cli import main  # noqa: E402

DOMAINS = ("code", "math", "prose")


def _run(argv):
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the demo picks its own thread count; leave the session's alone


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    _run(["demo", "--quick", "--device", "cpu", "--seed", "0", "--out", str(out), "--json", str(out / "r.json")])
    return out, json.loads((out / "r.json").read_text())


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_json_structure(quick):
    _, r = quick
    acc = r["router_accuracy"]
    assert _finite(acc["sequence"]) and 0 <= acc["sequence"] <= 1
    assert _finite(acc["token"]) and 0 <= acc["token"] <= 1
    assert set(r["loss"]) == set(DOMAINS)
    expected = {"base", "sequential", "routed", *(f"adapter:{d}" for d in DOMAINS)}
    for row in r["loss"].values():
        assert set(row) == expected
        assert all(_finite(v) for v in row.values())
    timing = r["timing"]
    for key in ("base", "peft_mixed_batch", "molora_adapter_names", "molora_routed_topk"):
        assert timing[key]["median_ms"] > 0
    assert _finite(r["seconds"]) and r["seconds"] > 0
    assert r["peft_parity_max_abs_logit_diff"] < 1e-3  # our kernels compute what PEFT computes


def test_artifacts(quick):
    out, r = quick
    for name in (*DOMAINS, "sequential"):
        assert (out / "adapters" / name / "adapter_config.json").is_file()
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    assert (out / "router" / "router.json").is_file()
    png = out / "routing_heatmap.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gens = r["generations"]
    assert gens[0]["prompt"] == "Write Python code to solve quadratic equations"
    assert len(gens[0]["top"]) == len(gens[0]["tokens"]) > len(gens[0]["prompt"].split())  # prompt + generated


def test_claims_direction(quick):
    _, r = quick
    loss = r["loss"]
    assert r["router_accuracy"]["sequence"] >= 0.9
    for d in DOMAINS:
        row = loss[d]
        assert row["routed"] < row["base"], d  # the adapters help on held-out text
        assert row[f"adapter:{d}"] == min(row[f"adapter:{e}"] for e in DOMAINS), d  # each adapter specialises
        assert row["routed"] < 1.1 * row[f"adapter:{d}"], d  # routing recovers (about) the right adapter
    earlier = r["sequential_order"][:-1]
    assert any(loss[d]["sequential"] > loss[d]["routed"] for d in earlier)  # one LoRA in sequence forgets


def test_user_model_path(quick, tmp_path):
    """--model/--adapter/--router on the artifacts the demo saved reproduces the demo's routed numbers."""
    out, r = quick
    argv = ["demo", "--quick", "--device", "cpu", "--seed", "0", "--out", str(tmp_path),
            "--json", str(tmp_path / "r.json"), "--model", str(out / "base"), "--router", str(out / "router")]
    for d in DOMAINS:
        argv += ["--adapter", f"{d}=" + str(out / "adapters" / d)]
    _run(argv)
    mine = json.loads((tmp_path / "r.json").read_text())
    assert set(mine["loss"]) == set(DOMAINS)
    for d in DOMAINS:
        for key in ("base", "routed", f"adapter:{d}"):
            assert mine["loss"][d][key] == pytest.approx(r["loss"][d][key], rel=1e-4), (d, key)
    assert mine["router_accuracy"]["sequence"] == pytest.approx(r["router_accuracy"]["sequence"])

"""CPU smoke of both benchmarks: they run end to end from the CLI, every provider agrees with the reference
(ops) or with the float32 dense truth (e2e), a wrong one is reported as wrong, the issue's targets are
evaluated right, and the report renders. No timing is asserted. Results go to tmp_path, never to bench/results."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from molora_ops.benchmarking import e2e_suite, ops_suite, results
from molora_ops.benchmarking.baselines import BASELINES, Provider
from molora_ops.benchmarking.timing import TimingConfig
from molora_ops.cli import main


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch: steadier and faster on a small shared CI machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ops_records(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench") / "ops.jsonl"
    assert main(["bench", "--suite", "ops", "--grid", "smoke", "--quick", "--out", str(out)]) == 0
    return results.load([out])


@pytest.fixture(scope="module")
def e2e_records(tmp_path_factory, one_thread, monkeypatch_module):
    # The smoke model, compiled with dynamo alone (backend "eager": no inductor build) and without dynamo's
    # slow explain, keeps this inside a few seconds while still running every variant, mode and phase.
    small = dataclasses.replace(e2e_suite.grid("smoke"), decode_batches=(2,), count_graph_breaks=False)
    monkeypatch_module.setattr(e2e_suite, "grid", lambda name: small)
    out = tmp_path_factory.mktemp("bench") / "e2e.jsonl"
    assert main(["bench", "--suite", "e2e", "--grid", "smoke", "--quick", "--compile-backend", "eager",
                 "--out", str(out)]) == 0
    return results.load([out])


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_ops_smoke_providers_agree_with_reference(ops_records):
    assert ops_records and all(r["suite"] == "ops" and r["grid"] == "smoke" for r in ops_records)
    bad = [(r["provider"], r["config"], r.get("reason")) for r in ops_records if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    timed = {r["provider"] for r in ops_records if r["status"] == "ok"}
    assert set(BASELINES) | {"torch"} <= timed
    for r in ops_records:
        if r["status"] == "ok":
            assert r["max_rel_err"] <= r["tol"]
            assert {"median_ms", "p20_ms", "p80_ms"} <= set(r["time"])
            assert r["bytes"] > 0 and r["flops"] >= 0 and r["copy_gbps"] > 0 and r["base_gemm"]["median_ms"] > 0
            assert r["env"]["device"] and r["env"]["torch"] and r["env"]["timestamp"]
    # triton is never timed on CPU (the interpreter is far too slow); cuda needs a GPU
    for r in ops_records:
        if r["provider"] in ("triton", "cuda"):
            assert r["status"] == "skipped"


def test_e2e_smoke_records(e2e_records):
    """One record per (variant, mode, point); every eager variant verified against the float32 dense truth and
    timed; a compiled patched model is either timed with 0 graph breaks or recorded with its breaks, no time."""
    cfg = e2e_suite.grid("smoke")  # the fixture's grid
    pts = {(p.phase, p.batch, p.seq, p.threads) for p in e2e_suite.points(cfg)}
    expected = {(v, "eager") for v in e2e_suite.VARIANTS} | {(v, "compiled") for v in e2e_suite.COMPILED_VARIANTS}
    got = {(r["variant"], r["mode"], r["phase"], r["batch"], r["seq"], r["threads"]) for r in e2e_records}
    assert got == {(v, m, *p) for v, m in expected for p in pts} and len(e2e_records) == len(got)
    run_ids = {r["run_id"] for r in e2e_records}
    assert len(run_ids) == 1
    for r in e2e_records:
        assert r["schema"] == e2e_suite.SCHEMA and r["suite"] == "e2e" and r["grid"] == "smoke"
        assert r["threads"] == (cfg.prefill_threads if r["phase"] == "prefill" else cfg.decode_threads)
        assert r["env"]["device"] and r["env"]["torch"] and r["env"]["transformers"] and r["env"]["peft"]
        assert "git_sha" in r["env"] and r["env"]["timestamp"]
        if r["mode"] == "eager" or r["variant"] == "base":
            assert r["status"] == "ok", (r["variant"], r["mode"], r.get("reason"))
        if r["status"] == "ok":
            t = r["time"]
            assert t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] and t["n"] >= 3
            assert r["max_rel_err"] <= r["tol"] and r["vs_base"] > 0 and r["tokens_per_s"] > 0
            assert r["vs_base"] == 1.0 if r["variant"] == "base" else True
        if r["mode"] == "compiled":
            assert r["status"] in ("ok", "graph_breaks"), r.get("reason")
            if r["status"] == "ok":
                # HF's static cache: no recompile from one call (decode step) to the next
                assert r["graph_breaks"] == 0 and r["eager_over_compiled"] > 0 and r["recompiles_while_timing"] == 0
            else:
                assert "time" not in r and r["reason"]


def test_e2e_wrong_variant_is_reported_not_timed(monkeypatch, one_thread):
    """A variant routed to the wrong adapters (names rotated by one) is caught at every point, the others pass."""
    real = e2e_suite.build_variants

    def rotated(wanted, base, peft_model, names, *args):
        built = real(wanted, base, peft_model, names, *args)
        good = built["ours-names"].route
        built["ours-names"].route = lambda b, st, ln: {"adapter_names": [names[(names.index(n) + 1) % len(names)]
                                                                         for n in good(b, st, ln)["adapter_names"]]}
        return built

    monkeypatch.setattr(e2e_suite, "build_variants", rotated)
    cfg = dataclasses.replace(e2e_suite.grid("smoke"), modes=("eager",))
    recs = e2e_suite.run_e2e(cfg, torch.device("cpu"), variants=["base", "ours-names", "peft-mixed"],
                             timing=TimingConfig.quick())
    for r in recs:
        if r["variant"] == "ours-names":
            assert r["status"] == "wrong" and "time" not in r and "float32 dense truth" in r["reason"]
        else:
            assert r["status"] == "ok", r.get("reason")


def _fake_run(ratios: dict) -> list[dict]:
    """Records of one eager+compiled run where ratios[(variant, mode, phase)] is time / base at every point."""
    recs = []
    for phase, batch, seq in (("prefill", 4, 256), ("decode", 1, 1), ("decode", 8, 1)):
        base = {"eager": 10.0, "compiled": 6.0}
        for (variant, mode, ph), ratio in ratios.items():
            if ph != phase:
                continue
            ms = base[mode] * ratio
            rec = {"variant": variant, "mode": mode, "phase": phase, "batch": batch, "seq": seq, "threads": 1,
                   "status": "ok", "time": {"median_ms": ms}, "vs_base": ratio}
            if mode == "compiled":
                rec["eager_over_compiled"] = base["eager"] * ratios[(variant, "eager", phase)] / ms
            recs.append(rec)
    return recs


def test_targets_pass_and_miss():
    from molora_ops.benchmarking.report import e2e_targets

    good = {("base", m, ph): 1.0 for m in ("eager", "compiled") for ph in ("prefill", "decode")}
    good |= {("ours-topk", "eager", "prefill"): 1.2, ("ours-names", "eager", "prefill"): 1.1,
             ("ours-router", "eager", "prefill"): 1.2, ("peft-mixed", "eager", "prefill"): 1.5,
             ("dense", "eager", "prefill"): 2.0}
    for v in ("ours-topk", "ours-router", "ours-names"):
        good |= {(v, "eager", "decode"): 1.25, (v, "compiled", "prefill"): 1.1, (v, "compiled", "decode"): 1.2}
    good |= {("peft-mixed", "eager", "decode"): 2.0, ("dense", "eager", "decode"): 1.3}
    rows = e2e_targets(_fake_run(good))
    assert len(rows) == 13 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]

    slow = {**good, ("ours-names", "eager", "prefill"): 1.13, ("dense", "eager", "decode"): 1.2,
            ("ours-router", "compiled", "decode"): 1.3, ("ours-topk", "compiled", "decode"): 1.9}
    missed = {r["measure"] for r in e2e_targets(_fake_run(slow)) if not r["ok"]}
    assert missed == {"prefill 4×256, adapter_names (ours-names) / base",
                      "dense time / ours, every point and ours variant (eager)",
                      "compiled ours-router / compiled base", "compiled ours-topk / compiled base",
                      "decode, ours-topk: eager time / compiled time"}
    broken = [dict(r, status="graph_breaks", graph_breaks=25) if r["mode"] == "compiled" and r["variant"] != "base"
              else r for r in _fake_run(good)]
    rows = {r["measure"]: r for r in e2e_targets(broken)}
    assert not rows["compiled ours-topk / compiled base"]["ok"]
    assert "25 graph breaks" in rows["compiled ours-topk / compiled base"]["measured"]


def test_report_renders(ops_records, e2e_records, tmp_path):
    from molora_ops.benchmarking.report import render

    written = render(ops_records + e2e_records, tmp_path, readme_root=tmp_path)
    text = written["full"].read_text()
    device = ops_records[0]["env"]["device"]
    assert device in text and "GPU numbers are still to be taken" in text
    assert "| T | base GEMM |" in text and "| point | threads |" in text and "| measure | target |" in text
    assert "Torch threads per phase: prefill 2, decode 1" in text and "*compiled*:" in text
    assert device in written["readme"].read_text()
    assert written["images"] and all(p.stat().st_size > 1000 for p in written["images"])


def test_a_wrong_provider_is_caught_not_timed(monkeypatch):
    zeros = Provider("zeros", "baseline", True, lambda p: (lambda: torch.zeros(p.x.shape[0], p.lora_b.shape[1])),
                     lambda cfg: 0)
    monkeypatch.setattr("molora_ops.benchmarking.baselines.BASELINE_PROVIDERS", {"zeros": zeros})
    cfg = ops_suite.grid("smoke")[0]
    recs = ops_suite.run_ops([cfg], torch.device("cpu"), providers=["zeros", "torch"], timing=TimingConfig.quick())
    by = {r["provider"]: r for r in recs}
    assert by["zeros"]["status"] == "wrong" and "time" not in by["zeros"]
    assert by["torch"]["status"] == "ok"


def test_triton_provider_checked_under_interpreter():
    """On CPU triton is never timed, but its provider is checked against the reference under the interpreter
    (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    from molora_ops.benchmarking.baselines import backend_status

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU)")
    if not backend_status()["triton"]["available"]:
        pytest.skip(backend_status()["triton"]["reason"])
    configs = ops_suite.grid("smoke")[:2]
    recs = ops_suite.run_ops(configs, torch.device("cpu"), providers=["triton"], verify_only=True)
    assert [r["status"] for r in recs] == ["verified"] * len(configs), [r.get("reason") for r in recs]

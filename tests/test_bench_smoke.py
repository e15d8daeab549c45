"""CPU smoke of both benchmarks: they run end to end from the CLI, every provider agrees with the reference,
and the report renders. No timing is asserted. Results go to tmp_path, never to bench/results."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import molora_ops
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
    # The smoke model at one batch size keeps this well inside the CI budget.
    small = dataclasses.replace(e2e_suite.grid("smoke"), batches=(2,))
    monkeypatch_module.setattr(e2e_suite, "grid", lambda name: small)
    out = tmp_path_factory.mktemp("bench") / "e2e.jsonl"
    assert main(["bench", "--suite", "e2e", "--grid", "smoke", "--quick", "--out", str(out)]) == 0
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


def test_e2e_smoke_variants_agree(e2e_records):
    status = {(r["variant"], r["phase"]): r for r in e2e_records}
    for v in ("base", "peft-mixed", "dense"):
        for ph in ("prefill", "decode"):
            assert status[(v, ph)]["status"] == "ok", status[(v, ph)].get("reason")
    for v in ("ours-topk", "ours-names"):
        expected = "ok" if hasattr(molora_ops, "patch") else "skipped"
        assert status[(v, "decode")]["status"] == expected, status[(v, "decode")].get("reason")
    for r in e2e_records:
        if r["status"] == "ok" and r["variant"] != "base":
            assert r["max_rel_err"] <= r["tol"]


def test_report_renders(ops_records, e2e_records, tmp_path):
    from molora_ops.benchmarking.report import render

    written = render(ops_records + e2e_records, tmp_path, readme_root=tmp_path)
    text = written["full"].read_text()
    device = ops_records[0]["env"]["device"]
    assert device in text and "GPU numbers are still to be taken" in text
    assert "| T | base GEMM |" in text and "| phase | batch |" in text
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

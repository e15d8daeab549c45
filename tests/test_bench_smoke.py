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


# ------------------------------------------------------------------------------- plans outside the timer
@pytest.fixture
def plan_builds(monkeypatch):
    """How many routing plans have been built (every build_plan, whoever calls it, groups the pairs here)."""
    from molora_ops import plan

    count = {"n": 0}
    real = plan._group_by_adapter

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "_group_by_adapter", counting)
    return count


def _ours_names() -> list[str]:
    """Every provider of ours this machine can run, forced paths included (triton under the interpreter)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    chosen, _ = ops_suite.select_providers(torch.device("cpu"), None, interpreted=interpreted)
    ours = [n for n, p in chosen.items() if p.kind == "ours"]
    forced, _ = ops_suite.forced_providers(chosen)
    return ours + [n for n in forced if not n.endswith(ops_suite.RANKED_SUFFIX)]


def test_timed_calls_build_no_plan(plan_builds):
    """prepare builds the plan (untimed); the timed call reuses it. A call without one would build its own,
    which the counter sees (checked first, so the test can fail)."""
    import molora_ops

    cfg = ops_suite.OpsConfig(T=9, N=5, K=2, R=8, H_in=40, H_out=24, dtype="float32", empty_frac=0.2)
    p = ops_suite.make_problem(cfg, torch.device("cpu"))
    molora_ops.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling, backend="torch")
    assert plan_builds["n"] == 1, "the counter sees a plan built inside a call"
    names = _ours_names()
    assert "torch" in names
    chosen, _ = ops_suite.select_providers(torch.device("cpu"), names, interpreted=True)
    for name, prov in chosen.items():
        fn = prov.prepare(p)
        plan_builds["n"] = 0
        assert ops_suite.verify(fn, p, ops_suite.check_rows(p)) < 1e-5, name
        assert plan_builds["n"] == 0, f"{name}'s timed call built a routing plan"


def test_plan_build_is_timed_apart(ops_records):
    for r in ops_records:
        if r["status"] == "ok":
            assert r["plan_build"]["median_ms"] > 0


# --------------------------------------------------------------------------------------- cache pools
def test_pool_members_exceed_the_cache():
    from molora_ops.benchmarking.timing import POOL_MARGIN, POOL_MAX_MEMBERS, pool_members

    cache = 60 << 20
    for touched in (1, 4096, 540_000, 9 << 20, 59 << 20):
        n = pool_members(touched, cache, member_bytes=touched, budget_bytes=1 << 40)
        if n < POOL_MAX_MEMBERS:  # between two uses of one copy, the others touched more than the cache
            assert (n - 1) * touched >= POOL_MARGIN * cache > cache and (n - 2) * touched < POOL_MARGIN * cache
    assert pool_members(2 * cache, cache, member_bytes=1, budget_bytes=1) == 1, "one call alone evicts the cache"
    assert pool_members(1 << 20, cache, member_bytes=1 << 30, budget_bytes=3 << 30) == 3, "capped by the budget"


def test_cache_record_methods():
    from molora_ops.benchmarking.timing import cache_record

    cache = (1000, "test")
    assert cache_record("l2_flush", 10, cache, 1)["method"] == "l2_flush"
    assert cache_record("warm", 2000, cache, 1)["method"] == "exceeds_cache"
    rec = cache_record("cycled", 100, cache, 21)
    assert rec["method"] == "pool" and rec["cold"] and rec["pool_touched_bytes"] == 2100 > rec["cache_bytes"]
    assert cache_record("cycled", 100, cache, 20)["method"] == "pool-partial"
    assert not cache_record("warm", 100, cache, 1)["cold"]


def test_cpu_cache_size_from_sysfs(tmp_path):
    from molora_ops.benchmarking.timing import DEFAULT_CPU_CACHE_BYTES, _cpu_cache_bytes

    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "64M"), (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert _cpu_cache_bytes(tmp_path) == (32 << 20, "sysfs L3")
    assert _cpu_cache_bytes(tmp_path / "none") == (DEFAULT_CPU_CACHE_BYTES, "default")


def test_time_pool_cycles_every_member_on_cpu():
    from molora_ops.benchmarking.timing import time_pool

    calls = [0] * 5
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(5)]
    t = time_pool(fns, torch.device("cpu"), TimingConfig(warmup=0, min_reps=10, max_reps=10, min_time_s=0))
    assert calls == [2] * 5 and t.cache == "cycled"
    assert time_pool(fns[:1], torch.device("cpu"), TimingConfig.quick()).cache == "warm"


def test_time_pool_on_cuda_graphs_divides_by_members_and_do_bench_flushes(monkeypatch):
    """The CUDA branches, with triton's timers replaced: a graph captures one call of every member and its time
    is per call; do_bench (which flushes L2 itself) times the first member alone."""
    import triton.testing as tt

    from molora_ops.benchmarking.timing import time_pool

    seen = []
    monkeypatch.setattr(tt, "do_bench_cudagraph", lambda fn, **kw: (fn(), [4.0, 2.0, 8.0])[1])
    monkeypatch.setattr(tt, "do_bench", lambda fn, **kw: (fn(), [1.0, 0.5, 2.0])[1])
    fns = [lambda i=i: seen.append(i) for i in range(4)]
    t = time_pool(fns, torch.device("cuda"), cuda_graph=True)
    assert seen == [0, 1, 2, 3] and (t.median_ms, t.p20_ms, t.p80_ms) == (1.0, 0.5, 2.0)
    assert t.timer == "cuda_graph" and t.cache == "cycled"
    seen.clear()
    t = time_pool(fns, torch.device("cuda"), cuda_graph=False)
    assert seen == [0] and t.timer == "do_bench" and t.cache == "l2_flush"


def test_rows_record_a_pool_larger_than_the_cache(monkeypatch):
    """With a (pretend) 64 KiB cache every timed row cycles through copies that together exceed it, each copy
    holding other data (the last one is checked against its own reference), and says so in its `cache`."""
    monkeypatch.setattr(ops_suite, "cache_bytes", lambda device: (64 << 10, "test"))
    made = []
    real = ops_suite.pool_member
    monkeypatch.setattr(ops_suite, "pool_member", lambda p, i: made.append(i) or real(p, i))
    cfg = ops_suite.OpsConfig(T=5, N=6, K=2, R=8, H_in=72, H_out=40, dtype="float32")
    recs = ops_suite.run_ops([cfg], torch.device("cpu"), providers=["torch", "dense"], timing=TimingConfig.quick())
    assert [r["status"] for r in recs] == ["ok", "ok"], [r.get("reason") for r in recs]
    for r in recs + [{"cache": recs[0]["base_gemm"]["cache"]}]:
        c = r["cache"]
        assert c["method"] == "pool" and c["cold"] and c["pool_members"] > 1
        assert c["pool_touched_bytes"] - c["touched_bytes"] >= 2 * c["cache_bytes"] > c["cache_bytes"] == 64 << 10
    assert made == list(range(1, recs[0]["cache"]["pool_members"])), "copies built once per point, shared"


def test_pool_members_hold_other_data():
    from molora_ops.benchmarking.problems import pool_member

    cfg = ops_suite.OpsConfig(T=6, N=4, K=2, R=8, H_in=32, H_out=16, dtype="float32", ranks=(2, 8, 5))
    p = ops_suite.make_problem(cfg, torch.device("cpu"))
    m = pool_member(p, 1)
    assert m.x.data_ptr() != p.x.data_ptr() and m.lora_a.data_ptr() != p.lora_a.data_ptr()
    assert not torch.equal(m.lora_a, p.lora_a) and torch.equal(m.ranks, p.ranks.roll(1, 0))
    rows = ops_suite.check_rows(m)
    assert ops_suite.verify(ops_suite.prepare_ours("torch")(m), m, rows) < 1e-5


def test_mixed_ranks_problem_is_zero_padded_and_costed_at_real_ranks():
    cfg = ops_suite.OpsConfig(T=4, N=3, K=1, R=8, H_in=16, H_out=8, dtype="float32", ranks=(2, 8, 0),
                              pattern="distinct")
    p = ops_suite.make_problem(cfg, torch.device("cpu"))
    assert p.ranks.tolist() == [2, 8, 0]
    assert p.lora_a[0, 2:].abs().sum() == 0 and p.lora_b[0, :, 2:].abs().sum() == 0 and p.lora_a[2].abs().sum() == 0
    assert p.lora_a[0, :2].abs().sum() > 0 and p.lora_a[1].abs().min() > 0
    cost = ops_suite.cost_model(cfg, p.topk_ids)  # tokens 0..3 -> adapters 0, 1, 2, 0
    assert cost["flops"] == 2 * (2 + 8 + 0 + 2) * (16 + 8)
    with pytest.raises(ValueError, match="ranks"):
        ops_suite.OpsConfig(T=1, N=2, R=4, ranks=(5,)).adapter_ranks()


# ------------------------------------------------------------------------------------ forced-path table
def test_forced_table_names_the_fastest_path_per_point():
    from molora_ops.benchmarking.report import forced_table

    def rec(provider, T, ms, ranks=()):
        return {"provider": provider, "status": "ok", "time": {"median_ms": ms, "p20_ms": ms, "p80_ms": ms},
                "config": {"T": T, "R": 64 if ranks else 16, "ranks": list(ranks), "sweeps": ["T"]}}

    run = [rec("triton", 1, 0.02), rec("triton:fused", 1, 0.01), rec("cuda", 1, 0.015), rec("cuda:fused", 1, 0.03),
           rec("triton", 256, 0.05), rec("triton:grouped", 256, 0.04), rec("gather-bmm", 256, 0.01),
           rec("triton", 256, 0.06, (8, 16, 64)), rec("triton+ranks", 256, 0.03, (8, 16, 64))]
    lines = forced_table(run).splitlines()
    assert lines[0].split(" | ")[-2:] == ["fastest triton", "fastest cuda |"]
    assert lines[2].startswith("| T=1 |") and lines[2].endswith("| triton:fused | cuda |") and "**0.010**" in lines[2]
    assert lines[3].startswith("| T=256 |") and "triton:grouped | – |" in lines[3] and "gather-bmm" not in lines[3]
    assert lines[4].startswith("| T=256, ranks 8/16/64 (R=64) |") and "triton+ranks" in lines[4]
    assert forced_table([rec("triton", 1, 0.02)]) is None

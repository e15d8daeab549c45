"""bench/gpu_check.sh quick without a GPU: the dry run's steps, order and time budget, the step runner (driven
by a stub interpreter that runs nothing), and the benchmark pieces it calls (the gpu-quick grids, the
forced-path providers, the e2e @backend variants)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molora_ops.benchmarking import e2e_suite, ops_suite
from molora_ops.benchmarking.timing import TimingConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
ORDER = ["env", "build", "compile", "selfcheck", "tests", "memcheck", "racecheck", "bench_ops", "bench_e2e",
         "bench_train"]
LEASE_S = 480  # one device command may run 600 s; the machine's start and the transfers need the rest


def _bash(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _dry_steps(out: Path) -> list[dict]:
    res = _bash("quick", "--dry-run", env={"OUT": str(out)})
    assert res.returncode == 0, res.stderr
    steps = []
    for line in res.stdout.splitlines():
        if line.startswith("step "):
            name, *fields = line.split()[1:]
            steps.append({"name": name, **dict(f.split("=", 1) for f in fields)})
    total = [line for line in res.stdout.splitlines() if line.startswith("total ")]
    assert total == [f"total timeout={sum(int(s['timeout'].rstrip('s')) for s in steps)}s"]
    return steps


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_fits_the_lease_in_order_and_writes_under_out(tmp_path):
    out = tmp_path / "out"
    steps = _dry_steps(out)
    assert [s["name"] for s in steps] == ORDER, "correctness first: build, checks, tests, sanitizers, benchmarks"
    limits = [int(s["timeout"].rstrip("s")) for s in steps]
    assert all(t > 0 for t in limits) and sum(limits) <= LEASE_S
    files = {Path(s[k]) for s in steps for k in ("log", "results") if k in s}
    assert all(f.parent == out for f in files), files
    assert len(files | {out / "summary.txt"}) <= 8, "the device tool brings back at most 8 files"
    assert {Path(s["results"]).name for s in steps if "results" in s} == {"ops-gpu.jsonl", "e2e-gpu.jsonl",
                                                                             "train-gpu.jsonl"}
    assert not out.exists(), "a dry run creates nothing"


STUB = """#!/usr/bin/env bash
# A stand-in for python3: records its arguments, writes the --out file of a benchmark, fails where asked.
echo "stub: $*"
case "$*" in
  *"$STUB_FAIL"*) [ -n "$STUB_FAIL" ] && exit 1 ;;
esac
case "$*" in *" bench "*) echo '{}' > "${@: -1}" ;; esac
exit 0
"""


def _stub_run(tmp_path, fail: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {"OUT": str(out), "PYTHON": str(stub), "STUB_FAIL": fail, "PATH": "/usr/bin:/bin"}  # no nvcc, no sanitizer
    return _bash("quick", env=env), out


def test_quick_runs_every_step_and_logs_into_out(tmp_path):
    res, out = _stub_run(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.txt", "build.log", "check.log", "tests.log", "bench.log", "ops-gpu.jsonl",
                            "e2e-gpu.jsonl", "train-gpu.jsonl"])
    summary = (out / "summary.txt").read_text()
    for name in ORDER:
        assert f"=== {name}" in summary
    assert "memcheck: skipped (compute-sanitizer not found)" in summary
    assert "pytest -p no:cacheprovider -m gpu" in (out / "tests.log").read_text()
    assert "molora_ops.kernels.compile_check --arch 90" in (out / "build.log").read_text()
    bench = (out / "bench.log").read_text()
    assert "cuda:segmented" in bench and "ours-topk@cuda" in bench


def test_failed_cuda_build_skips_the_cuda_steps_only(tmp_path):
    res, out = _stub_run(tmp_path, fail='backends()["cuda"]')
    assert res.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "build: rc=1" in summary
    assert "memcheck: skipped (the CUDA build failed)" in summary and "racecheck: skipped" in summary
    assert "selfcheck: rc=0" in summary and "compile: rc=0" in summary and "bench_e2e: rc=0" in summary, \
        "the Triton steps still run"
    assert "--ignore=tests/test_cuda_backend.py" in (out / "tests.log").read_text()
    providers = [line.split("--providers ")[1].split()[0] for line in (out / "bench.log").read_text().splitlines()
                 if "--providers " in line]
    assert len(providers) == 2 and "triton:fused" in providers[0] and "ours-topk@triton" in providers[1]
    assert not any("cuda" in p for p in providers), providers


# ------------------------------------------------------------------------------------------------ grids
def test_gpu_quick_grids():
    ops = ops_suite.grid("gpu-quick")
    assert [(c.T, c.R, c.ranks) for c in ops] == [(1, 16, ()), (8, 16, ()), (64, 16, ()), (256, 16, ()), (4096, 16, ()),
                                                  (1, 64, (8, 16, 64)), (256, 64, (8, 16, 64))]
    assert {(c.dtype, c.H_in, c.H_out, c.N, c.K) for c in ops} == {("bfloat16", 4096, 4096, 32, 2)}
    cfg = e2e_suite.grid("gpu-quick")
    assert (cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads, cfg.layers) == (4096, 14336, 32, 8, 2)
    assert [(p.phase, p.batch) for p in e2e_suite.points(cfg)] == [("prefill", 8), ("decode", 1), ("decode", 8)]
    assert cfg.modes == ("eager",) and cfg.dtype == "bfloat16"


# ----------------------------------------------------------------------------------- forced providers
@pytest.fixture
def launches(monkeypatch):
    """The names of the triton kernel launches made, in order."""
    from molora_ops.impl import triton_backend as tb

    kernels, calls = tb._kernels(), []
    for fn in ("launch_fused", "launch_shrink", "launch_shrink_reduce", "launch_expand", "launch_expand_dot",
               "launch_expand_grouped"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _real=real, _fn=fn, **kw: (calls.append(_fn), _real(*a, **kw))[1])
    return calls


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the triton providers on CPU tensors")
@pytest.mark.parametrize("name,made,not_made", [
    ("triton:fused", {"launch_fused"}, {"launch_shrink", "launch_expand", "launch_expand_dot"}),
    ("triton:dot", {"launch_shrink", "launch_expand_dot"}, {"launch_fused", "launch_expand"}),
    ("triton:gather", {"launch_shrink", "launch_expand"}, {"launch_fused", "launch_expand_dot"}),
    ("triton:grouped", {"launch_shrink", "launch_expand_grouped"}, {"launch_fused", "launch_expand", "launch_expand_dot"}),
    ("triton:split1", {"launch_shrink"}, {"launch_fused", "launch_shrink_reduce"}),
    ("triton:split4", {"launch_shrink", "launch_shrink_reduce"}, {"launch_fused"}),
    ("triton:atomic4", {"launch_shrink"}, {"launch_fused", "launch_shrink_reduce"}),
])
def test_forced_triton_providers_take_their_path_and_restore_settings(name, made, not_made, launches):
    from molora_ops.impl import triton_backend as tb

    cfg = ops_suite.OpsConfig(T=40, N=4, K=2, R=8, H_in=600, H_out=48, dtype="float32")  # room for 4 splits
    p = ops_suite.make_problem(cfg, torch.device("cpu"))
    chosen, skipped = ops_suite.select_providers(torch.device("cpu"), [name, "dense"], interpreted=True)
    assert list(chosen) == ["dense", name] and not skipped
    before = tb.Settings(**vars(tb.settings))
    fn = chosen[name].prepare(p)
    launches.clear()  # prepare builds the plan (torch ops only)
    err = ops_suite.verify(fn, p, ops_suite.check_rows(p))
    assert err < 1e-5
    assert made <= set(launches) and not not_made & set(launches), launches
    assert tb.settings == before, "the forced settings hold only inside the call"


def test_every_forced_triton_path_names_settings_fields_or_says_why_not():
    """A forced path whose Settings fields exist is a provider; one that names a field the backend does not
    have yet (a path still being written) is skipped with that reason, never silently run as another path."""
    from molora_ops.impl import triton_backend as tb

    fields = set(vars(tb.settings))
    for path, how in ops_suite.FORCED["triton"].items():
        why = ops_suite.forced_unavailable("triton", how)
        assert (why is None) == (set(how) <= fields), (path, why)
    avail = {"triton": ops_suite.Provider("triton", "ours", True, lambda p: None, lambda c: 0)}
    made, skipped = ops_suite.forced_providers(avail)
    names = {ops_suite.forced_name("triton", p) for p in ops_suite.FORCED["triton"]} | {"triton+ranks"}
    assert set(made) | set(skipped) == names and not set(made) & set(skipped)
    assert all("not landed" in r for r in skipped.values()), skipped


def test_forced_cuda_path_is_set_only_inside_the_call(monkeypatch):
    monkeypatch.setenv("MOLORA_CUDA_PATH", "per_pair")
    seen = []
    apply, restore = ops_suite._forcing("cuda", "segmented")
    apply()
    seen.append(os.environ["MOLORA_CUDA_PATH"])
    restore()
    assert seen == ["segmented"] and os.environ["MOLORA_CUDA_PATH"] == "per_pair"
    monkeypatch.delenv("MOLORA_CUDA_PATH")


def test_unknown_and_unavailable_forced_providers():
    with pytest.raises(ValueError, match="triton:nope"):
        ops_suite.select_providers(torch.device("cpu"), ["triton:nope"])
    with pytest.raises(ValueError, match="triton\\+plan"):  # the plan is always prebuilt: no such variant
        ops_suite.select_providers(torch.device("cpu"), ["triton+plan"])
    chosen, skipped = ops_suite.select_providers(torch.device("cpu"), ["cuda:fused", "cuda+ranks", "dense"])
    assert list(chosen) == ["dense"] and set(skipped) == {"cuda:fused", "cuda+ranks"}


def test_e2e_variant_with_a_backend(monkeypatch):
    """ours-topk@torch patches with backend torch and is verified and timed like ours-topk; a @backend on a
    variant that is not ours is an error recorded for it, not a crash."""
    small = e2e_suite.E2EConfig(64, 128, 1, 4, 2, 256, adapters=3, rank=4, prefill=((2, 8),), decode_batches=(),
                                decode_context=8, modes=("eager",))
    recs = e2e_suite.run_e2e(small, torch.device("cpu"), variants=["base", "ours-topk@torch", "dense@torch"],
                             timing=TimingConfig.quick())
    by = {r["variant"]: r for r in recs}
    assert by["ours-topk@torch"]["status"] == "ok", by["ours-topk@torch"].get("reason")
    assert by["dense@torch"]["status"] == "error" and "@backend" in by["dense@torch"]["reason"]


# ------------------------------------------------------------------------------------------ compile check
def test_compile_check_has_a_job_for_every_kernel_and_forced_path():
    """Every @triton.jit kernel of routed_lora is compiled by some job (a new kernel fails this until
    compile_check covers it), and the forced-only launches the benchmarks time are among the jobs."""
    from molora_ops.kernels import compile_check as cc

    assert cc.all_kernels() and cc.all_kernels() <= cc.kernels_covered()
    names = {j.name for shape in cc.SHAPES for j in cc.jobs(shape, "bf16")}
    assert {"shrink", "shrink_reduce", "expand", "expand_dot", "expand_grouped", "expand_reduce", "fused"} <= names
    forced = {j.name for shape in cc.SHAPES for j in cc.jobs(shape, "bf16") if not j.heuristic}
    assert {"expand_grouped", "fused"} <= forced


def test_compile_check_compiles_for_sm90_without_a_gpu():
    """The tool end to end on its cheapest kernel (the full run is step `compile` of gpu_check.sh quick: too
    slow for two shared cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "molora_ops.kernels.compile_check", "--arch", "90", "--dtype", "bf16",
                          "--only", "expand_reduce"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("sm_90 bf16 expand_reduce")]
    assert lines and all("regs" in line and "stack    0" in line for line in lines), res.stdout

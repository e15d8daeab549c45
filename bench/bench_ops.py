"""Kernel microbenchmarks for routed_lora: a pytest-benchmark suite and a standalone runner.

pytest-benchmark (the grid comes from MOLORA_BENCH_GRID: smoke, cpu or gpu; default smoke):

    MOLORA_BENCH_GRID=cpu pytest bench/bench_ops.py --benchmark-columns=median,iqr,rounds

Standalone (the same sweep with median / p20 / p80, bytes and FLOPs model, copy-bandwidth fraction and the
base-GEMM ratio, appended to bench/results/ops-<device>.jsonl; arguments as for `molora bench`):

    python bench/bench_ops.py --grid cpu --threads 1
    python -m molora_ops bench --suite ops --grid gpu

Every provider's output is checked against molora_ops.reference before it is timed.
"""

from __future__ import annotations

import os
import sys

import torch

from molora_ops.benchmarking import ops_suite
from molora_ops.benchmarking.baselines import all_providers
from molora_ops.benchmarking.problems import cost_model, make_problem

GRID = os.environ.get("MOLORA_BENCH_GRID", "smoke")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    import pytest

    providers, _ = all_providers(DEVICE)
    for cfg in ops_suite.grid(GRID):
        cid = f"T{cfg.T}-N{cfg.N}-k{cfg.K}-r{cfg.R}-{cfg.H_in}x{cfg.H_out}-{cfg.dtype}-{cfg.pattern}"
        for name in providers:
            yield pytest.param(cfg, name, id=f"{name}-{cid}")


_problems: dict = {}


def _problem(cfg):
    if cfg not in _problems:
        _problems.clear()  # one config's tensors at a time
        _problems[cfg] = make_problem(cfg, DEVICE)
    return _problems[cfg]


if "pytest" in sys.modules:
    import pytest

    @pytest.mark.parametrize("cfg,provider", list(_params()))
    def test_routed_lora(benchmark, cfg, provider):
        providers, _ = all_providers(DEVICE, [provider])
        prov = providers[provider]
        if prov.workspace(cfg) > ops_suite.memory_budget(DEVICE):
            pytest.skip("temporaries do not fit the memory budget")
        p = _problem(cfg)
        fn = prov.prepare(p)
        err = ops_suite.verify(fn, p, ops_suite.check_rows(p))
        assert err <= ops_suite.VERIFY_TOL[cfg.dtype], f"{provider} disagrees with the reference: {err:.3g}"
        if DEVICE.type == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        benchmark.extra_info.update(cost_model(cfg, p.topk_ids), max_rel_err=err, config=cfg.as_dict())
        benchmark(timed)


if __name__ == "__main__":
    from molora_ops.cli import main

    sys.exit(main(["bench", "--suite", "ops", *sys.argv[1:]]))

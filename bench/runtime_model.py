"""Whole-model eager timing of the routing runtime on CPU: a random Llama (molora_ops.benchmarking.e2e_suite's
"cpu" grid: hidden 512, 4 layers, 8 adapters of r = 16 on all 7 projections), base vs patched, interleaved in one
process (each round runs every provider once, in turn), medians over rounds.

    python bench/runtime_model.py decode [--batch 1 8] [--strategies dense grouped]   # 1 thread
    python bench/runtime_model.py prefill [--batch 4 --seq 256]                         # 2 threads
    (--threads N overrides; on a loaded 2-core machine 2-thread medians swing 3x between runs)

decode: one KV-cached step (context 32) per call; providers base, names (one adapter per sequence), topk
(adapter_weights, per-token top-2) and, with --strategies, topk with the CPU strategy forced (to re-check
choose_strategy in the model, where cache effects differ from bench/runtime_strategies.py).
prefill: one forward of batch x seq tokens; providers base, names, topk (top-2 drawn per sequence), topk/token
(drawn per token), names[loop] (names with the rows strategy's batched bmm form off: a matmul pair per run),
topk[no-runs] (topk with the grouped strategy's row-slice runs off: the C++ kernels where loaded),
topk/token[no-kernels] (topk/token with the C++ kernels off: the padded layout with more than one thread) and
topk/token[no-kernels,no-pad] (and the padded layout off: one matmul pair per adapter).
decode also times topk[no-kernels] (the pure-PyTorch rule: per_adapter, dense or grouped).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
from transformers import DynamicCache

import molora_ops as mo
from molora_ops import runtime
from molora_ops.benchmarking import e2e_suite as E


def _models():
    cfg = E.grid("cpu")
    base = E.build_base(cfg, torch.device("cpu"))
    tmp = tempfile.mkdtemp()
    _, names = E.build_peft(base, cfg, tmp)
    ours = mo.patch(copy.deepcopy(base), adapters={n: os.path.join(tmp, n) for n in names}, backend="torch")
    return cfg, base, ours, names


def _top2(cfg, batch: int, length: int, gen) -> torch.Tensor:
    """[batch, length, N] weights with two non-zero entries per token (one draw per sequence)."""
    w = torch.rand(batch, 1, cfg.adapters, generator=gen)
    idx = w.topk(2, -1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).expand(batch, length, -1).contiguous()


def _forced(strategy: str | None, fn):
    """fn run with runtime.choose_strategy forced to `strategy` (None: the rule) and the C++ kernels off (with them,
    grouped is taken without consulting the rule)."""
    if strategy is None:
        return fn

    def run():
        rule, fused = runtime.choose_strategy, runtime._FUSED
        runtime.choose_strategy, runtime._FUSED = (lambda *a: strategy), False
        try:
            return fn()
        finally:
            runtime.choose_strategy, runtime._FUSED = rule, fused

    return run


def decode_fns(cfg, base, ours, names, batch: int, strategies, gen) -> dict:
    def step(model, kw):
        ids = torch.randint(0, cfg.vocab, (batch, 32), generator=gen)
        cache = DynamicCache()
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True, **kw)
        tok = torch.randint(0, cfg.vocab, (batch, 1), generator=gen)

        def run():
            with torch.no_grad():
                model(tok, cache=cache, use_cache=True, **kw)
            cache.crop(-1)

        return run

    topk = dict(adapter_weights=_top2(cfg, batch, 40, gen))
    fns = {"base": step(base, {}), "names": step(ours, dict(adapter_names=[names[i % len(names)] for i in range(batch)])),
           "topk": step(ours, topk)}
    fns["topk[no-kernels]"] = _with("_FUSED", False, step(ours, topk))
    for s in strategies:
        fns[f"topk[{s}]"] = _forced(s, step(ours, topk))
    return fns


def _top2_per_token(cfg, batch: int, length: int, gen) -> torch.Tensor:
    """[batch, length, N] weights with two non-zero entries per token, drawn per token."""
    w = torch.rand(batch, length, cfg.adapters, generator=gen)
    idx = w.topk(2, -1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx))


def _with(name: str, value, fn):
    """fn run with runtime.<name> (a decision threshold) set to value."""

    def run():
        old = getattr(runtime, name)
        setattr(runtime, name, value)
        try:
            return fn()
        finally:
            setattr(runtime, name, old)

    return run


def prefill_fns(cfg, base, ours, names, batch: int, seq: int, gen) -> dict:
    ids = torch.randint(0, cfg.vocab, (batch, seq), generator=gen)
    kws = {"base": (base, {}), "names": (ours, dict(adapter_names=[names[i % len(names)] for i in range(batch)])),
           "topk": (ours, dict(adapter_weights=_top2(cfg, batch, seq, gen))),
           "topk/token": (ours, dict(adapter_weights=_top2_per_token(cfg, batch, seq, gen)))}

    def call(model, kw):
        def run():
            with torch.no_grad():
                model(ids, use_cache=False, **kw)
        return run

    fns = {k: call(m, kw) for k, (m, kw) in kws.items()}
    fns["names[loop]"] = _with("_BATCHED_MIN_SEQ", float("inf"), fns["names"])
    fns["topk[no-runs]"] = _with("_MIN_RUN", float("inf"), fns["topk"])
    fns["topk/token[no-kernels]"] = _with("_FUSED", False, fns["topk/token"])
    fns["topk/token[no-kernels,no-pad]"] = _with("_FUSED", False, _with("_PAD_WASTE", -1.0, fns["topk/token"]))
    return fns


def interleaved(fns: dict, rounds: int, warmup: int = 3) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("decode", "prefill"))
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--strategies", nargs="*", default=[])
    ap.add_argument("--threads", type=int, help="default: 1 for decode, 2 for prefill")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or (1 if args.mode == "decode" else 2))
    gen = torch.Generator().manual_seed(0)
    cfg, base, ours, names = _models()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"thread(s), load average {os.getloadavg()[0]:.2f}")
    for b in args.batch or ((1, 8) if args.mode == "decode" else (4,)):
        if args.mode == "decode":
            fns, rounds = decode_fns(cfg, base, ours, names, b, args.strategies, gen), args.rounds or 30
        else:
            fns, rounds = prefill_fns(cfg, base, ours, names, b, args.seq, gen), args.rounds or 9
        med = interleaved(fns, rounds)
        label = f"decode b={b}" if args.mode == "decode" else f"prefill {b}x{args.seq}"
        print(label, " ".join(f"{k}={v:.2f}ms({v / med['base']:.2f}x)" for k, v in med.items()))
    print(f"# load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

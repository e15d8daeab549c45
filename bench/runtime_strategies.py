"""Time RoutedBatch's CPU strategies per routing regime, against the base projection and the public op.

Providers are interleaved in one process (each repeat runs every provider once, in turn), on 1 thread; the
figure is the median over repeats of the mean time per call in a short inner loop. The routing is prepared
outside the timed region (a patched model builds it once per forward). Defaults: H_in = H_out = 512, R = 16,
N = 8, float32 (the issue's Llama shapes).

    python bench/runtime_strategies.py [--repeats 15] [--json out.jsonl]

Columns: microseconds per call of `add_` for each strategy, the public `molora_ops.routed_lora` with a prebuilt
plan and validate=False ("op"), and the base projection's `x @ W.T` ("base"); the last column is the chosen
strategy's cost as a fraction of the base GEMM.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import molora_ops as mo
from molora_ops.runtime import STRATEGIES, TRACED_STRATEGIES, RoutedBatch, choose_traced_strategy


def _ids(num_tokens: int, top_k: int, num_adapters: int, active: int, gen) -> torch.Tensor:
    """Per-token top-k ids drawn from the first `active` adapters (distinct within a token where possible)."""
    if top_k <= active:
        return torch.stack([torch.randperm(active, generator=gen)[:top_k] for _ in range(num_tokens)]).reshape(
            num_tokens, top_k)
    return torch.randint(0, active, (num_tokens, top_k), generator=gen)


def regimes():
    """(name, T, K, active adapters, per-sequence (seq_ids, seq_len) or None)."""
    yield "decode b1 top1", 1, 1, 8, None
    yield "decode b1 top2", 1, 2, 8, None
    yield "decode b1 names", 1, 1, 8, ([3], 1)
    yield "decode b4 top2", 4, 2, 8, None
    yield "decode b8 top2", 8, 2, 8, None
    yield "decode b8 top2 2-active", 8, 2, 2, None
    yield "decode b8 names", 8, 1, 8, (list(range(8)), 1)
    yield "decode b8 names 2-runs", 8, 1, 2, ([1, 1, 1, 1, 6, 6, 6, 6], 1)
    yield "decode b16 top2", 16, 2, 8, None
    yield "decode b32 top2", 32, 2, 8, None
    yield "decode b32 top2 2-active", 32, 2, 2, None
    yield "decode b32 names", 32, 1, 8, ([e % 8 for e in range(32)], 1)
    yield "prefill 64 top2", 64, 2, 8, None
    yield "prefill 256 top2", 256, 2, 8, None
    yield "prefill 4x256 top2", 1024, 2, 8, None
    yield "prefill 4x256 names", 1024, 1, 8, ([0, 3, 5, 7], 256)


def _time(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e6


def measure(name, T, K, active, seqs, *, h=512, r=16, n=8, repeats=15, gen=None):
    x = torch.randn(T, h, generator=gen)
    a = torch.randn(n, r, h, generator=gen) / h**0.5
    b = torch.randn(n, h, r, generator=gen) / r**0.5
    w_base = torch.randn(h, h, generator=gen) / h**0.5
    scale = torch.rand(n, generator=gen) + 0.5
    if seqs is None:
        ids = _ids(T, K, n, active, gen)
        weights = torch.rand(T, K, generator=gen)
        batch = RoutedBatch.build(ids, weights, n, backend="torch")
    else:
        batch = RoutedBatch.for_sequences(torch.tensor(seqs[0]), seqs[1], n, backend="torch")
        ids, weights = batch.topk_ids, batch.topk_weights
    out = torch.zeros(T, h)
    providers = {"base": lambda: x @ w_base.t()}
    for strategy in STRATEGIES:
        if strategy == "rows" and seqs is None:
            continue
        forced = batch._with_strategy(strategy)
        providers[strategy] = lambda f=forced: f.add_(x, a, b, out, scale=scale)
    plan = batch.plan
    providers["op"] = lambda: mo.routed_lora(x, a, b, ids, weights, scaling=scale, out=out, plan=plan,
                                             validate=False, backend="torch")
    inner = max(1, int(2000 / max(T, 1) ** 0.5))
    samples = {k: [] for k in providers}
    with torch.no_grad():
        for fn in providers.values():  # warm up (weight caches, allocator)
            fn()
        for _ in range(repeats):
            for key, fn in providers.items():
                samples[key].append(_time(fn, inner))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"regime": name, "T": T, "K": K, "active": active, "chosen": batch.strategy, "us": med}


def measure_group(T, K, *, h=512, r=16, n=8, repeats=15, gen=None):
    """A q/k/v-like sibling group (three members, H_out 512): three add_ calls vs one shrink over the
    concatenated A and three expand_ with rank slices, on the chosen strategy (per-token top-K routing)."""
    x = torch.randn(T, h, generator=gen)
    a = [torch.randn(n, r, h, generator=gen) / h**0.5 for _ in range(3)]
    b = [torch.randn(n, h, r, generator=gen) / r**0.5 for _ in range(3)]
    a_cat = torch.cat(a, dim=1)
    outs = [torch.zeros(T, h) for _ in range(3)]
    batch = RoutedBatch.build(_ids(T, K, n, n, gen), torch.rand(T, K, generator=gen), n, backend="torch")

    def separate():
        for i in range(3):
            batch.add_(x, a[i], b[i], outs[i])

    def shared():
        hs = batch.shrink(x, a_cat)
        for i in range(3):
            batch.expand_(hs, b[i], outs[i], rank_slice=slice(i * r, (i + 1) * r))

    providers = {"3 x add_": separate, "shrink + 3 expand_": shared}
    inner = max(1, int(1000 / max(T, 1) ** 0.5))
    samples = {k: [] for k in providers}
    with torch.no_grad():
        for fn in providers.values():
            fn()
        for _ in range(repeats):
            for key, fn in providers.items():
                samples[key].append(_time(fn, inner))
    return batch.strategy, {k: statistics.median(v) for k, v in samples.items()}


def _routed_layers(strategy: str, layers: int):
    """A function that builds the routing once and adds `layers` projections' deltas, with `strategy` forced."""

    def fn(x, a, b, out, ids, weights, scale):
        batch = RoutedBatch.build(ids, weights, a.shape[1], backend="torch", validate=False)._with_strategy(strategy)
        for i in range(layers):
            batch.add_(x, a[i], b[i], out[i], scale=scale)
        return out

    return fn


def measure_traced(T, K, *, h=512, r=16, n=8, layers=4, repeats=15, gen=None):
    """Compiled (inductor, static shapes) us per projection: the routing built once inside the graph, then
    `layers` add_ calls with distinct weights; the traced strategies, the registered ops ("ops") and the
    compiled base projection x @ W.T."""
    x = torch.randn(T, h, generator=gen)
    a = torch.randn(layers, n, r, h, generator=gen) / h**0.5
    b = torch.randn(layers, n, h, r, generator=gen) / r**0.5
    w_base = torch.randn(layers, h, h, generator=gen) / h**0.5
    ids = _ids(T, K, n, n, gen)
    weights, scale = torch.rand(T, K, generator=gen), torch.rand(n, generator=gen) + 0.5
    out = torch.zeros(layers, T, h)
    torch._dynamo.reset()  # the providers share one code object: a fresh cache per point (no recompile limit)

    def base(x, w):
        return [x @ w[i].t() for i in range(layers)]

    providers = {"base": lambda f=torch.compile(base, dynamic=False, fullgraph=True): f(x, w_base)}
    for strategy in TRACED_STRATEGIES + ("ops",):
        compiled = torch.compile(_routed_layers(strategy, layers), dynamic=False, fullgraph=True)
        providers[strategy] = lambda f=compiled: f(x, a, b, out, ids, weights, scale)
    inner = max(1, int(400 / max(T, 1) ** 0.5))
    samples = {k: [] for k in providers}
    with torch.no_grad():
        for fn in providers.values():  # compile and warm up
            fn()
            fn()
        for _ in range(repeats):
            for key, fn in providers.items():
                samples[key].append(_time(fn, inner) / layers)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="append one JSON line per regime to this file")
    parser.add_argument("--traced-only", action="store_true", help="only the compiled (traced) strategies")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": 1}
    print(f"# {env}; H=512 R=16 N=8 float32; us per add_ call, median of {args.repeats} interleaved repeats")
    if not args.traced_only:
        eager_tables(args, gen, env)
    print("\n# torch.compile (inductor, static shapes), K=2: us per projection (routing built once per 4)")
    cols = ("base",) + TRACED_STRATEGIES + ("ops",)
    print(f"{'T':>6s} " + " ".join(f"{c:>14s}" for c in cols) + "  chosen")
    for T in (1, 8, 32, 1024):
        us = measure_traced(T, 2, repeats=args.repeats, gen=gen)
        print(f"{T:6d} " + " ".join(f"{us[c]:14.1f}" for c in cols) + f"  {choose_traced_strategy(T, 2, 8)}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"regime": f"compiled T={T} top2", "T": T, "K": 2, "us": us, "env": env}) + "\n")


def eager_tables(args, gen, env) -> None:
    """The eager strategies per regime, and the sibling-group comparison."""
    cols = ("base", "op") + STRATEGIES
    print(f"{'regime':28s} " + " ".join(f"{c:>11s}" for c in cols) + "  chosen      /base")
    for regime in regimes():
        row = measure(*regime, repeats=args.repeats, gen=gen)
        us = row["us"]
        cells = " ".join(f"{us[c]:11.1f}" if c in us else f"{'-':>11s}" for c in cols)
        print(f"{row['regime']:28s} {cells}  {row['chosen']:11s} {us[row['chosen']] / us['base']:.2f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "env": env}) + "\n")
    print("\n# sibling group of 3 (q/k/v-like), us per group")
    for T, K in ((1, 2), (8, 2), (1024, 2)):
        strategy, us = measure_group(T, K, repeats=args.repeats, gen=gen)
        print(f"T={T:<5d} K={K} {strategy:11s} " + "  ".join(f"{k}: {v:8.1f}" for k, v in us.items()))


if __name__ == "__main__":
    main()

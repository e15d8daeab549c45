"""The kernel sweep: routed_lora against every provider, one named grid at a time.

For each point it first checks every provider's output against molora_ops.reference (on up to 256 of the
tokens: rows are independent, so a subset is an exact check of those rows), then times the providers that
agree, the base projection GEMM (x @ W.T on the same shapes), the routing plan's build and, once per run, a
large copy (the bandwidth ceiling) and the cheapest launch (the latency floor).

Fairness (DESIGN.md section 5): our providers get their routing plan built in prepare, outside the timed
call (a patched model builds one per forward for all its layers; `plan_build` in each record is that cost).
Timers that do not flush caches (CUDA-graph replay, CPU loops) cycle through a pool of problem copies larger
than the last-level cache (timing.pool_members); each record's `cache` field says which method held.
"""

from __future__ import annotations

import functools
import os
import sys
import uuid
from dataclasses import asdict
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .baselines import OURS, Provider, all_providers, prepare_ours
from .env import environment
from .problems import TRAFFIC_PATTERNS, OpsConfig, cost_model, make_problem, member_bytes, pool_member
from .timing import TimingConfig, cache_bytes, cache_record, copy_bandwidth, launch_floor, pool_members, time_fn, time_pool

# Max |provider - reference| relative to max |reference|: loose enough for low-precision paths (PEFT and
# dense run in the input dtype, triton may use tf32 for float32), tight enough that a dropped slot,
# weight or scale (errors of order 1) is caught.
VERIFY_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
VERIFY_ROWS = 256
GRAPH_MAX_T = 64  # decode sizes: time with CUDA graphs where the provider can be captured
HEADLINE = dict(H_in=4096, H_out=4096, R=16, N=32, K=2, pattern="uniform")
# Mixed ranks as served in practice (issue 11 item 4), zero-padded to the largest: "<backend>+ranks" against
# the plain provider on the same weights shows what bounding the rank loops saves.
MIXED_RANKS = dict(R=64, ranks=(8, 16, 64))


def _sweep(base: dict, tag: str, **axes) -> list[OpsConfig]:
    (axis, values), = axes.items()
    return [OpsConfig(**{**base, axis: v}, sweeps=(tag,)) for v in values]


def _merge(points: Iterable[OpsConfig]) -> list[OpsConfig]:
    """Drop repeated points, keeping the union of their sweep tags, in first-seen order."""
    merged: dict[tuple, OpsConfig] = {}
    for p in points:
        k = p.key()
        if k in merged:
            old = merged[k]
            tags = old.sweeps + tuple(t for t in p.sweeps if t not in old.sweeps)
            merged[k] = OpsConfig(**{**dict(k), "sweeps": tags})
        else:
            merged[k] = p
    return list(merged.values())


def grid(name: str) -> list[OpsConfig]:
    """Named grids. smoke: tiny shapes for CI (with empty slots, duplicates and bf16); cpu: real hidden
    sizes at CPU-friendly token counts, a few minutes on two cores; gpu: the full sweep of issue 5;
    gpu-quick: the headline shape (bf16) at the key token counts only, then mixed ranks (MIXED_RANKS) at
    T = 1 and 256, for `bench/gpu_check.sh quick`."""
    if name == "smoke":
        base = dict(T=7, N=4, K=2, R=8, H_in=64, H_out=96, dtype="float32", pattern="uniform")
        return _merge(
            _sweep(base, "T", T=[1, 7])
            + _sweep(base, "pattern", pattern=["distinct", "identical"])
            + [OpsConfig(**{**base, "K": 3, "empty_frac": 0.3}, sweeps=("empty",))]
            + _sweep(base, "dtype", dtype=["bfloat16"])
        )
    if name == "cpu":
        base = dict(HEADLINE, T=64, dtype="float32")
        return _merge(
            _sweep(base, "T", T=[1, 8, 64, 256])
            + _sweep(base, "pattern", pattern=list(TRAFFIC_PATTERNS))
            + _sweep(base, "N", N=[1, 8, 32, 128])
            + _sweep(base, "K", K=[1, 2, 4])
            + _sweep(base, "R", R=[8, 16, 64])
            + _sweep(base, "hidden", H_out=[4096, 14336])
            + _sweep(base, "dtype", dtype=["float32", "bfloat16"])
        )
    if name == "gpu":
        base = dict(HEADLINE, T=256, dtype="bfloat16")
        return _merge(
            _sweep(base, "T", T=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
            + [c for t in (16, 256, 4096) for c in _sweep({**base, "T": t}, f"pattern@T={t}", pattern=list(TRAFFIC_PATTERNS))]
            + _sweep({**base, "T": 32}, "distinct32", pattern=["distinct"])
            + _sweep(base, "N", N=[1, 4, 8, 16, 32, 64, 128])
            + _sweep(base, "K", K=[1, 2, 3, 4])
            + _sweep(base, "R", R=[8, 16, 32, 64, 128])
            + [c for t in (1, 256, 4096) for c in _sweep({**base, "T": t}, f"hidden@T={t}", H_out=[4096, 14336])]
            + _sweep(base, "dtype", dtype=["bfloat16", "float16", "float32"])
        )
    if name == "gpu-quick":
        base = dict(HEADLINE, T=256, dtype="bfloat16")
        return _sweep(base, "T", T=[1, 8, 64, 256, 4096]) + _sweep({**base, **MIXED_RANKS}, "ranks", T=[1, 256])
    raise ValueError(f"unknown grid {name!r}; expected smoke, cpu, gpu or gpu-quick")


# Forced kernel paths, each timed with the plan built outside the timed call like every provider of ours:
# "<backend>:<path>" forces one path (triton: molora_ops.impl.triton_backend.Settings fields; cuda:
# MOLORA_CUDA_PATH), so that one GPU run shows what every path costs at every point; the plain "<backend>"
# provider is the shape heuristic. A triton path whose Settings fields the backend does not have (a path
# still being written) is reported as skipped with the reason, never silently dropped.
FORCED = {
    "triton": {
        "fused": dict(fused=True),
        "fused-pipelined": dict(fused=True, fused_stages=3),  # the fused kernel's H_in loop in 3 stages
        "gather": dict(fused=False, expand="gather"),
        "dot": dict(fused=False, expand="dot"),
        "grouped": dict(fused=False, expand="grouped"),
        "split1": dict(fused=False, split_k=1),
        "split4": dict(fused=False, split_k=4),
        "split16": dict(fused=False, split_k=16),
        "atomic4": dict(fused=False, split_k=4, atomic_split_k=True),
    },
    "cuda": {"per_pair": "per_pair", "segmented": "segmented", "fused": "fused"},
}
# "<backend>+ranks": the heuristic path given each adapter's real rank (routed_lora(..., ranks=)), against
# the plain provider on the same zero-padded weights: what bounding the rank loops saves.
RANKED_SUFFIX = "+ranks"


def forced_name(backend: str, path: str) -> str:
    return f"{backend}:{path}"


def _forcing(backend: str, how):
    """(apply, restore) callables that switch `backend` to the forced path `how` and back: a few attribute or
    environment writes, cheap enough to sit inside the timed call (which may be captured in a CUDA graph)."""
    if backend == "triton":
        from molora_ops.impl import triton_backend as tb

        old = {k: getattr(tb.settings, k) for k in how}

        def put_settings(values: dict) -> None:
            for key, value in values.items():
                setattr(tb.settings, key, value)

        return (lambda: put_settings(how)), (lambda: put_settings(old))
    old_path = os.environ.get("MOLORA_CUDA_PATH")

    def put_path(value) -> None:
        if value is None:
            os.environ.pop("MOLORA_CUDA_PATH", None)
        else:
            os.environ["MOLORA_CUDA_PATH"] = value

    return (lambda: put_path(how)), (lambda: put_path(old_path))


def _prepare_forced(backend: str, how):
    plain = prepare_ours(backend)

    def prepare(p):
        call = plain(p)  # builds the plan, untimed
        apply, restore = _forcing(backend, how)

        def run():
            apply()
            try:
                return call()
            finally:
                restore()

        return run

    return prepare


def _prepare_ranked(backend: str):
    def prepare(p):
        if p.ranks is None:
            raise ValueError("the +ranks providers need a point with per-adapter ranks (OpsConfig.ranks)")
        return prepare_ours(backend, ranks=p.ranks)(p)

    return prepare


def forced_unavailable(backend: str, how) -> str | None:
    """Why the forced path `how` of `backend` cannot run with the code as it is (None: it can)."""
    if backend != "triton":
        return None
    from molora_ops.impl import triton_backend as tb

    missing = sorted(k for k in how if not hasattr(tb.settings, k))
    return f"triton_backend.Settings has no {', '.join(missing)} (path not landed)" if missing else None


def ranks_unavailable() -> str | None:
    """Why routed_lora cannot take per-adapter ranks yet (None: it can)."""
    import inspect

    import molora_ops

    if "ranks" in inspect.signature(molora_ops.routed_lora).parameters:
        return None
    return "molora_ops.routed_lora has no ranks= argument yet (per-adapter ranks not landed)"


def forced_providers(available: dict[str, Provider]) -> tuple[dict[str, Provider], dict[str, str]]:
    """The ":<path>" providers of each of our GPU backends and the "+ranks" one of each backend of ours
    present in `available`, and the reason for each one the code cannot run yet."""
    out, skipped = {}, {}
    for backend, paths in FORCED.items():
        if backend not in available:
            continue
        base = available[backend]
        for path, how in paths.items():
            name = forced_name(backend, path)
            why = forced_unavailable(backend, how)
            if why:
                skipped[name] = why
            else:
                out[name] = Provider(name, "ours", base.graph_safe, _prepare_forced(backend, how), base.workspace)
    for backend in (b for b in OURS if b in available):
        base, name = available[backend], backend + RANKED_SUFFIX
        if why := ranks_unavailable():
            skipped[name] = why
        else:
            out[name] = Provider(name, "ours", base.graph_safe, _prepare_ranked(backend), base.workspace)
    return out, skipped


def _forced_backend(name: str) -> str | None:
    """The backend of a forced-path or +ranks provider name, None for any other name."""
    if name.endswith(RANKED_SUFFIX) and name[: -len(RANKED_SUFFIX)] in OURS:
        return name[: -len(RANKED_SUFFIX)]
    return next((b for b, paths in FORCED.items() if name in {forced_name(b, p) for p in paths}), None)


def select_providers(device: torch.device, names: list[str] | None, *, interpreted: bool = False
                     ) -> tuple[dict[str, Provider], dict[str, str]]:
    """all_providers, plus the forced-path providers that `names` asks for; and the reason for each left out."""
    forced = {n: b for n in names or [] if (b := _forced_backend(n))}
    plain = [n for n in names or [] if n not in forced]
    chosen, skipped = all_providers(device, sorted(set(plain) | set(forced.values())) if names else None,
                                    interpreted=interpreted)
    extra, not_landed = forced_providers(chosen)
    for n, backend in forced.items():
        if n not in extra:
            skipped[n] = not_landed.get(n) or skipped.get(backend, f"backend {backend} is not available")
    if names:
        chosen = {n: p for n, p in chosen.items() if n in plain}
        skipped = {n: r for n, r in skipped.items() if n in names}
    return {**chosen, **{n: extra[n] for n in forced if n in extra}}, skipped


def memory_budget(device: torch.device) -> int:
    """Bytes of temporaries one provider may use before a point is skipped for it."""
    if device.type == "cuda":
        return int(0.5 * torch.cuda.get_device_properties(device).total_memory)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 16 << 30
    return min(8 << 30, avail // 3)


def check_rows(p) -> torch.Tensor:
    """The token rows every provider is checked on: all of them up to VERIFY_ROWS, else evenly spaced."""
    T = p.x.shape[0]
    return torch.linspace(0, T - 1, min(T, VERIFY_ROWS)).round().long().unique()


def verify(fn: Callable[[], torch.Tensor], p, rows: torch.Tensor, expected: torch.Tensor | None = None) -> float:
    """Run fn once and return max |fn()[rows] - reference[rows]| / max |reference[rows]|."""
    if expected is None:
        expected = _reference_rows(p, rows)
    return _rel_err(fn(), rows, expected)


def _rel_err(out: torch.Tensor, rows: torch.Tensor, expected: torch.Tensor) -> float:
    got = out[rows].double().cpu()
    if got.shape != expected.shape:
        return float("inf")
    scale = max(float(expected.abs().max()), 1e-6) if expected.numel() else 1.0
    err = (got - expected).abs()
    return float(torch.nan_to_num(err, nan=float("inf")).max()) / scale if err.numel() else 0.0


def _reference_rows(p, rows: torch.Tensor) -> torch.Tensor:
    from molora_ops import reference

    r = rows.to(p.x.device)
    return reference.routed_lora(
        p.x[r], p.lora_a, p.lora_b, p.topk_ids[r], p.topk_weights[r], scaling=p.scaling
    ).double().cpu()


def run_ops(
    configs: list[OpsConfig],
    device: torch.device,
    *,
    providers: list[str] | None = None,
    timing: TimingConfig = TimingConfig(),
    progress: Callable[[str], None] | None = None,
    verify_only: bool = False,
    grid_name: str | None = None,
) -> list[dict]:
    """Verify and time every provider on every config; returns one record per (config, provider). `providers`
    may name forced paths (FORCED). Interrupted (SIGINT), it returns the records finished so far."""
    # Verifying (not timing) may include triton under its CPU interpreter when TRITON_INTERPRET=1 is set.
    chosen, left_out = select_providers(device, providers, interpreted=verify_only)
    env = environment(device)
    run_id = f"{env['timestamp']}-{uuid.uuid4().hex[:6]}"
    ceiling = copy_bandwidth(device, timing) if not verify_only else {}
    floor = launch_floor(device, timing) if not verify_only else {}
    budget = memory_budget(device)
    common = {"suite": "ops", "grid": grid_name, "run_id": run_id, "env": env, "timing": asdict(timing), **ceiling, **floor}
    records = []
    try:
        _run_points(configs, chosen, left_out, device, timing, common, progress, verify_only, budget, records)
    except KeyboardInterrupt:  # a time-limited run (bench/gpu_check.sh quick: SIGINT) keeps the points it finished
        print(f"interrupted: keeping the {len(records)} records finished so far", file=sys.stderr)
    return records


class _Pool:
    """The problem copies of one point that cycled timers go through (see timing.time_pool): built on first
    use, shared by the point's providers, the problem itself first."""

    def __init__(self, p, cost: dict, device: torch.device, budget: int):
        self.cache = cache_bytes(device)
        self.touched = cost["bytes"]
        # A quarter of the memory budget for the copies: a provider's own prepare may add as much again.
        self.size = pool_members(self.touched, self.cache[0], member_bytes=member_bytes(p), budget_bytes=budget // 4)
        self._members = [p]
        self._last_expected = None

    def members(self, cycled: bool) -> list:
        """Every copy when the timer cycles through them, else the problem alone."""
        while cycled and len(self._members) < self.size:
            self._members.append(pool_member(self._members[0], len(self._members)))
        return self._members if cycled else self._members[:1]

    def last_expected(self, rows: torch.Tensor) -> torch.Tensor:
        """The reference rows of the last copy (computed once per point)."""
        if self._last_expected is None:
            self._last_expected = _reference_rows(self._members[-1], rows)
        return self._last_expected


def _base_gemm(p, cost: dict, device, timing, graph: bool, budget: int) -> dict:
    """The base projection x @ W.T timed like the providers: W copies cycled where the timer does not flush."""
    cache = cache_bytes(device)
    touched = cost["base_gemm_bytes"]
    cycled = device.type != "cuda" or graph
    w_bytes = p.base_weight.numel() * p.base_weight.element_size()
    n = pool_members(touched, cache[0], member_bytes=w_bytes, budget_bytes=budget // 4) if cycled else 1
    weights = [p.base_weight] + [p.base_weight.clone() for _ in range(n - 1)]
    t = time_pool([functools.partial(F.linear, p.x, w) for w in weights], device, timing, cuda_graph=graph)
    return {**t.as_dict(), "cache": cache_record(t.cache, touched, cache, n)}


def _run_points(configs, chosen, left_out, device, timing, common, progress, verify_only, budget, records) -> None:
    """run_ops' loop: appends one record per (config, provider) to `records` as each finishes."""
    for cfg in configs:
        p = make_problem(cfg, device)
        cost = cost_model(cfg, p.topk_ids)
        rows = check_rows(p)
        expected = _reference_rows(p, rows)
        graph = device.type == "cuda" and cfg.T <= GRAPH_MAX_T
        point = {**common, "config": cfg.as_dict(), **cost}
        if not verify_only:
            point["base_gemm"] = _base_gemm(p, cost, device, timing, graph, budget)
            point["plan_build"] = _plan_build(p, device, timing)
        pool = _Pool(p, cost, device, budget)
        for name, reason in left_out.items():
            records.append({**point, "provider": name, "kind": "ours", "status": "skipped", "reason": reason})
        for name, prov in chosen.items():
            if progress:
                progress(f"{name} T={cfg.T} N={cfg.N} k={cfg.K} r={cfg.R} {cfg.pattern}")
            records.append(_run_provider(prov, pool, cfg, point, rows, expected, device, timing, graph, budget,
                                         verify_only))
        del p, pool
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _plan_build(p, device, timing) -> dict:
    """The time of molora_ops.build_plan for the point's routing: what a patched model pays once per forward
    (shared by all its layers), and what no provider's timed call includes."""
    import molora_ops

    t = time_fn(lambda: molora_ops.build_plan(p.topk_ids, p.lora_a.shape[0]), device, timing)
    return t.as_dict()


def _run_provider(prov: Provider, pool: _Pool, cfg, point, rows, expected, device, timing, graph, budget,
                  verify_only) -> dict:
    rec = {**point, "provider": prov.name, "kind": prov.kind}
    need = prov.workspace(cfg)
    if need > budget:
        return {**rec, "status": "skipped", "reason": f"needs ~{need / 2**30:.1f} GiB of temporaries (budget {budget / 2**30:.1f})"}
    cuda_graph = graph and prov.graph_safe
    cycled = not verify_only and (device.type != "cuda" or cuda_graph)  # these timers do not flush caches
    try:
        members = pool.members(cycled)
        fns = [prov.prepare(m) for m in members]
        err = verify(fns[0], members[0], rows, expected)
        if len(fns) > 1:  # the last copy holds other data: checked against its own reference
            err = max(err, verify(fns[-1], members[-1], rows, pool.last_expected(rows)))
        rec.update(max_rel_err=err, tol=VERIFY_TOL[cfg.dtype])
        if not err <= VERIFY_TOL[cfg.dtype]:
            return {**rec, "status": "wrong", "reason": f"max rel err {err:.3g} > {VERIFY_TOL[cfg.dtype]} against the reference"}
        if verify_only:
            return {**rec, "status": "verified"}
        t = time_pool(fns, device, timing, cuda_graph=cuda_graph)
    except torch.OutOfMemoryError as exc:
        return {**rec, "status": "skipped", "reason": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # one broken provider must not hide the others' numbers
        return {**rec, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sec = t.median_ms * 1e-3
    base_ms = point["base_gemm"]["median_ms"]
    floor_ms = rec["launch_floor_graph_ms"] if t.timer == "cuda_graph" else rec["launch_floor_ms"]
    bytes_floor_ms = point["bytes"] / (rec["copy_gbps"] * 1e9) * 1e3
    rec.update(
        status="ok",
        time=t.as_dict(),
        cache=cache_record(t.cache, pool.touched, pool.cache, len(members)),
        gbps=point["bytes"] / sec / 1e9,
        copy_frac=point["bytes"] / sec / 1e9 / rec["copy_gbps"],
        tflops=point["flops"] / sec / 1e12,
        lora_over_base=t.median_ms / base_ms,
        floor_ms=max(floor_ms, bytes_floor_ms),
        over_floor=t.median_ms / max(floor_ms, bytes_floor_ms),
    )
    return rec

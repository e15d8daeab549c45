"""Timers that report the median with p20 and p80, in milliseconds, and how they kept caches from flattering.

CPU: ``time.thread_time`` (one torch thread) or ``time.perf_counter`` around single calls, after warmup,
repeated until both a minimum count and a minimum total time are reached. CUDA: ``triton.testing.do_bench``
(it flushes L2 before every timed call) or, for decode sizes and graph-safe callables,
``triton.testing.do_bench_cudagraph``, which replays a CUDA graph of unrolled calls so that host launch
overhead is excluded; without triton, CUDA events around single calls, L2 flushed before each.

Caches: a call that finds its weights in the last-level cache (GPU L2, 60 MB on an H200; a CPU's L3) looks
faster than it will in a model, where other layers evict them. A graph replay and a CPU loop do not flush,
so the caller gives ``time_pool`` a pool of callables, each doing the same work on its own copy of the data,
sized by ``pool_members`` so that between two uses of one copy more than POOL_MARGIN x the cache size of
other data was touched; each timed call runs the next member. ``cache_record`` says, per result row, which of
these held: "l2_flush", "pool", "exceeds_cache" (one call alone touches that much), "pool-partial" (the pool
was capped by memory: partly cache-resident) or "resident" (no pool: the data stays cached).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

# Cache sizes used when the device does not report one: on the large side, so that a pool sized from them
# still exceeds the real cache (H200 L2 60 MB, B200 126 MB; server L3s up to a few hundred MB).
DEFAULT_CUDA_CACHE_BYTES = 128 << 20
DEFAULT_CPU_CACHE_BYTES = 256 << 20
POOL_MARGIN = 2          # bytes touched between two uses of one pool member, in cache sizes
POOL_MAX_MEMBERS = 512   # more members than this: the pool is partial (recorded as such)


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2          # CPU / CUDA-events warmup calls
    min_reps: int = 5        # CPU: at least this many timed calls
    max_reps: int = 200      # CPU: at most this many
    min_time_s: float = 0.2  # CPU: keep repeating until this much time has been spent timing
    cuda_rep_ms: int = 100   # CUDA: do_bench's `rep` budget

    @classmethod
    def quick(cls) -> "TimingConfig":
        """For smoke runs that prove the machinery works: a handful of calls, no time floor."""
        return cls(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0, cuda_rep_ms=10)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    timer: str
    cache: str = "warm"  # how the timer treated caches: "l2_flush", "cycled" (a pool of members) or "warm"

    def as_dict(self) -> dict:
        return asdict(self)


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(samples_ms), q[1], q[7]


def _time_cpu(fn: Callable[[], object], cfg: TimingConfig, cache: str) -> Timing:
    """With one torch thread all work runs on the calling thread, so its CPU time (thread_time) is the cost
    of the call without the time the OS gave to other processes: steady numbers on a shared, loaded machine.
    With more threads only wall time (perf_counter) is meaningful."""
    clock, name = (time.thread_time, "thread_time") if torch.get_num_threads() == 1 else (time.perf_counter, "perf_counter")
    for _ in range(cfg.warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < cfg.min_reps or (spent < cfg.min_time_s and len(samples) < cfg.max_reps):
        t0 = clock()
        fn()
        dt = clock() - t0
        samples.append(dt * 1e3)
        spent += dt
    med, p20, p80 = _quantiles(samples)
    return Timing(med, p20, p80, len(samples), name, cache)


def _time_cuda_events(fn: Callable[[], object], cfg: TimingConfig, device: torch.device) -> Timing:
    """CUDA events around single calls, with L2 overwritten (POOL_MARGIN x its size) before each, untimed."""
    scratch = torch.empty(POOL_MARGIN * cache_bytes(device)[0], dtype=torch.int8, device=device)
    for _ in range(cfg.warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    while len(samples) < max(cfg.min_reps, 10) or (sum(samples) < cfg.cuda_rep_ms and len(samples) < 1000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        scratch.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    med, p20, p80 = _quantiles(samples)
    return Timing(med, p20, p80, len(samples), "cuda_events", "l2_flush")


def _cycle(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next member of `fns` at each call, round robin from the first."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return call


def time_fn(fn: Callable[[], object], device: torch.device, cfg: TimingConfig = TimingConfig(), *,
            cuda_graph: bool = False) -> Timing:
    """Time `fn` (which must do all its work on `device`) and return median / p20 / p80 in ms: time_pool
    with a pool of one (its data stays cached unless the timer flushes)."""
    return time_pool([fn], device, cfg, cuda_graph=cuda_graph)


def time_pool(fns: Sequence[Callable[[], object]], device: torch.device, cfg: TimingConfig = TimingConfig(), *,
              cuda_graph: bool = False) -> Timing:
    """The time of one call, where `fns` are the members of a pool: each does the same work on its own copy
    of the data (see pool_members). Timers that flush the cache themselves (do_bench, CUDA events) time the
    first member only; the others cycle through all of them (a CUDA graph captures one call of every member
    and the time is divided by their number), which Timing.cache records.

    cuda_graph=True asks for CUDA-graph replay (decode sizes); callables that sync with the host cannot be
    captured, so the caller passes True only for graph-safe ones, and a failed capture falls back to
    do_bench, which the returned `timer` field records.
    """
    if not fns:
        raise ValueError("time_pool needs at least one callable in fns")
    cycled = "cycled" if len(fns) > 1 else "warm"
    if device.type != "cuda":
        return _time_cpu(_cycle(fns), cfg, cycled)
    try:
        import triton.testing as tt
    except Exception:
        return _time_cuda_events(fns[0], cfg, device)
    quantiles = [0.5, 0.2, 0.8]
    if cuda_graph:
        n = len(fns)
        try:
            med, p20, p80 = tt.do_bench_cudagraph(lambda: [f() for f in fns], rep=max(cfg.cuda_rep_ms // 5, 5),
                                                  quantiles=quantiles)
            return Timing(med / n, p20 / n, p80 / n, 10, "cuda_graph", cycled)
        except Exception:
            torch.cuda.synchronize()  # the failed capture is discarded; time it without a graph
    med, p20, p80 = tt.do_bench(fns[0], warmup=25, rep=cfg.cuda_rep_ms, quantiles=quantiles)
    return Timing(med, p20, p80, 0, "do_bench", "l2_flush")


# ------------------------------------------------------------------------------------------- cache pools
def _cpu_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> tuple[int, str]:
    """The largest data or unified cache sysfs lists for CPU 0 (its L3 on most machines)."""
    best = (0, "")
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            level = (index / "level").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size[:-1].isdigit():
            continue
        nbytes = int(size[:-1]) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        best = max(best, (nbytes, f"sysfs L{level}"))
    return best if best[0] else (DEFAULT_CPU_CACHE_BYTES, "default")


def cache_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, source) of the last-level cache a timed call could find its data in: the GPU's L2
    (torch's L2_cache_size) or the CPU's largest cache (sysfs); a conservative default when not reported."""
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        return (size, "L2_cache_size") if size > 0 else (DEFAULT_CUDA_CACHE_BYTES, "default")
    return _cpu_cache_bytes()


def pool_members(touched_bytes: int, cache: int, *, member_bytes: int, budget_bytes: int) -> int:
    """How many copies of the data to cycle through so that between two uses of one copy at least
    POOL_MARGIN x `cache` bytes of the others were touched: 1 when one call alone touches that much, else
    ceil(POOL_MARGIN * cache / touched_bytes) + 1, capped by POOL_MAX_MEMBERS and by the copies that fit
    `budget_bytes` (member_bytes each; capped, the pool is partial, see cache_record)."""
    need = POOL_MARGIN * cache
    touched = max(int(touched_bytes), 1)
    if touched >= need:
        return 1
    wanted = math.ceil(need / touched) + 1
    fit = max(1, int(budget_bytes) // max(int(member_bytes), 1))
    return max(1, min(wanted, POOL_MAX_MEMBERS, fit))


def cache_record(timer_cache: str, touched_bytes: int, cache: tuple[int, str], members: int) -> dict:
    """The `cache` field of a result row: how the timed call was kept from finding its data cached, from the
    timer's own account (Timing.cache), the bytes one call touches, cache_bytes() and the pool's size.

    method: "l2_flush" (the timer flushed before each call), "exceeds_cache" (one call touches
    POOL_MARGIN x the cache), "pool" (cycled through `members` copies, (members - 1) x touched_bytes >= that),
    "pool-partial" (fewer copies than that: partly cache-resident) or "resident" (no flush, no pool).
    cold: whether the data of a timed call was out of the cache by this account."""
    size, source = cache
    need = POOL_MARGIN * size
    if timer_cache == "l2_flush":
        method = "l2_flush"
    elif touched_bytes >= need:
        method = "exceeds_cache"
    elif timer_cache == "cycled":
        method = "pool" if (members - 1) * touched_bytes >= need else "pool-partial"
    else:
        method = "resident"
    members = members if timer_cache == "cycled" else 1
    return {"method": method, "cold": method in ("l2_flush", "exceeds_cache", "pool"), "cache_bytes": size,
            "cache_source": source, "touched_bytes": int(touched_bytes), "pool_members": members,
            "pool_touched_bytes": int(touched_bytes) * members}


def copy_bandwidth(device: torch.device, cfg: TimingConfig = TimingConfig(), *, nbytes: int | None = None) -> dict:
    """GB/s of a plain torch copy of a large buffer (read + write counted), measured in this run."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, cfg)
    moved = 2 * src.numel() * src.element_size()
    return {"copy_gbps": moved / (t.median_ms * 1e-3) / 1e9, "copy_bytes": moved, "copy_ms": t.median_ms}


def launch_floor(device: torch.device, cfg: TimingConfig = TimingConfig()) -> dict:
    """The time of the cheapest possible op (one element add): the floor any single launch pays.

    On CUDA both as a graph replay (device-side floor) and as an eager launch (host-side floor)."""
    buf = torch.zeros(1, device=device)
    fn = lambda: buf.add_(1.0)  # noqa: E731
    eager = time_fn(fn, device, cfg)
    out = {"launch_floor_ms": eager.median_ms}
    if device.type == "cuda":
        graph = time_fn(fn, device, cfg, cuda_graph=True)
        out["launch_floor_graph_ms"] = graph.median_ms
    return out

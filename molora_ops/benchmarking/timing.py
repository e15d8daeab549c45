"""Timers that report the median with p20 and p80, in milliseconds.

CPU: ``time.thread_time`` (one torch thread) or ``time.perf_counter`` around single calls, after warmup, repeated until both a minimum count and a
minimum total time are reached. CUDA: ``triton.testing.do_bench`` (it flushes L2 between calls) or, for
decode sizes and graph-safe callables, ``triton.testing.do_bench_cudagraph``, which replays a CUDA graph of
unrolled calls so that host launch overhead is excluded; without triton, CUDA events around single calls.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


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

    def as_dict(self) -> dict:
        return asdict(self)


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(samples_ms), q[1], q[7]


def _time_cpu(fn: Callable[[], object], cfg: TimingConfig) -> Timing:
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
    return Timing(med, p20, p80, len(samples), name)


def _time_cuda_events(fn: Callable[[], object], cfg: TimingConfig) -> Timing:
    for _ in range(cfg.warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    while len(samples) < max(cfg.min_reps, 10) or (sum(samples) < cfg.cuda_rep_ms and len(samples) < 1000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    med, p20, p80 = _quantiles(samples)
    return Timing(med, p20, p80, len(samples), "cuda_events")


def time_fn(fn: Callable[[], object], device: torch.device, cfg: TimingConfig = TimingConfig(), *,
            cuda_graph: bool = False) -> Timing:
    """Time `fn` (which must do all its work on `device`) and return median / p20 / p80 in ms.

    cuda_graph=True asks for CUDA-graph replay (decode sizes); callables that sync with the host cannot be
    captured, so the caller passes True only for graph-safe ones, and a failed capture falls back to
    do_bench, which the returned `timer` field records.
    """
    if device.type != "cuda":
        return _time_cpu(fn, cfg)
    try:
        import triton.testing as tt
    except Exception:
        return _time_cuda_events(fn, cfg)
    quantiles = [0.5, 0.2, 0.8]
    if cuda_graph:
        try:
            med, p20, p80 = tt.do_bench_cudagraph(fn, rep=max(cfg.cuda_rep_ms // 5, 5), quantiles=quantiles)
            return Timing(med, p20, p80, 10, "cuda_graph")
        except Exception:
            torch.cuda.synchronize()  # the failed capture is discarded; time it without a graph
    med, p20, p80 = tt.do_bench(fn, warmup=25, rep=cfg.cuda_rep_ms, quantiles=quantiles)
    return Timing(med, p20, p80, 0, "do_bench")


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

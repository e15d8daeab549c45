"""Routed-LoRA benchmark inputs and the minimum bytes / FLOPs model.

Traffic patterns follow punica's adapter-popularity cases:
    identical  every token uses the same K adapters
    distinct   token t uses adapters t*K .. t*K+K-1 (mod N): as many different adapters as possible
    uniform    ids drawn uniformly from [0, N)
    skewed     80% of draws hit adapter 0, the rest uniform
    zipf       adapter popularity proportional to 1 / (rank + 1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

TRAFFIC_PATTERNS = ("identical", "distinct", "uniform", "skewed", "zipf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OpsConfig:
    """One point of the kernel sweep."""

    T: int
    N: int = 32
    K: int = 2
    R: int = 16
    H_in: int = 4096
    H_out: int = 4096
    dtype: str = "bfloat16"
    pattern: str = "uniform"
    empty_frac: float = 0.0  # fraction of slots set to -1 (no adapter)
    ranks: tuple = ()        # real ranks of the adapters, cycled over the N of them, each <= R (storage is
                             # zero-padded to R); () means every adapter has rank R
    seed: int = 0
    sweeps: tuple = field(default=(), compare=False)  # which named sweeps this point belongs to

    def key(self) -> tuple:
        d = asdict(self)
        d.pop("sweeps")
        return tuple(d.items())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sweeps"] = list(self.sweeps)
        d["ranks"] = list(self.ranks)
        return d

    def adapter_ranks(self) -> list[int]:
        """The real rank of each of the N adapters."""
        if not self.ranks:
            return [self.R] * self.N
        if not all(0 <= r <= self.R for r in self.ranks):
            raise ValueError(f"ranks must each lie in [0, R={self.R}], got {self.ranks}")
        return [self.ranks[e % len(self.ranks)] for e in range(self.N)]


def routing_ids(T: int, K: int, N: int, pattern: str, generator: torch.Generator) -> torch.Tensor:
    """[T, K] int64 adapter ids following a punica traffic pattern."""
    shape = (T, K)
    if pattern == "identical":
        row = torch.randperm(N, generator=generator)[:K]
        if K > N:
            row = row.repeat((K + N - 1) // N)[:K]
        return row.expand(shape).clone()
    if pattern == "distinct":
        return (torch.arange(T * K) % N).view(shape)
    if pattern == "uniform":
        return torch.randint(0, N, shape, generator=generator)
    if pattern == "skewed":
        hot = torch.rand(shape, generator=generator) < 0.8
        return torch.where(hot, torch.zeros(shape, dtype=torch.int64), torch.randint(0, N, shape, generator=generator))
    if pattern == "zipf":
        probs = 1.0 / torch.arange(1, N + 1, dtype=torch.float64)
        return torch.multinomial(probs / probs.sum(), T * K, replacement=True, generator=generator).view(shape)
    raise ValueError(f"unknown traffic pattern {pattern!r}; expected one of {TRAFFIC_PATTERNS}")


@dataclass
class Problem:
    x: torch.Tensor             # [T, H_in]
    lora_a: torch.Tensor        # [N, R, H_in]
    lora_b: torch.Tensor        # [N, H_out, R]
    topk_ids: torch.Tensor      # [T, K] int64, -1 = empty
    topk_weights: torch.Tensor  # [T, K] float32
    scaling: torch.Tensor       # [N] float32
    base_weight: torch.Tensor   # [H_out, H_in]: the frozen projection the LoRA delta is added to
    ranks: torch.Tensor | None = None  # [N] int32 real ranks when cfg.ranks is set (lora_a/lora_b zero beyond)


def make_problem(cfg: OpsConfig, device: torch.device) -> Problem:
    """Random inputs with O(1) outputs, drawn on CPU from cfg.seed (the same data on every device)."""
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    ids = routing_ids(cfg.T, cfg.K, cfg.N, cfg.pattern, g)
    if cfg.empty_frac:
        ids[torch.rand(ids.shape, generator=g) < cfg.empty_frac] = -1
    x = torch.randn(cfg.T, cfg.H_in, generator=g)
    a = torch.randn(cfg.N, cfg.R, cfg.H_in, generator=g) / cfg.H_in**0.5
    b = torch.randn(cfg.N, cfg.H_out, cfg.R, generator=g) / cfg.R**0.5
    w = torch.rand(cfg.T, cfg.K, generator=g) + 0.05
    s = torch.rand(cfg.N, generator=g) + 0.5
    base = torch.randn(cfg.H_out, cfg.H_in, generator=g) / cfg.H_in**0.5
    ranks = None
    if cfg.ranks:
        ranks = torch.tensor(cfg.adapter_ranks(), dtype=torch.int32)
        live = torch.arange(cfg.R)[None, :] < ranks[:, None]  # [N, R]: the padding is exact zeros
        a, b = a * live[:, :, None], b * live[:, None, :]
        ranks = ranks.to(device)
    return Problem(
        x.to(device, dtype), a.to(device, dtype), b.to(device, dtype), ids.to(device), w.to(device),
        s.to(device), base.to(device, dtype), ranks,
    )


def cost_model(cfg: OpsConfig, topk_ids: torch.Tensor) -> dict:
    """The minimum bytes any implementation must move and the FLOPs it must do, at each adapter's real rank
    r_e (cfg.adapter_ranks(); R when not set): an implementation that runs every loop to the padded R does
    more than this.

    bytes: x read once, each *active* adapter's A and B (r_e rows) read once, the output written once, ids
    and weights read once. flops: 2 * r_e * (H_in + H_out) per routed (non-empty) (token, slot) pair.
    """
    es = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    ids = topk_ids.cpu()
    ranks = torch.tensor(cfg.adapter_ranks(), dtype=torch.int64)
    routed_ids = ids[ids >= 0]
    routed = int(routed_ids.numel())
    active = torch.unique(routed_ids)
    weight_bytes = int(ranks[active].sum()) * (cfg.H_in + cfg.H_out) * es
    io_bytes = cfg.T * (cfg.H_in + cfg.H_out) * es + cfg.T * cfg.K * (ids.element_size() + 4)
    return {
        "bytes": weight_bytes + io_bytes,
        "flops": 2 * int(ranks[routed_ids].sum()) * (cfg.H_in + cfg.H_out),
        "active_adapters": int(active.numel()),
        "routed_pairs": routed,
        "base_gemm_flops": 2 * cfg.T * cfg.H_in * cfg.H_out,
        "base_gemm_bytes": (cfg.T * (cfg.H_in + cfg.H_out) + cfg.H_in * cfg.H_out) * es,
    }


def pool_member(p: Problem, shift: int) -> Problem:
    """Another copy of `p` for a cache pool (molora_ops.benchmarking.timing.pool_members): x, lora_a and
    lora_b rolled by `shift` (token rows and adapters), each in fresh memory, so the member's output differs
    from p's and must be computed from its own data; routing, weights, scaling and the base weight are shared
    (tiny, or not read by the providers)."""
    ranks = None if p.ranks is None else p.ranks.roll(shift, 0)
    return Problem(p.x.roll(shift, 0), p.lora_a.roll(shift, 0), p.lora_b.roll(shift, 0), p.topk_ids,
                   p.topk_weights, p.scaling, p.base_weight, ranks)


def member_bytes(p: Problem) -> int:
    """Bytes one pool_member allocates."""
    return sum(t.numel() * t.element_size() for t in (p.x, p.lora_a, p.lora_b))

"""Tolerances, a mismatch-locating assert, and generators for routing traffic patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molora_ops.benchmarking.problems import TRAFFIC_PATTERNS, routing_ids  # noqa: F401 (re-exported)

# Absolute floor per output dtype, used on top of the flash-attention rule below. These are ceilings: a fast
# path must never be further than this from the exact (float64) answer, however loose plain PyTorch is.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "output"):
    """torch.testing-style check that reports the worst element, its index and how many elements failed."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        n_bad = int(bad.sum())
        idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if n_bad else ()
        worst = torch.nan_to_num(err - bound, nan=float("inf")).argmax()
        widx = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        raise AssertionError(
            f"{name}: {n_bad}/{err.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"first at {idx}: got {a[idx].item()} expected {e[idx].item()}; "
            f"worst at {widx}: got {a[widx].item()} expected {e[widx].item()}"
        )


def assert_parity(actual: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype, name="output"):
    """Flash-attention rule: the fast path's error against the exact answer is at most about twice plain
    PyTorch's error in the same precision (`lowp`), and never above the dtype's table entry."""
    tol = TOLERANCE[dtype]
    baseline = float((lowp.double().cpu() - exact.double().cpu()).abs().max()) if exact.numel() else 0.0
    atol = min(tol["atol"] + 2.0 * baseline, tol["atol"] * 4)
    assert_close(actual, exact, atol=atol, rtol=tol["rtol"], name=name)


@dataclass
class Problem:
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    scaling: torch.Tensor

    def to(self, device) -> "Problem":
        return Problem(*(t.to(device) for t in (self.x, self.lora_a, self.lora_b, self.topk_ids, self.topk_weights, self.scaling)))

    def exact(self):
        """The float64 reference answer of routed_lora (same inputs, upcast)."""
        from molora_ops import reference

        d = torch.float64
        return reference.routed_lora(
            self.x.to(d), self.lora_a.to(d), self.lora_b.to(d), self.topk_ids, self.topk_weights.to(d),
            scaling=self.scaling.to(d),
        )


def make_problem(
    num_tokens, top_k, num_adapters, rank, h_in, h_out, dtype, *, pattern="uniform", empty_frac=0.0,
    duplicate_frac=0.0, id_dtype=torch.int64, device="cpu",
) -> Problem:
    """Random, never-zero inputs scaled so outputs are O(1). A fraction of slots is set to -1, and a fraction
    of tokens gets the same adapter in two of its slots."""
    ids = routing_ids(num_tokens, top_k, num_adapters, pattern, generator=None)
    if duplicate_frac and top_k > 1:
        dup = torch.rand(num_tokens) < duplicate_frac
        ids[dup, 1] = ids[dup, 0]
    if empty_frac:
        ids[torch.rand(ids.shape) < empty_frac] = -1
    x = torch.randn(num_tokens, h_in)
    lora_a = torch.randn(num_adapters, rank, h_in) / h_in**0.5
    lora_b = torch.randn(num_adapters, h_out, rank) / rank**0.5
    weights = torch.rand(num_tokens, top_k) + 0.05
    scaling = torch.rand(num_adapters) + 0.5
    return Problem(
        x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), ids.to(id_dtype), weights, scaling
    ).to(device)


def edge_case_problem(shape, dtype, device="cpu") -> Problem:
    """make_problem(*shape) whose routing has, wherever T and K allow, an empty slot, a token with the same
    adapter in two slots, and always an adapter (N - 1) with no tokens: the gradient tests' grid."""
    T, K, N = shape[:3]
    p = make_problem(*shape, dtype, empty_frac=0.25, duplicate_frac=0.4)
    ids = p.topk_ids
    ids[ids == N - 1] = N - 2
    if T and K > 1:
        ids[0, 1] = ids[0, 0] = 0
    if T > 1:
        ids[-1, -1] = -1
    return p.to(device)


def naive_lowp(problem: Problem) -> torch.Tensor:
    """Plain PyTorch in the inputs' own precision (per-slot matmuls, sums in that dtype): the error yardstick
    for the flash-attention tolerance rule."""
    x, a, b, ids = problem.x, problem.lora_a, problem.lora_b, problem.topk_ids
    dtype = x.dtype
    out = torch.zeros(x.shape[0], b.shape[1], dtype=dtype, device=x.device)
    for k in range(ids.shape[1]):
        e = ids[:, k].clamp(min=0).long()
        coef = (problem.topk_weights[:, k] * problem.scaling[e] * (ids[:, k] >= 0)).to(dtype)
        h = torch.bmm(a[e], x[:, :, None])[..., 0] * coef[:, None]
        out = out + torch.bmm(b[e], h[:, :, None])[..., 0]
    return out

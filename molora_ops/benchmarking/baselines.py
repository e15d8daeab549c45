"""Benchmark providers: every one computes routed_lora's exact semantics (molora_ops/reference.py)

the way today's alternatives do it (DESIGN.md section 5):

    reference   molora_ops.reference: per-token gather of each adapter's weights, float32 (the oracle)
    peft-loop   PEFT's mixed batch: loop over the adapters present, mask the tokens routed to each, run
                lora_B(lora_A(x[tokens])) in the input dtype and add it, times the routing weight
    dense       X-LoRA / Arrow: every adapter computed for every token, then weighted (as two GEMMs over the
                concatenated adapters, the fastest dense form; X-LoRA itself loops over adapters)
    gather-bmm  per-token weight gather + bmm in the input dtype (punica's naive BGMV baseline)
    torch, triton, cuda   ours: molora_ops.routed_lora(backend=...)

A provider's `prepare(problem)` does the one-off work, untimed, and returns the callable that is timed: the
weight layout, and for ours the routing plan (built once per forward in a patched model and shared by its
layers). The baselines' own routing work (PEFT's unique/mask, the dense weight scatter) stays in the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .problems import DTYPES, OpsConfig, Problem

OURS = ("torch", "triton", "cuda")
BASELINES = ("reference", "peft-loop", "dense", "gather-bmm")


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str            # "ours" | "baseline" | "oracle"
    graph_safe: bool     # can be captured in a CUDA graph (no host syncs)
    prepare: Callable[[Problem], Callable[[], torch.Tensor]]
    workspace: Callable[[OpsConfig], int]  # bytes of temporaries, to skip points that cannot fit

    @property
    def label(self) -> str:
        return f"ours ({self.name})" if self.kind == "ours" else self.name


def _es(cfg: OpsConfig) -> int:
    return torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()


# --------------------------------------------------------------------------------------------- reference
def _prepare_reference(p: Problem):
    from molora_ops import reference

    return lambda: reference.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling)


def _ws_reference(cfg: OpsConfig) -> int:  # float32 copies of the gathered A and B
    return cfg.T * cfg.K * cfg.R * (cfg.H_in + cfg.H_out) * 4 + cfg.N * cfg.R * (cfg.H_in + cfg.H_out) * 4


# --------------------------------------------------------------------------------------------- peft-loop
def _prepare_peft_loop(p: Problem):
    x, a, b, ids, w, s = p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling

    def run():
        out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
        # PEFT: `for active_adapter in set(adapter_names)`, then the tokens of that adapter as a sub-batch
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            hit = ids == e                                   # [T, K]
            rows = hit.any(dim=1).nonzero().squeeze(1)       # tokens routed to adapter e
            coef = (w * hit).sum(dim=1)[rows] * s[e]         # their routing weight times alpha / r
            y = (x[rows] @ a[e].t()) @ b[e].t()              # lora_B(lora_A(sub_batch)), input dtype
            out.index_add_(0, rows, y * coef[:, None].to(x.dtype))
        return out

    return run


def _ws_peft_loop(cfg: OpsConfig) -> int:
    return cfg.T * (cfg.H_in + 2 * cfg.H_out) * _es(cfg)


# ------------------------------------------------------------------------------------------------- dense
def _prepare_dense(p: Problem):
    n, r, h_in = p.lora_a.shape
    h_out = p.lora_b.shape[1]
    a_cat = p.lora_a.reshape(n * r, h_in)                                  # [N*R, H_in]
    b_cat = p.lora_b.permute(1, 0, 2).reshape(h_out, n * r).contiguous()  # [H_out, N*R]
    x, ids, w, s = p.x, p.topk_ids, p.topk_weights, p.scaling

    def run():
        # X-LoRA's scalings: a dense [T, N] weight per adapter, zero where the adapter was not routed
        dense_w = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
        dense_w.scatter_add_(1, ids.clamp(min=0), w.float() * (ids >= 0))
        coef = (dense_w * s).to(x.dtype).repeat_interleave(r, dim=1)       # [T, N*R]
        return ((x @ a_cat.t()) * coef) @ b_cat.t()

    return run


def _ws_dense(cfg: OpsConfig) -> int:
    return 3 * cfg.T * cfg.N * cfg.R * 4 + cfg.N * cfg.R * cfg.H_out * _es(cfg)


# -------------------------------------------------------------------------------------------- gather-bmm
def _prepare_gather_bmm(p: Problem):
    x, a, b, ids, w, s = p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling
    t, k = ids.shape

    def run():
        flat = ids.reshape(-1)
        e = flat.clamp(min=0)
        coef = (w.reshape(-1) * s[e] * (flat >= 0)).to(x.dtype)           # [P]
        xs = x.repeat_interleave(k, dim=0).unsqueeze(2)                    # [P, H_in, 1]
        h = torch.bmm(a[e], xs) * coef[:, None, None]                      # [P, R, 1]
        y = torch.bmm(b[e], h)                                             # [P, H_out, 1]
        return y.view(t, k, -1).sum(dim=1)

    return run


def _ws_gather_bmm(cfg: OpsConfig) -> int:
    return cfg.T * cfg.K * (cfg.R * (cfg.H_in + cfg.H_out) + cfg.H_in + cfg.H_out) * _es(cfg)


# -------------------------------------------------------------------------------------------------- ours
def prepare_ours(backend: str, **op_kwargs):
    """A prepare for molora_ops.routed_lora(backend=...): the routing plan is built here, untimed, as a
    patched model builds one per forward and shares it across its layers; the timed call reuses it.
    op_kwargs are passed to every call (e.g. ranks=)."""
    def prepare(p: Problem):
        import molora_ops

        plan = molora_ops.build_plan(p.topk_ids, p.lora_a.shape[0])

        def run():
            return molora_ops.routed_lora(
                p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling, backend=backend, plan=plan,
                validate=False, **op_kwargs,
            )

        return run

    return prepare


def _ws_ours(cfg: OpsConfig) -> int:
    return cfg.T * cfg.H_out * 4 + cfg.T * cfg.K * cfg.R * 4


BASELINE_PROVIDERS = {
    "reference": Provider("reference", "oracle", False, _prepare_reference, _ws_reference),
    "peft-loop": Provider("peft-loop", "baseline", False, _prepare_peft_loop, _ws_peft_loop),
    "dense": Provider("dense", "baseline", True, _prepare_dense, _ws_dense),
    "gather-bmm": Provider("gather-bmm", "baseline", True, _prepare_gather_bmm, _ws_gather_bmm),
}


def backend_status() -> dict[str, dict]:
    """molora_ops.backends(), tolerating backends whose modules are not there yet (each is asked alone)."""
    import molora_ops
    from molora_ops import impl

    try:
        return molora_ops.backends()
    except Exception:
        pass
    report = {}
    for name in impl.BACKENDS:
        try:
            if name == "torch":
                compiled, available, reason = True, True, "plain PyTorch"
            else:
                compiled, available, reason = impl.get(name).status()
        except Exception as exc:
            compiled, available, reason = False, False, f"{type(exc).__name__}: {exc}"
        report[name] = {"available": available, "compiled": compiled, "reason": reason}
    return report


def our_providers(device: torch.device, *, interpreted: bool = False) -> tuple[dict[str, Provider], dict[str, str]]:
    """Our backends that can be timed on `device`, and the reason each other one is left out.
    interpreted=True keeps triton on CPU when TRITON_INTERPRET=1 is set: for checking, never for timing."""
    providers, skipped = {}, {}
    for name, st in backend_status().items():
        if not st["available"]:
            skipped[name] = f"not available: {st['reason']}"
        elif name == "triton" and device.type != "cuda" and not interpreted:
            skipped[name] = "triton on CPU runs only under TRITON_INTERPRET=1, far too slow to time"
        elif name == "cuda" and device.type != "cuda":
            skipped[name] = "needs a CUDA device"
        else:
            # torch syncs on the host to list active adapters, so it cannot be graph-captured
            providers[name] = Provider(name, "ours", name != "torch", prepare_ours(name), _ws_ours)
    return providers, skipped


def all_providers(device: torch.device, names: list[str] | None = None, *, interpreted: bool = False
                  ) -> tuple[dict[str, Provider], dict[str, str]]:
    """Baselines then ours, optionally restricted to `names`; plus the reasons for any left out."""
    ours, skipped = our_providers(device, interpreted=interpreted)
    providers = {**BASELINE_PROVIDERS, **ours}
    if names:
        unknown = set(names) - set(providers) - set(skipped)
        if unknown:
            raise ValueError(f"unknown provider(s) {sorted(unknown)}; known: {sorted(set(providers) | set(skipped))}")
        providers = {n: p for n, p in providers.items() if n in names}
        skipped = {n: r for n, r in skipped.items() if n in names}
    return providers, skipped

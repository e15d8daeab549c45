"""``molora bench --suite train``: forward + backward of routed LoRA, ours against dense and the PEFT loop.

Three kinds of point, each timed with its providers interleaved in one process (one call of each provider per round,
rounds repeated; medians with p20/p80 per provider), since the machine is shared and noisy:

  layer   one patched projection, y = x W^T + sum_k w[t,k] s B_e A_e x[t] (N adapters, top-k per token), and the
          backward of a random linear functional of y w.r.t. x, A, B and the routing weights (joint training);
  delta   the same without the base projection (y = the adapter term alone): the op's own cost, which the base
          GEMM (the same for every provider, T*H*H per pass) does not dilute;
  model   a small GPT-2 with N adapters on c_attn/c_fc/c_proj and a TokenRouter at block 0: the next-token loss
          and its backward w.r.t. the router (the X-LoRA setting: base and adapters frozen).

Providers:
  ours       the registered ops (molora_ops.routed_lora / mo.patch): grouped by adapter, top-k pairs only, the
             routing plan built once per forward (outside the timed region for the layer point, as a patched
             model builds it once per forward and shares it across layers);
  dense      every adapter computed for every token, then weighted (X-LoRA, dense soft merging), as batched einsums;
  peft-loop  one masked matmul pair per adapter over the tokens routed to it (PEFT's mixed batch loop).

Every provider's output (layer, delta: y; model: the loss) and gradients are checked against ours before timing
(float32, relative 1e-4 of each one's largest element);
a mismatch is recorded as status "wrong". Records go to bench/results/train-<device>.jsonl with the environment.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

__all__ = ["LayerPoint", "DeltaPoint", "ModelPoint", "GRIDS", "grid", "run_train", "TARGETS", "check_targets"]

PROVIDERS = ("ours", "dense", "peft-loop")


@dataclass(frozen=True)
class LayerPoint:
    hidden: int
    tokens: int = 512
    adapters: int = 8
    top_k: int = 2
    rank: int = 16
    kind: str = "layer"


@dataclass(frozen=True)
class DeltaPoint(LayerPoint):
    """A LayerPoint without the base projection."""

    kind: str = "delta"


@dataclass(frozen=True)
class ModelPoint:
    hidden: int
    layers: int = 2
    batch: int = 4
    seq: int = 128
    adapters: int = 8
    top_k: int = 2
    rank: int = 16
    vocab: int = 2048
    kind: str = "model"


@dataclass(frozen=True)
class Grid:
    points: tuple
    rounds: int = 15
    warmup: int = 2
    threads: int = 2
    providers: tuple = field(default=PROVIDERS)


GRIDS = {
    "smoke": Grid((LayerPoint(hidden=48, tokens=37, adapters=5, rank=4), DeltaPoint(hidden=48, tokens=37, adapters=5, rank=4),
                   ModelPoint(hidden=32, layers=1, batch=2, seq=9,
                                                                               adapters=3, rank=4, vocab=64)),
                  rounds=2, warmup=1, threads=1),
    "cpu": Grid((LayerPoint(hidden=512), LayerPoint(hidden=1024), DeltaPoint(hidden=512), DeltaPoint(hidden=1024),
                 ModelPoint(hidden=256), ModelPoint(hidden=512))),
    # the same points for bench/gpu_check.sh quick (a CUDA device; add a step running `--suite train --grid gpu-quick`)
    "gpu-quick": Grid((LayerPoint(hidden=512), LayerPoint(hidden=1024), LayerPoint(hidden=4096, tokens=4096),
                       ModelPoint(hidden=256), ModelPoint(hidden=512)), rounds=20, threads=0),
}
GRIDS["gpu"] = GRIDS["gpu-quick"]

# the targets: ours vs dense, CPU forward + backward, top-2 of 8 (evaluated on layer and delta points)
TARGETS = {512: 1.5, 1024: 2.0}


def grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"train grid must be one of {sorted(GRIDS)}, got {name!r}")
    return GRIDS[name]


# ------------------------------------------------------------------------------------------- routed math
def _routing(t: int, n: int, k: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k of N (distinct ids, skewed popularity) and renormalised weights."""
    logits = torch.randn(t, n, generator=gen) + torch.linspace(1.0, 0.0, n)
    vals, ids = torch.softmax(logits, -1).topk(k, -1)
    return ids.to(device), (vals / vals.sum(-1, keepdim=True)).to(device)


def dense_delta(x, lora_a, lora_b, topk_ids, topk_weights, scaling):
    """Every adapter for every token, weighted: sum_n W[t,n] s_n B_n A_n x[t] with W the top-k weights scattered
    to [T, N] (0 for unchosen adapters; -1 slots dropped)."""
    n = lora_a.shape[0]
    live = topk_ids >= 0
    dense_w = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device).scatter_add(
        1, topk_ids.clamp_min(0), topk_weights.to(x.dtype) * live)
    h = torch.einsum("th,nrh->tnr", x, lora_a)
    return torch.einsum("tnr,nor->to", h * (dense_w * scaling)[..., None], lora_b)


def peft_loop_delta(x, lora_a, lora_b, topk_ids, topk_weights, scaling):
    """PEFT's mixed-batch loop generalised to top-k: per adapter, the tokens routed to it (any slot), one matmul
    pair, weighted, added back."""
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    for e in range(lora_a.shape[0]):
        coef = (topk_weights * (topk_ids == e)).sum(-1)
        rows = torch.nonzero(coef, as_tuple=True)[0]
        if rows.numel():
            d = (x[rows] @ lora_a[e].t()) @ lora_b[e].t()
            out = out.index_add(0, rows, d * (coef[rows] * scaling[e])[:, None].to(x.dtype))
    return out


# ------------------------------------------------------------------------------------------- layer points
def _layer_setup(p: LayerPoint, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p.tokens, p.hidden, generator=gen).to(device)
    w = (torch.randn(p.hidden, p.hidden, generator=gen) / p.hidden ** 0.5).to(device)
    a = (torch.randn(p.adapters, p.rank, p.hidden, generator=gen) / p.hidden ** 0.5).to(device)
    b = (torch.randn(p.adapters, p.hidden, p.rank, generator=gen) / p.rank ** 0.5).to(device)
    s = torch.rand(p.adapters, generator=gen).add(0.5).to(device)
    ids, tw = _routing(p.tokens, p.adapters, p.top_k, gen, device)
    dy = torch.randn(p.tokens, p.hidden, generator=gen).to(device)
    return x, w, a, b, s, ids, tw, dy


def layer_providers(p: LayerPoint, device, seed: int = 0) -> dict[str, Callable[[], tuple]]:
    """{provider: fn() -> (y, dx, dA, dB, dweights)} for one forward + backward (of the loss sum(y * dy)) of the
    point's layer (a delta point: of the adapter term alone). y, not the loss, is returned for the checks: a sum
    that cancels has no useful relative error."""
    from ..ops import routed_lora
    from ..runtime import RoutedBatch

    x, w, a, b, s, ids, tw, dy = _layer_setup(p, device, seed)
    leaves = tuple(t.requires_grad_(True) for t in (x, a, b, tw))  # reused: autograd.grad accumulates nothing
    routed = RoutedBatch.build(ids, tw, p.adapters)  # the plan, once (a patched model: once per forward)
    routed.plan  # built here, outside the timed calls

    def run(delta_fn):
        def fn():
            y = delta_fn(*leaves)
            loss = (y * dy).sum()
            # T = 0: the loop never touches A, B (nor, without the base projection, anything)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else (None,) * 4
            return (y.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)))
        return fn

    with_base = p.kind == "layer"

    def ours(xs, as_, bs, ws):
        if with_base:  # as a patched projection adds it (the registered training op, base output as `out`)
            return routed.add_(xs, as_, bs, xs @ w.t(), scale=s)
        return routed_lora(xs, as_, bs, ids, ws, scaling=s, backend=routed.backend, plan=routed.plan,
                           validate=False)

    def added(delta_fn):
        def fn(xs, as_, bs, ws):
            d = delta_fn(xs, as_, bs, ids, ws, s)
            return xs @ w.t() + d if with_base else d
        return fn

    return {"ours": run(ours), "dense": run(added(dense_delta)), "peft-loop": run(added(peft_loop_delta))}


# ------------------------------------------------------------------------------------------- model points
def _tiny_gpt2(p: ModelPoint, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=p.vocab, n_positions=max(p.seq, 16), n_embd=p.hidden, n_layer=p.layers,
                     n_head=max(1, p.hidden // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def _model_adapters(model, p: ModelPoint, seed: int) -> dict:
    """N in-memory PEFT-format adapters (config, state_dict) with random A and B on c_attn/c_fc/c_proj."""
    from peft import LoraConfig

    gen = torch.Generator().manual_seed(seed)
    cfg = LoraConfig(r=p.rank, lora_alpha=2 * p.rank, target_modules=["c_attn", "c_fc", "c_proj"],
                     fan_in_fan_out=True)
    out = {}
    for i in range(p.adapters):
        state = {}
        for name, mod in model.named_modules():
            if name.rpartition(".")[2] in ("c_attn", "c_fc", "c_proj"):
                nx, nf = int(mod.nx), int(mod.nf)
                state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(p.rank, nx, generator=gen) / nx ** 0.5
                state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(nf, p.rank, generator=gen) * 0.02
        out[f"a{i}"] = (cfg, state)
    return out


def _hooked(model, adapters: dict, router, top_k: int, delta_fn):
    """`model` with forward hooks adding delta_fn(x, A, B, ids, weights, scaling) to every adapted projection, the
    routing from `router` on block 0's input (top-k, renormalised). Returns the hook handles."""
    from ..hf.peft_io import load_adapter

    names = list(adapters)
    loaded = {n: load_adapter(n, src) for n, src in adapters.items()}
    current = {}
    blocks = model.transformer.h

    def route(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        ids, wts = router.select(router(h), top_k)
        current["ids"], current["w"] = ids.reshape(-1, top_k), wts.reshape(-1, top_k)

    handles = [blocks[0].register_forward_pre_hook(route, with_kwargs=True)]
    for mod_name in loaded[names[0]].modules:
        mod = model.get_submodule(mod_name)
        a = torch.stack([loaded[n].modules[mod_name].lora_a for n in names]).to(model.device)
        b = torch.stack([loaded[n].modules[mod_name].lora_b for n in names]).to(model.device)
        s = torch.tensor([loaded[n].modules[mod_name].scaling for n in names], device=model.device)

        def hook(module, inp, out, a=a, b=b, s=s):
            x = inp[0].reshape(-1, a.shape[2])
            return out + delta_fn(x, a, b, current["ids"], current["w"], s).view(out.shape)

        handles.append(mod.register_forward_hook(hook))
    return handles


def model_providers(p: ModelPoint, device, seed: int = 0) -> dict[str, Callable[[], tuple]]:
    """{provider: fn() -> (loss, *router grads)} for the next-token loss of a batch and its backward w.r.t. the
    router (base and adapters frozen)."""
    import copy

    import molora_ops as mo

    torch.manual_seed(seed)
    base = _tiny_gpt2(p, device)
    adapters = _model_adapters(base, p, seed)
    router = mo.TokenRouter(p.hidden, list(adapters)).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, p.vocab, (p.batch, p.seq), generator=gen).to(device)
    ours_model = mo.patch(copy.deepcopy(base), adapters=adapters, router=router, top_k=p.top_k)
    params = list(router.parameters())
    models = {"ours": ours_model}
    for name, fn in (("dense", dense_delta), ("peft-loop", peft_loop_delta)):
        m = copy.deepcopy(base)
        _hooked(m, adapters, router, p.top_k, fn)
        models[name] = m

    def run(model):
        def fn():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            return (loss.detach(), *torch.autograd.grad(loss, params))
        return fn

    return {name: run(m) for name, m in models.items()}


# ------------------------------------------------------------------------------------------------ running
def _check(ref: tuple, got: tuple) -> float:
    """Max relative error of got against ref over the output and every gradient (relative to each one's scale)."""
    worst = 0.0
    for r, g in zip(ref, got):
        if r.numel() == 0:
            continue
        scale = float(r.abs().max()) or 1.0
        worst = max(worst, float((r - g).abs().max()) / scale)
    return worst


def _interleaved(fns: dict, rounds: int, warmup: int, sync) -> dict[str, list[float]]:
    samples = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p20_ms": s[int(0.2 * (len(s) - 1))],
            "p80_ms": s[int(0.8 * (len(s) - 1))], "n": len(s)}


def run_train(g: Grid, device: torch.device, *, grid_name: str, providers=None, progress=None) -> list[dict]:
    """Run every point of grid `g`; one record per (point, provider)."""
    from .env import environment

    threads = g.threads
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    env = environment(device)
    run_id = f"{env['timestamp']}-train"
    chosen = [p for p in (providers or g.providers) if p in PROVIDERS]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    records = []
    for point in g.points:
        make = model_providers if point.kind == "model" else layer_providers
        fns = {k: v for k, v in make(point, device).items() if k in chosen or k == "ours"}
        ref = fns["ours"]()
        status = {}
        for name, fn in fns.items():
            err = _check(ref, fn())
            status[name] = ("ok" if err <= 1e-4 else "wrong", err)
        samples = _interleaved(fns, g.rounds, g.warmup, sync)
        tokens = point.batch * point.seq if point.kind == "model" else point.tokens
        for name in fns:
            if name not in chosen:
                continue
            st = _stats(samples[name])
            records.append({"suite": "train", "grid": grid_name, "run_id": run_id, "env": env, "kind": point.kind,
                            "config": asdict(point), "provider": name, "status": status[name][0],
                            "max_rel_err_vs_ours": status[name][1], "time": st,
                            "tokens_per_s": tokens / (st["median_ms"] / 1e3),
                            "speedup_vs": {other: statistics.median(samples[other]) / st["median_ms"]
                                           for other in fns if other != name}})
        if progress:
            progress(f"{point.kind} h={point.hidden}")
    return records


def check_targets(records: list[dict]) -> dict:
    """{f"{kind} h={h}": (ours' speedup over dense, target, met)} for the issue's CPU targets, per layer and delta
    point."""
    out = {}
    for r in records:
        h = r["config"]["hidden"]
        if r["provider"] == "ours" and r["kind"] in ("layer", "delta") and h in TARGETS and r["config"]["adapters"] == 8 \
                and r["config"]["top_k"] == 2:
            x = r["speedup_vs"].get("dense")
            if x is not None:
                out[f"{r['kind']} h={h}"] = (x, TARGETS[h], x >= TARGETS[h])
    return out


def format_table(records: list[dict]) -> str:
    lines = [f"{'point':<34}{'provider':<11}{'median ms':>10}{'p20':>9}{'p80':>9}{'tokens/s':>11}  its time / ours"]
    for r in records:
        c = r["config"]
        if r["kind"] != "model":
            label = f"{r['kind']} h={c['hidden']} T={c['tokens']} N={c['adapters']} k={c['top_k']} r={c['rank']}"
        else:
            label = f"model h={c['hidden']} L={c['layers']} {c['batch']}x{c['seq']} N={c['adapters']} k={c['top_k']}"
        t = r["time"]
        rel = ""
        if r["provider"] != "ours":
            ours = next(o for o in records if o["config"] == c and o["provider"] == "ours")
            rel = f"{t['median_ms'] / ours['time']['median_ms']:.2f}x"
        flag = "" if r["status"] == "ok" else f"  {r['status'].upper()} ({r['max_rel_err_vs_ours']:.1e})"
        lines.append(f"{label:<34}{r['provider']:<11}{t['median_ms']:>10.2f}{t['p20_ms']:>9.2f}{t['p80_ms']:>9.2f}"
                     f"{r['tokens_per_s']:>11.0f}  {rel}{flag}")
    return "\n".join(lines)

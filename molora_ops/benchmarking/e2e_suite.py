"""End-to-end: a random-init Llama-style model with N LoRA adapters on every linear projection.

One run times every variant against the same base model, in one process, at every point:

    prefill  one forward over a (batch x seq) prompt writing a static KV cache, logits of the last position
    decode   one KV-cached step at position `decode_context`, batch 1, 8 and 32

Variants (eager; the ones in COMPILED_VARIANTS also as torch.compile(fullgraph=True, dynamic=False)):

    base         the model without adapters
    ours-topk    mo.patch + model(..., adapter_weights=W [B, S, N]): per-token top-k routing given per call
    ours-router  mo.patch(..., router=TokenRouter(...), top_k=k), no routing argument: the router routes
    ours-names   mo.patch + model(..., adapter_names=[...]): one adapter per sequence
    peft-mixed   PEFT with all N adapters loaded, model(..., adapter_names=[...]) (PEFT's mixed batch)
    dense        every adapter computed for every token, then weighted per token (X-LoRA / Arrow), as two
                 GEMMs per projection over the concatenated adapters, with the same weights W as ours-topk

Every timed call is one forward with HF's StaticCache followed by `cache.crop(-new_tokens)`, so each call
sees the same cache length and a compiled decode step does not recompile. Each variant's first call at a
point is checked against the same function computed densely in float32 (`truth`): a variant that disagrees
is recorded as "wrong" and not timed there. A compiled variant that cannot be traced with fullgraph=True
is recorded as "graph_breaks" with dynamo's break count and reasons, never with a time.

Timing interleaves all variants of a point (eager and compiled) round by round, with the point's thread
count set explicitly (prefill and decode each have their own); each record holds median, p20 and p80 and its
time over the base model's time in the same mode at the same point.
"""

from __future__ import annotations

import copy
import functools
import inspect
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .env import environment
from .timing import TimingConfig, cache_bytes, cache_record, time_fn

SCHEMA = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base", "ours-topk", "ours-router", "ours-names", "peft-mixed", "dense")
COMPILED_VARIANTS = ("base", "ours-topk", "ours-router", "ours-names")
MODES = ("eager", "compiled")
# max |logit diff| / max |logit| against the float32 truth, on top of 3x the base model's own precision error
VERIFY_TOL = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 5e-2}
DEFAULT_TIMING = TimingConfig(warmup=1, min_reps=7, max_reps=40, min_time_s=2.0)


@dataclass(frozen=True)
class E2EConfig:
    """The model, the adapters and the points to time. prefill: (batch, tokens per sequence) shapes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    adapters: int = 8
    rank: int = 16
    top_k: int = 2
    prefill: tuple = ((4, 256),)
    decode_batches: tuple = (1, 8, 32)
    decode_context: int = 32
    prefill_threads: int = 2
    decode_threads: int = 1
    modes: tuple = MODES
    compile_backend: str = "inductor"
    count_graph_breaks: bool = True  # run dynamo's explain (slow) on a variant fullgraph cannot trace
    dtype: str = "float32"
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("prefill", "decode_batches", "modes"):
            d[key] = [list(v) if isinstance(v, tuple) else v for v in d[key]]
        return d


def grid(name: str) -> E2EConfig:
    """smoke: a toy for CI; cpu: hidden 512, 4 layers (~16M parameters), the issue's CPU model; gpu: about
    1.1B (TinyLlama's shape), bf16; gpu-quick: 2 layers of Llama-8B's shape, bf16, eager, prefill 8x512 and
    decode at batch 1 and 8 (the vocabulary cut to 32000 so that lm_head does not dwarf two layers)."""
    if name == "smoke":
        return E2EConfig(64, 128, 2, 4, 2, 256, adapters=3, rank=4, prefill=((2, 8),), decode_batches=(1, 2),
                         decode_context=8)
    if name == "cpu":
        return E2EConfig(512, 1376, 4, 8, 4, 4096, prefill=((1, 32), (4, 256)), decode_batches=(1, 8, 32))
    if name == "gpu":
        return E2EConfig(2048, 5632, 22, 32, 4, 32000, prefill=((1, 512), (8, 512)), decode_batches=(1, 8, 32),
                         decode_context=512, dtype="bfloat16")
    if name == "gpu-quick":
        return E2EConfig(4096, 14336, 2, 32, 8, 32000, prefill=((8, 512),), decode_batches=(1, 8),
                         decode_context=512, modes=("eager",), count_graph_breaks=False, dtype="bfloat16")
    raise ValueError(f"unknown e2e grid {name!r}; expected smoke, cpu, gpu or gpu-quick")


@dataclass(frozen=True)
class Point:
    """One timed shape: `seq` new tokens per sequence on top of `past` cached ones, run with `threads`."""

    phase: str
    batch: int
    seq: int
    past: int
    threads: int


def points(cfg: E2EConfig) -> list[Point]:
    pre = [Point("prefill", b, s, 0, cfg.prefill_threads) for b, s in cfg.prefill]
    return pre + [Point("decode", b, 1, cfg.decode_context, cfg.decode_threads) for b in cfg.decode_batches]


# ------------------------------------------------------------------------------------------ model building
def build_base(cfg: E2EConfig, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    longest = max([s for _, s in cfg.prefill] + [cfg.decode_context + 1])
    config = LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab,
        max_position_embeddings=max(2048, 2 * longest), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()


def build_peft(base: nn.Module, cfg: E2EConfig, save_dir: str):
    """A PeftModel (over a copy of `base`) with adapters a0..a{N-1}, each saved under save_dir/<name>."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(cfg.adapters)]
    torch.manual_seed(cfg.seed + 1)
    lcfg = dict(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lcfg), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(**lcfg))
    peft_model.save_pretrained(save_dir, selected_adapters=names)
    return peft_model.eval(), names


class DenseMixLinear(nn.Module):
    """base(x) + sum_n W[b, s, n] * s_n * B_n A_n x[b, s] over ALL N adapters (two GEMMs); W [B, S, N] is read
    from `holder["weights"]` and must match x's batch and length (None: the base projection alone)."""

    def __init__(self, base: nn.Module, a_cat: torch.Tensor, b_cat: torch.Tensor, scale: torch.Tensor, holder: dict):
        super().__init__()
        self.base = base
        self.register_buffer("a_cat", a_cat, persistent=False)    # [N*R, H_in]
        self.register_buffer("b_cat", b_cat, persistent=False)    # [H_out, N*R]
        self.register_buffer("scale", scale, persistent=False)    # [N]
        self.rank = a_cat.shape[0] // scale.shape[0]
        self.holder = holder

    def forward(self, x):
        out = self.base(x)
        w = self.holder.get("weights")
        if w is None:
            return out
        coef = (w * self.scale).to(x.dtype).repeat_interleave(self.rank, dim=-1)
        h = nn.functional.linear(x.to(self.a_cat.dtype), self.a_cat) * coef
        return out + nn.functional.linear(h, self.b_cat).to(out.dtype)


def build_dense(base: nn.Module, peft_model, names: list[str], dtype: torch.dtype | None = None):
    """A copy of `base` whose targeted linears compute every adapter densely; returns (model, holder)."""
    holder: dict = {}
    model = copy.deepcopy(base)
    if dtype is not None:
        model = model.to(dtype)
    for mod_name, mod in peft_model.base_model.model.named_modules():
        if not (hasattr(mod, "lora_A") and names[0] in getattr(mod, "lora_A", {})):
            continue
        a = torch.cat([mod.lora_A[n].weight for n in names], 0)                 # [N*R, H_in]
        b = torch.cat([mod.lora_B[n].weight for n in names], 1)                 # [H_out, N*R]
        s = torch.tensor([float(mod.scaling[n]) for n in names], device=a.device)
        target = model.get_submodule(mod_name)
        wdtype = next(target.parameters()).dtype
        model.set_submodule(mod_name, DenseMixLinear(target, a.to(wdtype), b.to(wdtype).contiguous(), s, holder))
    return model.eval(), holder


# ------------------------------------------------------------------------------------------------ routing
def routing_weights(cfg: E2EConfig, batch: int, length: int, device) -> torch.Tensor:
    """[B, L, N] float32 with exactly top_k non-zero probabilities per token (they sum to 1): the first L
    positions of one fixed draw per batch size, so a call's routing is the prefix of a longer call's."""
    return _routing_draw(cfg, batch, device)[:, :length]


@functools.lru_cache(maxsize=16)
def _routing_draw(cfg: E2EConfig, batch: int, device) -> torch.Tensor:
    """Cached: drawing the weights is harness work, not part of any variant's cost."""
    longest = max([s for _, s in cfg.prefill] + [cfg.decode_context + 1])
    g = torch.Generator().manual_seed(cfg.seed + 7 + batch)
    scores = torch.rand(batch, longest, cfg.adapters, generator=g)
    top, idx = scores.topk(min(cfg.top_k, cfg.adapters), dim=-1)
    w = torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top, dim=-1))
    return w.to(device)


def seq_names(names: list[str], batch: int) -> list[str]:
    """The adapter of each sequence for the names variants: a0, a1, ... cycling."""
    return [names[i % len(names)] for i in range(batch)]


def name_weights(per_seq: list[str], names: list[str], length: int, device) -> torch.Tensor:
    """One-hot [B, L, N] weights equivalent to adapter_names=per_seq."""
    w = torch.zeros(len(per_seq), length, len(names))
    for i, n in enumerate(per_seq):
        w[i, :, names.index(n)] = 1.0
    return w.to(device)


def router_weights(router: nn.Module, base: nn.Module, ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, L, N] weights a layer-0 TokenRouter gives the tokens `ids`: its top-k of softmax(gate(embedding))
    (a Llama block 0 sees the token embeddings), scattered back to N columns."""
    probs = router(base.get_input_embeddings()(ids).float())
    idx, w = router.select(probs, top_k)
    dense = torch.zeros_like(probs)
    return dense.scatter_(-1, idx.clamp_min(0).long(), torch.where(idx >= 0, w, torch.zeros_like(w)))


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    """A model and how one call of it is routed.

    kind: the routing `truth` reproduces: "none", "topk" (routing_weights), "names" (seq_names) or "router"
    (the TokenRouter `router`, see router_weights).
    route(batch, start, length) -> the keyword arguments of a call whose tokens sit at positions
    start .. start + length - 1 (the dense variant sets its holder instead and returns {})."""

    name: str
    model: nn.Module
    kind: str
    route: Callable[[int, int, int], dict] = field(default=lambda b, start, length: {})
    router: nn.Module | None = None


def _dense_route(holder: dict, cfg: E2EConfig, device):
    def route(b, start, length):
        holder["weights"] = routing_weights(cfg, b, start + length, device)[:, start:]
        return {}

    return route


def build_variants(wanted: list[str], base, peft_model, names, cfg: E2EConfig, device, adapter_dir: str) -> dict:
    """{name: Variant or the exception that kept it from being built}. ours-topk and ours-names share one
    patched copy of base (routing is per call); ours-router patches another copy with a TokenRouter.
    "ours-...@<backend>" patches with that backend (e.g. ours-topk@triton), else backend "auto"."""
    import molora_ops as mo

    built: dict = {}
    adapters = {n: f"{adapter_dir}/{n}" for n in names}
    patched: dict = {}

    def ours(router, backend):
        key = ("router" if router is not None else "plain", backend)
        if key not in patched:
            patched[key] = mo.patch(copy.deepcopy(base), adapters=adapters, router=router, top_k=cfg.top_k,
                                    backend=backend)
        return patched[key]

    by_names = lambda b, st, ln: {"adapter_names": seq_names(names, b)}  # noqa: E731
    for name in wanted:
        kind, _, backend = name.partition("@")
        backend = backend or "auto"
        try:
            if backend != "auto" and not kind.startswith("ours-"):
                raise ValueError(f"only ours-* variants take a @backend, got {name!r}")
            if kind == "base":
                built[name] = Variant(name, base, "none")
            elif kind == "peft-mixed":
                built[name] = Variant(name, peft_model, "names", by_names)
            elif kind == "dense":
                model, holder = build_dense(base, peft_model, names)
                built[name] = Variant(name, model, "topk", _dense_route(holder, cfg, device))
            elif kind == "ours-topk":
                built[name] = Variant(name, ours(None, backend), "topk",
                                      lambda b, st, ln: {"adapter_weights": routing_weights(cfg, b, st + ln, device)})
            elif kind == "ours-names":
                built[name] = Variant(name, ours(None, backend), "names", by_names)
            elif kind == "ours-router":
                torch.manual_seed(cfg.seed + 3)
                router = mo.TokenRouter(cfg.hidden, names, layer=0).to(device).eval()
                built[name] = Variant(name, ours(router, backend), "router", router=router)
            else:
                raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
        except Exception as exc:  # recorded per point, so one broken variant does not hide the others
            built[name] = exc
    return built


# ------------------------------------------------------------------------------------------------ calls
def _tokens(cfg: E2EConfig, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 100 + batch)
    return torch.randint(0, cfg.vocab, (batch, seq), generator=g).to(device)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-6)


@functools.lru_cache(maxsize=4)
def _cache_keyword(model_cls: type) -> str:
    """transformers >= 5.24 takes the cache as `cache=`, older versions as `past_key_values=`."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


class WrongOutput(Exception):
    """A variant's logits differ from the float32 dense truth by more than the tolerance."""


class GraphBreaks(Exception):
    """torch.compile(fullgraph=True) could not trace the model called with `kwargs`."""

    def __init__(self, error: str, kwargs: dict):
        super().__init__(error)
        self.kwargs = kwargs


@torch.inference_mode()
def _explain(model: nn.Module, kwargs: dict) -> tuple[int | None, list[str]]:
    """dynamo's graph-break count and distinct reasons (first 5) for one call; (None, [why]) if it fails."""
    try:
        ex = torch._dynamo.explain(model)(**kwargs)
    except Exception as exc:
        return None, [f"explain failed: {type(exc).__name__}: {str(exc)[:200]}"]
    reasons = list(dict.fromkeys(str(getattr(r, "reason", r)).splitlines()[0][:200] for r in ex.break_reasons))
    return ex.graph_break_count, reasons[:5]


@dataclass
class Call:
    """A prepared, verified call of one variant at one point: `fn()` runs it (forward + cache crop)."""

    fn: Callable[[], torch.Tensor]
    max_rel_err: float
    compile_s: float | None = None


def prepare_call(var: Variant, mode: str, pt: Point, cfg: E2EConfig, ckw: str, device,
                 truth: Callable[[Variant, torch.Tensor], torch.Tensor], tol: float) -> Call:
    """Fill a StaticCache with the point's `past` tokens eagerly (at prefill: initialise it with an eager call
    that is then cropped away, so that compiling sees the cache as every timed call does), build the timed
    call, run it once (which compiles in compiled mode) and check its logits against `truth`; ckw is the
    cache keyword (_cache_keyword). Raises GraphBreaks (compiled mode) or WrongOutput."""
    from transformers import StaticCache

    prompt = _tokens(cfg, pt.batch, pt.past + pt.seq, device)
    new = prompt[:, pt.past:]
    cache = StaticCache(config=var.model.config, max_cache_len=pt.past + pt.seq)
    warm = pt.past or pt.seq
    with torch.inference_mode():
        var.model(input_ids=prompt[:, :warm], use_cache=True, logits_to_keep=1, **{ckw: cache},
                  **var.route(pt.batch, 0, warm))
    if not pt.past:
        cache.crop(-warm)
    kwargs = dict(input_ids=new, use_cache=True, logits_to_keep=1, **{ckw: cache},
                  **var.route(pt.batch, pt.past, pt.seq))
    model = var.model
    if mode == "compiled":
        model = torch.compile(var.model, fullgraph=True, dynamic=False, backend=cfg.compile_backend)

    @torch.inference_mode()
    def fn():
        out = model(**kwargs).logits
        cache.crop(-pt.seq)
        return out

    t0 = time.perf_counter()
    try:
        logits = fn()
    except torch._dynamo.exc.TorchDynamoException as exc:  # anything else is an error, recorded as one
        if mode != "compiled":
            raise
        raise GraphBreaks(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", kwargs) from None
    compile_s = time.perf_counter() - t0 if mode == "compiled" else None
    err = _rel_err(logits[:, -1].cpu(), truth(var, prompt))
    if not err <= tol:
        raise WrongOutput(f"logits differ from the float32 dense truth: max rel err {err:.3g} > tol {tol:.3g}")
    return Call(fn, err, compile_s)


def time_interleaved(fns: dict[str, Callable[[], object]], device, cfg: TimingConfig) -> dict[str, dict]:
    """Time every callable round by round (the order rotates each round), so that a slow patch of a shared
    machine hits all of them alike; stops once every callable has min_reps samples and the slowest has spent
    min_time_s, or after max_reps rounds. Returns {name: {median_ms, p20_ms, p80_ms, n, timer, cache}}."""
    import statistics

    one = TimingConfig(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0, cuda_rep_ms=cfg.cuda_rep_ms)
    names = list(fns)
    for _ in range(cfg.warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    timer, cache = "", ""
    for rnd in range(cfg.max_reps):
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            t = time_fn(fns[n], device, one)
            samples[n].append(t.median_ms)
            timer, cache = t.timer, t.cache
        done = rnd + 1 >= cfg.min_reps and max(sum(v) for v in samples.values()) >= cfg.min_time_s * 1e3
        if done:
            break
    out = {}
    for n, v in samples.items():
        q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else [v[0]] * 9
        out[n] = {"median_ms": statistics.median(v), "p20_ms": q[1], "p80_ms": q[7], "n": len(v), "timer": timer,
                  "cache": cache}
    return out


def _auto_backend(device: torch.device) -> str | None:
    """The backend patch(backend="auto") resolves to here (None when the runtime does not say)."""
    try:
        from molora_ops import impl

        return impl.resolve("auto", device)
    except Exception:
        return None


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------ the run
def run_e2e(
    cfg: E2EConfig,
    device: torch.device,
    *,
    variants: list[str] | None = None,
    timing: TimingConfig = DEFAULT_TIMING,
    progress: Callable[[str], None] | None = None,
    grid_name: str | None = None,
) -> list[dict]:
    """Verify and time every variant in every mode at every point; one record per (variant, mode, point).
    The caller's torch thread count is restored afterwards."""
    variants = list(variants or VARIANTS)
    threads_before = torch.get_num_threads()
    records: list[dict] = []
    base = build_base(cfg, device)
    run_id = f"{environment(device)['timestamp']}-{uuid.uuid4().hex[:6]}"
    common = {"suite": "e2e", "schema": SCHEMA, "grid": grid_name, "run_id": run_id, "config": cfg.as_dict(),
              "timing": asdict(timing), "ours_backend": _auto_backend(device),
              "params": sum(p.numel() for p in base.parameters()), "cache": "static",
              "weight_bytes": sum(p.numel() * p.element_size() for p in base.parameters())}
    try:
        with tempfile.TemporaryDirectory(prefix="molora-bench-") as tmp:
            peft_model, names = build_peft(base, cfg, tmp)
            built = build_variants(variants, base, peft_model, names, cfg, device, tmp)
            truth = _truth_fn(cfg, base, peft_model, names, device)
            explained: dict = {}  # variant -> its graph breaks, counted once (dynamo's explain is slow)
            for pt in points(cfg):
                torch.set_num_threads(pt.threads)
                if progress:
                    progress(f"{pt.phase} {pt.batch}x{pt.seq}")
                records += _run_point(pt, built, cfg, device, truth, timing, common, _cache_keyword(type(base)),
                                      explained)
                torch._dynamo.reset()  # compiled code of this point's shapes is not needed again
    finally:
        torch.set_num_threads(threads_before)
    return records


def _truth_fn(cfg: E2EConfig, base, peft_model, names, device):
    """truth(variant, ids [B, L]) -> float64 logits [B, V] of the last position, computed with every adapter
    densely in float32 over the whole sequence (no cache), routed as the variant routes."""
    model, holder = build_dense(base, peft_model, names, dtype=torch.float32)

    @torch.inference_mode()
    def truth(var: Variant, ids: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        weights = {"none": lambda: None,
                   "topk": lambda: routing_weights(cfg, b, length, device),
                   "names": lambda: name_weights(seq_names(names, b), names, length, device),
                   "router": lambda: router_weights(var.router, base, ids, cfg.top_k)}[var.kind]()
        holder["weights"] = weights
        try:
            return model(input_ids=ids, logits_to_keep=1).logits[:, -1].double().cpu()
        finally:
            holder.pop("weights", None)

    return truth


def _run_point(pt: Point, built: dict, cfg: E2EConfig, device, truth, timing: TimingConfig, common: dict,
               ckw: str, explained: dict) -> list[dict]:
    """Prepare (verify, compile) every variant and mode at one point, time the good ones interleaved.
    explained: {variant: (graph breaks, reasons, where counted)}, filled at the first point that needs it."""
    env = environment(device)
    where = {**common, "env": env, "phase": pt.phase, "batch": pt.batch, "seq": pt.seq, "past": pt.past,
             "threads": torch.get_num_threads()}
    base_var = built.get("base")
    noise = 0.0
    if isinstance(base_var, Variant) and cfg.dtype != "float32":
        ids = _tokens(cfg, pt.batch, pt.past + pt.seq, device)
        with torch.inference_mode():
            noise = _rel_err(base_var.model(input_ids=ids, logits_to_keep=1).logits[:, -1].cpu(), truth(base_var, ids))
    tol = VERIFY_TOL[cfg.dtype] + 3.0 * noise

    calls: dict[tuple, Call] = {}
    recs: dict[tuple, dict] = {}
    for mode in cfg.modes:
        for name, var in built.items():
            if mode == "compiled" and name.partition("@")[0] not in COMPILED_VARIANTS:
                continue
            rec = recs[(name, mode)] = {**where, "variant": name, "mode": mode, "tol": tol}
            if mode == "compiled":
                rec["compile_backend"] = cfg.compile_backend
            if isinstance(var, Exception):
                rec.update(status="error", reason=f"{type(var).__name__}: {var}")
                continue
            try:
                call = calls[(name, mode)] = prepare_call(var, mode, pt, cfg, ckw, device, truth, tol)
                rec.update(max_rel_err=call.max_rel_err, compile_s=call.compile_s)
                if mode == "compiled":
                    rec["graph_breaks"] = 0
            except GraphBreaks as gb:
                if name not in explained and cfg.count_graph_breaks:
                    explained[name] = (*_explain(var.model, gb.kwargs), f"{pt.phase} {pt.batch}x{pt.seq}")
                count, reasons, at = explained.get(name, (None, ["not counted (count_graph_breaks off)"], None))
                rec.update(status="graph_breaks", graph_breaks=count, break_reasons=reasons, breaks_counted_at=at,
                           reason=str(gb))
            except WrongOutput as exc:
                rec.update(status="wrong", reason=str(exc))
            except Exception as exc:
                rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")

    graphs_before = _unique_graphs()
    times = time_interleaved({key: c.fn for key, c in calls.items()}, device, timing) if calls else {}
    recompiles = _unique_graphs() - graphs_before
    tokens = pt.batch * pt.seq
    for key, t in times.items():
        rec = recs[key]
        # timing_cache ("cache" names the KV cache): every forward reads all the weights, which past
        # POOL_MARGIN x the last-level cache evict themselves ("exceeds_cache").
        rec.update(status="ok", time=t, tokens_per_s=tokens / (t["median_ms"] * 1e-3),
                   timing_cache=cache_record(t["cache"], common["weight_bytes"], cache_bytes(device), 1))
        if key[1] == "compiled":
            rec["recompiles_while_timing"] = recompiles
    for (name, mode), rec in recs.items():
        if rec.get("status") != "ok":
            continue
        base_t, eager_t = times.get(("base", mode)), times.get((name, "eager"))
        rec["vs_base"] = rec["time"]["median_ms"] / base_t["median_ms"] if base_t else None
        if mode == "compiled" and eager_t:
            rec["eager_over_compiled"] = eager_t["median_ms"] / rec["time"]["median_ms"]
    return list(recs.values())

"""The demo end to end: data -> tokenizer -> base -> PEFT adapters (+ sequential baseline) -> router ->
evaluation through mo.patch -> the MoLoRA stage (routers trained through the LM loss, molora.py) -> table, JSON,
heat map. `run(args)` is what ``python -m molora_ops demo`` calls.

With ``--model DIR --adapter NAME=DIR ...`` the first four stages are skipped: the user's local Hugging Face
model and PEFT adapters are routed and evaluated instead (a router is trained unless ``--router DIR`` is given), and
the MoLoRA stage, which trains through the whole model, is left out.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import data as data_mod

MIXED_PROMPT = "Write Python code to solve quadratic equations"
PROMPTS = (
    MIXED_PROMPT,
    "def fibonacci(n):\n",
    "Problem: Solve for x: 4x + 7 = 31.\nSolution:",
    "The interpreter reads",
)


@dataclass(frozen=True)
class Settings:
    chars_per_domain: int = 400_000
    heldout_fraction: float = 0.1
    vocab_size: int = 2048
    seq_len: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    pretrain_steps: int = 120
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    adapter_steps: int = 150
    adapter_batch: int = 8
    adapter_lr: float = 5e-3
    rank: int = 16
    alpha: int = 32
    # GPT-2's Conv1D projections and the output head (mo.patch routes lm_head too)
    lora_targets: tuple = ("c_attn", "c_proj", "c_fc", "lm_head")
    router_kind: str = "context"
    router_layer: int = 0
    router_texts: int = 200
    router_epochs: int = 15
    router_lr: float = 1e-2
    top_k: int = 2
    # the MoLoRA stage (molora.py): routers trained through the LM loss on the supervised router's texts
    molora_kind: str = "context"
    molora_epochs: int = 2
    molora_lr: float = 0.1
    molora_batch: int = 16
    molora_balance_weight: float = 0.01
    throughput_rounds: int = 10
    eval_blocks: int = 256  # held-out blocks evaluated per domain, at most (the built-in sets have 82-137: all)
    eval_batch: int = 16
    gen_tokens: int = 32
    timing_repeats: int = 10


DEFAULT = Settings()
QUICK = replace(DEFAULT, chars_per_domain=200_000, pretrain_steps=60, adapter_steps=40, router_texts=120,
                router_epochs=15, eval_blocks=16, gen_tokens=16, timing_repeats=3, molora_epochs=1,
                throughput_rounds=3)


# ------------------------------------------------------------------------------------------------ setup
def _other_runnable_processes() -> int:
    """Processes other than this one that are runnable right now: the median of a few samples of /proc/loadavg's
    running count (a busy process shows in most samples, a passing blip in few). Unlike the 1-minute load
    average, it does not remember a pip install that just finished."""
    try:
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.05)
        return max(0, sorted(samples)[len(samples) // 2])
    except (OSError, ValueError, IndexError):
        return int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


def pick_threads(requested: int | None) -> int:
    """Intra-op threads. PyTorch's CPU kernels slow down many times over when their threads must share cores
    with other busy processes (measured 5-7x for this model on 2 cores), so 'auto' uses the cores that no other
    runnable process is using right now (every core on an idle machine). `--threads` overrides."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - _other_runnable_processes()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -------------------------------------------------------------------------------------- built-in stages
def build_builtin(settings: Settings, out: Path, device, seed: int, log) -> dict:
    """Stages 1-4 of the demo: everything up to (not including) the router. Returns the pieces for evaluation."""
    from .adapters import train_adapters, train_sequential
    from .model import build_blocks, pretrain_base
    from .tokenizer import train_tokenizer

    stages = {}
    t0 = time.perf_counter()
    corpora = data_mod.build_corpora(settings.chars_per_domain, settings.heldout_fraction, seed)
    tokenizer = train_tokenizer((d for c in corpora.values() for d in c.train), settings.vocab_size)
    blocks = build_blocks(corpora, tokenizer, settings.seq_len)
    stages["data_and_tokenizer"] = time.perf_counter() - t0
    sizes = {d: {"train_blocks": int(blocks.train[d].shape[0]), "heldout_blocks": int(blocks.heldout[d].shape[0])}
             for d in data_mod.DOMAINS}
    counts = ", ".join(f"{d} {s['train_blocks']}/{s['heldout_blocks']}" for d, s in sizes.items())
    log(f"data: {counts} "
        f"train/held-out blocks of {settings.seq_len} tokens; tokenizer: byte-level BPE, {len(tokenizer)} tokens")

    seed_everything(seed)
    base, info = pretrain_base(
        tokenizer, blocks, seq_len=settings.seq_len, steps=settings.pretrain_steps, batch_size=settings.pretrain_batch,
        lr=settings.pretrain_lr, seed=seed, device=device, n_layer=settings.n_layer, n_embd=settings.n_embd,
        n_head=settings.n_head,
    )
    stages["pretrain_base"] = info["seconds"]
    n_params = sum(p.numel() for p in base.parameters())
    log(f"base: GPT-2 {settings.n_layer} layers x {settings.n_embd}, {n_params / 1e6:.2f}M parameters, "
        f"{settings.pretrain_steps} steps on the mix, final train loss {info['final_loss']:.3f}")
    base_dir = out / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    adapters = train_adapters(
        base, blocks, out / "adapters", domains=data_mod.DOMAINS, rank=settings.rank, alpha=settings.alpha,
        steps=settings.adapter_steps, batch_size=settings.adapter_batch, lr=settings.adapter_lr, seed=seed,
        device=device, targets=settings.lora_targets,
    )
    stages["adapters"] = adapters["seconds"]
    sequential = train_sequential(
        adapters["first"], blocks, out / "adapters", domains=data_mod.DOMAINS, steps=settings.adapter_steps,
        batch_size=settings.adapter_batch, lr=settings.adapter_lr, seed=seed, device=device,
    )
    stages["sequential"] = sequential["seconds"]
    targets = "/".join(settings.lora_targets)
    log(f"adapters: PEFT LoRA r={settings.rank} on {targets}, {settings.adapter_steps} steps each, saved "
        f"to {out / 'adapters'}; sequential baseline {' -> '.join(sequential['order'])}")
    del adapters["first"]
    return {
        "base": base,
        "tokenizer": tokenizer,
        "heldout": blocks.heldout,
        "router_train": {d: blocks.train[d] for d in data_mod.DOMAINS},
        "adapters": {d: str(p) for d, p in adapters["paths"].items()},
        "sequential": str(sequential["path"]),
        "sequential_order": sequential["order"],
        "stages": stages,
        "data": sizes,
        "base_dir": str(base_dir),
    }


# ---------------------------------------------------------------------------------------- user's model
def _user_texts(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.extend(p.strip() for p in text.split("\n\n") if len(p.strip()) > 40)
    if not docs:
        raise ValueError(f"--data {path}: no text found")
    return docs


def load_user(args, settings: Settings, device, seed: int, log) -> dict:
    """A local HF causal LM + PEFT adapters; texts per adapter from --data NAME=PATH or the built-in domains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import encode_blocks

    adapters = dict(_pairs(args.adapter, "--adapter"))
    if len(adapters) < 2:
        raise SystemExit("--model needs at least two --adapter NAME=DIR")
    user_data = dict(_pairs(args.data or [], "--data"))
    t0 = time.perf_counter()
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    missing = [n for n in adapters if n not in user_data and n not in data_mod.DOMAINS]
    if missing:
        raise SystemExit(f"no texts for adapters {missing}: give --data NAME=PATH (a text file or a folder), or "
                         f"name adapters after the built-in domains {list(data_mod.DOMAINS)}")
    builtin = None
    if any(n not in user_data for n in adapters):
        builtin = data_mod.build_corpora(settings.chars_per_domain, settings.heldout_fraction, seed)
    heldout, train = {}, {}
    for name in adapters:
        if name in user_data:
            corpus = data_mod._split(name, _user_texts(Path(user_data[name])), settings.heldout_fraction, seed)
            data_mod.check_no_overlap(corpus)
        else:
            corpus = builtin[name]
        train[name] = encode_blocks(corpus.train, tokenizer, settings.seq_len)
        heldout[name] = encode_blocks(corpus.heldout, tokenizer, settings.seq_len)
        if heldout[name].shape[0] == 0 or train[name].shape[0] == 0:
            raise SystemExit(f"texts for {name!r} are too short for {settings.seq_len}-token blocks")
    log(f"model: {args.model} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, {dtype}); "
        f"adapters: {', '.join(f'{n}={d}' for n, d in adapters.items())}")
    return {"base": base, "tokenizer": tokenizer, "heldout": heldout, "router_train": train, "adapters": adapters,
            "sequential": None, "sequential_order": None, "stages": {"load": time.perf_counter() - t0},
            "data": {n: {"train_blocks": int(train[n].shape[0]), "heldout_blocks": int(heldout[n].shape[0])}
                     for n in adapters}, "base_dir": str(args.model)}


def _pairs(items, flag):
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects NAME=PATH, got {item!r}")
        yield name, value


# ------------------------------------------------------------------------------------------- evaluation
def router_texts(pieces: dict, names: list[str], per_adapter: int, seed: int) -> dict[str, list[str]]:
    """{adapter: texts}: `per_adapter` training blocks per adapter, drawn with `seed`, decoded. Every router the
    demo trains (supervised, and the MoLoRA stage's) learns from these."""
    tokenizer = pieces["tokenizer"]
    gen = torch.Generator().manual_seed(seed)
    texts = {}
    for name in names:
        pool = pieces["router_train"][name]
        idx = torch.randperm(pool.shape[0], generator=gen)[:per_adapter]
        texts[name] = [tokenizer.decode(pool[i]) for i in idx.tolist()]
    return texts


def evaluate(pieces: dict, settings: Settings, out: Path, device, seed: int, log, router_dir: str | None = None,
             plot: bool = True, molora: bool = False):
    """Stages 5-7: the supervised router, evaluation through mo.patch, generations and timing; with `molora`
    also the MoLoRA stage (molora.py) on the same texts and held-out blocks."""
    from peft import PeftModel

    from . import evaluate as ev
    from .plots import routing_heatmap

    import molora_ops as mo
    base, tokenizer = pieces["base"], pieces["tokenizer"]
    names = list(pieces["adapters"])
    heldout = {d: x[: settings.eval_blocks] if settings.eval_blocks else x for d, x in pieces["heldout"].items()}
    stages = pieces["stages"]
    texts = router_texts(pieces, names, settings.router_texts, seed) if molora or not router_dir else None

    # 5. the router, trained on training text with the base and the adapters frozen
    t0 = time.perf_counter()
    if router_dir:
        from molora_ops.hf.routers import load_router

        router = load_router(router_dir, tokenizer=tokenizer)
        patched = mo.patch(copy.deepcopy(base), adapters=pieces["adapters"], router=router, top_k=settings.top_k)
        log(f"router: loaded {type(router).__name__} from {router_dir}")
    else:
        patched = mo.patch(copy.deepcopy(base), adapters=pieces["adapters"], router=None, top_k=settings.top_k)
        router = mo.train_router(
            patched, texts, tokenizer, kind=settings.router_kind, layer=settings.router_layer,
            epochs=settings.router_epochs, lr=settings.router_lr, max_length=settings.seq_len, val_fraction=0.1,
            seed=seed, install=True, save_to=str(out / "router"),
        )
    stages["router"] = time.perf_counter() - t0

    # 6. evaluation through the patched model (our kernels)
    t0 = time.perf_counter()
    # the router's held-out accuracy and the routed losses come from the same forwards (the router decides)
    acc, routed_losses = ev.routed_eval(patched, heldout, names, batch_size=settings.eval_batch, device=device)
    acc["train_router_report"] = getattr(router, "report", None)
    bs = settings.eval_batch

    def names_ctx(name):
        return lambda b: mo.routing(patched, adapter_names=[name] * b)

    losses, per_seq = {}, {}
    seq_patched = None
    if pieces["sequential"]:
        seq_patched = mo.patch(copy.deepcopy(base), adapters={"sequential": pieces["sequential"]}, top_k=1)
    for domain, x in heldout.items():
        per = {"base": ev.heldout_losses(patched, x, batch_size=bs, device=device, routing=names_ctx(ev.BASE))}
        for name in names:
            per[f"adapter:{name}"] = ev.heldout_losses(patched, x, batch_size=bs, device=device,
                                                       routing=names_ctx(name))
        if seq_patched is not None:
            per["sequential"] = ev.heldout_losses(
                seq_patched, x, batch_size=bs, device=device,
                routing=lambda b: mo.routing(seq_patched, adapter_names=["sequential"] * b))
        per["routed"] = routed_losses[domain]
        per_seq[domain] = per
        losses[domain] = {k: float(v.mean()) for k, v in per.items()}
    loss_ci = paired_differences(per_seq, seed=seed)
    stages["evaluate_loss"] = time.perf_counter() - t0

    # 7. the MoLoRA stage: routers trained through the LM loss, top-k and dense, against the supervised one
    molora_results = None
    if molora:
        from .molora import run_stage

        t0 = time.perf_counter()
        molora_results = run_stage(pieces, texts, heldout, routed_losses, settings, out=out, device=device,
                                   seed=seed, resamples=BOOTSTRAP_RESAMPLES, level=CI_LEVEL, log=log)
        stages["molora"] = time.perf_counter() - t0

    # the mixed prompt's routing heat map, and greedy generations with the KV cache
    t0 = time.perf_counter()
    seed_everything(seed)
    generations = []
    prompts = list(PROMPTS) if set(data_mod.DOMAINS) <= set(names) else [MIXED_PROMPT]
    for prompt in prompts:
        trace = ev.routing_trace(patched, tokenizer, prompt, names, device=device,
                                 max_new_tokens=settings.gen_tokens)
        trace["routing"] = ev.summarize_trace(trace)
        generations.append(trace)
    heatmap = None
    if plot:
        heatmap = routing_heatmap(generations[0], names, out / "routing_heatmap.png",
                                  title=f"Per-token routing ({type(router).__name__}): {MIXED_PROMPT!r}",
                                  top_k=settings.top_k)
    blends = []
    if "code" in names and "math" in names:
        ids = tokenizer(MIXED_PROMPT, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad(), mo.routing(patched, adapter_weights={"code": 0.5, "math": 0.5}):
            out_ids = patched.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.gen_tokens,
                                       do_sample=False, use_cache=True,
                                       pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
        blends.append({"prompt": MIXED_PROMPT, "adapter_weights": {"code": 0.5, "math": 0.5},
                       "text": tokenizer.decode(out_ids[0][ids.shape[1]:])})
    stages["generate"] = time.perf_counter() - t0

    # forward-pass timing against PEFT's mixed batch, and exactness against it
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), pieces["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(pieces["adapters"][name], adapter_name=name)
    peft_model.eval()
    per = max(1, 12 // len(names))
    batch = torch.cat([heldout[n][:per] for n in names if n in heldout])
    seq_names = [n for n in names if n in heldout for _ in range(per)]
    parity = ev.peft_parity(patched, peft_model, batch, seq_names, device=device)
    timing = ev.time_forward(base, patched, peft_model, batch, seq_names, repeats=settings.timing_repeats,
                             device=device)
    timing["decode_tokens_per_s"] = _decode_rate(patched, tokenizer, device, settings.gen_tokens)
    stages["timing"] = time.perf_counter() - t0
    timing["stages_s"] = stages
    return {
        "router_accuracy": acc,
        "loss": losses,
        "loss_ci": loss_ci,
        "timing": timing,
        "peft_parity_max_abs_logit_diff": parity,
        "generations": [{k: g[k] for k in ("prompt", "text", "routing", "tokens", "top", "probs")}
                        for g in generations],
        "blends": blends,
        "heatmap": None if heatmap is None else str(heatmap),
        "adapters": names,
        "sequential_order": pieces["sequential_order"],
        "molora": molora_results,
    }


@torch.no_grad()
def _decode_rate(patched, tokenizer, device, n: int) -> float:
    ids = tokenizer(MIXED_PROMPT, return_tensors="pt")["input_ids"].to(device)
    t0 = time.perf_counter()
    patched.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     use_cache=True,
                     pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ claims
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95
CLEAR_MIN_REDUCTION = 0.01  # "clearly below the base": CI entirely below 0 and at least 1% lower mean loss
OWN_TOLERANCE = 0.05  # "within 5% of the domain's own adapter"
FORGET_MARGIN = 0.02  # "the sequential LoRA worse than routing": by more than 2%, CI entirely above 0

CLAIM_DEFINITIONS = {
    "router_sequence_accuracy_ge_95": "held-out sequence-level routing accuracy >= 95% (argmax of the router's "
                                      "probabilities averaged over each sequence's tokens)",
    "routed_within_5pct_of_own_adapter": "in every domain, mean held-out routed loss <= 1.05 x the mean loss of "
                                         "that domain's own adapter",
    "routed_clearly_below_base": "in every domain, the 95% paired bootstrap CI of the mean per-sequence "
                                 "difference (routed - base) lies entirely below 0 AND the relative reduction "
                                 "(base - routed) / base is at least 1%",
    "sequential_forgets_an_earlier_domain": "on at least one domain the sequential LoRA trained before its last "
                                            "domain, the 95% paired bootstrap CI of (sequential - routed) lies "
                                            "entirely above 0 AND the sequential loss is more than 2% above routed",
    "lm_router_no_worse_and_better_in_one": "MoLoRA stage: in every domain, the 95% paired bootstrap CI of the mean "
                                            "per-sequence difference (LM-trained top-k router - supervised router) "
                                            "does not lie entirely above 0 (no worse), AND in at least one domain "
                                            "it lies entirely below 0 (better)",
}


def _verdict(ci: list) -> str:
    """'better' (CI entirely below 0), 'worse' (entirely above 0) or 'no difference shown'."""
    return "better" if ci[1] < 0 else "worse" if ci[0] > 0 else "no difference shown"


def paired_differences(per_seq: dict, *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = CI_LEVEL) -> dict:
    """Paired per-sequence loss differences on the same held-out sequences, with percentile bootstrap CIs of
    their means (resampling sequences): routed - base, own adapter - base, routed - own adapter and
    sequential - routed. `relative` is the mean difference over the reference's mean loss; `share_negative`
    the fraction of sequences whose difference is below 0."""
    from . import evaluate as ev

    pairs = (("routed_minus_base", "routed", "base"), ("own_minus_base", "adapter:{d}", "base"),
             ("routed_minus_own", "routed", "adapter:{d}"), ("sequential_minus_routed", "sequential", "routed"))
    domains = {}
    for d, per in per_seq.items():
        row = {"sequences": int(per["base"].numel())}
        for key, a, b in pairs:
            a, b = a.format(d=d), b.format(d=d)
            if a not in per or b not in per:
                continue
            stat = ev.paired_bootstrap(per[a] - per[b], resamples=resamples, level=level, seed=seed)
            stat["relative"] = stat["mean"] / float(per[b].mean())
            stat.pop("sequences")
            row[key] = stat
        domains[d] = row
    return {"method": "paired per-sequence differences (nats/token) on the same held-out sequences; percentile "
                      "bootstrap over sequences of the mean difference",
            "level": level, "resamples": resamples, "seed": seed, "domains": domains}


def check_claims(results: dict) -> dict:
    """The issue's done-when targets, evaluated on the held-out numbers (definitions in CLAIM_DEFINITIONS).
    Booleans at the top level; `per_domain` says which domains meet each; `definitions` states them."""
    loss = results["loss"]
    ci = results.get("loss_ci", {}).get("domains", {})
    claims = {"router_sequence_accuracy_ge_95": results["router_accuracy"]["sequence"] >= 0.95}
    per_domain = {}
    for d, row in loss.items():
        own = row.get(f"adapter:{d}")
        rb = ci.get(d, {}).get("routed_minus_base")
        per_domain[d] = {
            "routed_within_5pct_of_own_adapter": own is not None and row["routed"] <= (1 + OWN_TOLERANCE) * own,
            "routed_clearly_below_base": bool(
                rb is not None and rb["ci"][1] < 0 and (row["base"] - row["routed"]) / row["base"]
                >= CLEAR_MIN_REDUCTION),
            "routed_minus_base_ci95": rb["ci"] if rb else None,
            "routed_vs_base_relative": row["routed"] / row["base"] - 1,
        }
    claims["routed_within_5pct_of_own_adapter"] = all(
        p["routed_within_5pct_of_own_adapter"] for p in per_domain.values())
    claims["routed_clearly_below_base"] = all(p["routed_clearly_below_base"] for p in per_domain.values())
    order = results.get("sequential_order") or []
    earlier = [d for d in order[:-1] if d in loss and "sequential" in loss[d]]
    for d in earlier:
        sr = ci.get(d, {}).get("sequential_minus_routed")
        per_domain[d]["sequential_forgets"] = bool(
            sr is not None and sr["ci"][0] > 0 and loss[d]["sequential"] > (1 + FORGET_MARGIN) * loss[d]["routed"])
    claims["sequential_forgets_an_earlier_domain"] = (
        any(per_domain[d]["sequential_forgets"] for d in earlier) if earlier else None)
    molora = results.get("molora")
    if molora:
        for d, row in molora["loss_ci"]["domains"].items():
            per_domain.setdefault(d, {})["lm_vs_supervised"] = _verdict(row["lm_minus_supervised"]["ci"])
        verdicts = [per_domain[d]["lm_vs_supervised"] for d in molora["loss_ci"]["domains"]]
        claims["lm_router_no_worse_and_better_in_one"] = "worse" not in verdicts and "better" in verdicts
    else:
        claims["lm_router_no_worse_and_better_in_one"] = None
    claims["per_domain"] = per_domain
    claims["definitions"] = dict(CLAIM_DEFINITIONS)
    return claims


# ----------------------------------------------------------------------------------------------- output
def format_table(results: dict) -> str:
    loss = results["loss"]
    cols = list(next(iter(loss.values())).keys())
    width = max(10, *(len(c) for c in cols))
    lines = ["held-out loss (nats/token; lower is better)",
             f"{'domain':<8}" + "".join(f"{c:>{width + 1}}" for c in cols) + f"{'routed vs own':>15}"
             + f"{'routed vs base':>16}"]
    for domain, row in loss.items():
        own = row.get(f"adapter:{domain}")
        rel = f"{100 * (row['routed'] / own - 1):+.1f}%" if own else "n/a"
        rel_base = f"{100 * (row['routed'] / row['base'] - 1):+.1f}%"
        lines.append(f"{domain:<8}" + "".join(f"{row[c]:>{width + 1}.3f}" for c in cols) + f"{rel:>15}"
                     + f"{rel_base:>16}")
    ci = results.get("loss_ci")
    if ci:
        pct = round(100 * ci["level"])
        lines.append(f"paired per-sequence differences on the same held-out sequences: mean [{pct}% bootstrap CI, "
                     f"{ci['resamples']} resamples] (relative to the second)")
        cols = (("routed_minus_base", "routed - base"), ("own_minus_base", "own - base"),
                ("routed_minus_own", "routed - own"), ("sequential_minus_routed", "sequential - routed"))
        lines.append(f"{'domain':<8}{'seqs':>5}" + "".join(f"  {label:<33}" for _, label in cols))
        for domain, row in ci["domains"].items():
            cells = []
            for key, _ in cols:
                st = row.get(key)
                cells.append(f"{st['mean']:+.3f} [{st['ci'][0]:+.3f}, {st['ci'][1]:+.3f}] "
                             f"({100 * st['relative']:+.1f}%)" if st else "n/a")
            lines.append(f"{domain:<8}{row['sequences']:>5}" + "".join(f"  {c:<33}" for c in cells))
    acc = results["router_accuracy"]
    lines.append(f"router accuracy on held-out text: sequence {100 * acc['sequence']:.1f}% ({acc['sequences']} "
                 f"sequences), token {100 * acc['token']:.1f}% ({acc['tokens']} tokens)")
    t = results["timing"]
    parts = [f"base {t['base']['median_ms']:.1f} ms"]
    if "peft_mixed_batch" in t:
        parts.append(f"PEFT mixed batch {t['peft_mixed_batch']['median_ms']:.1f} ms")
    parts.append(f"molora adapter_names {t['molora_adapter_names']['median_ms']:.1f} ms")
    parts.append(f"molora routed top-k {t['molora_routed_topk']['median_ms']:.1f} ms")
    lines.append(f"forward pass, batch {t['batch'][0]}x{t['batch'][1]} on {t['device']}: " + ", ".join(parts))
    if "speedup_vs_peft_mixed_batch" in t:
        lines.append(f"  same routing as PEFT's mixed batch: {t['speedup_vs_peft_mixed_batch']:.2f}x PEFT's speed; "
                     f"max |logit difference| vs PEFT {results['peft_parity_max_abs_logit_diff']:.2e}")
    lines.append(f"greedy decode with the KV cache and the router: {t['decode_tokens_per_s']:.1f} tokens/s")
    if results.get("molora"):
        lines.extend(format_molora(results["molora"]))
    lines.append("generations (greedy, KV cache; routing = runs of tokens by top adapter, | = start of generation):")
    for g in results["generations"]:
        lines.append(f"  {g['prompt']!r} -> {g['text']!r}")
        lines.append(f"      routing: {g['routing']}")
    for b in results.get("blends", []):
        lines.append(f"  blend {b['adapter_weights']}: {b['prompt']!r} -> {b['text']!r}")
    claims = results["claims"]
    lines.append("claims (held-out; 'clearly below base' = the 95% CI of routed - base entirely below 0 and at least "
                 "1% lower loss, in every domain):")
    for name, ok in claims.items():
        if name in ("per_domain", "definitions"):
            continue
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        detail = ""
        if name == "routed_clearly_below_base" and claims.get("per_domain"):
            detail = "  (" + ", ".join(f"{d} {'yes' if p['routed_clearly_below_base'] else 'no'}"
                                       for d, p in claims["per_domain"].items()) + ")"
        if name == "lm_router_no_worse_and_better_in_one" and ok is not None:
            detail = "  (" + ", ".join(f"{d} {p['lm_vs_supervised']}" for d, p in claims["per_domain"].items()
                                       if "lm_vs_supervised" in p) + ")"
        lines.append(f"  [{mark}] {name}{detail}")
    return "\n".join(lines)


def format_molora(m: dict) -> list[str]:
    """The MoLoRA stage's rows: held-out loss of the three routers, paired CIs, accuracy, training throughput."""
    ci = m["loss_ci"]
    pct = round(100 * ci["level"])
    r, tp = m["routers"], m["throughput"]
    cfg = m["settings"]
    lines = [f"MoLoRA stage: {r['lm']['kind']}s trained through the LM loss ({cfg['epochs']} epochs, lr {cfg['lr']}, "
             f"balance weight {cfg['balance_weight']}; base and adapters frozen), same texts and held-out sequences "
             "as the supervised router",
             f"  lm = top-{r['lm']['top_k']} routed; dense = all {r['dense']['top_k']} adapters, softmax weights "
             f"(X-LoRA's setting); mean [{pct}% paired bootstrap CI, {ci['resamples']} resamples] (relative to the "
             "second)",
             f"{'domain':<8}{'seqs':>5}{'supervised':>11}{'lm':>8}{'dense':>8}"
             + "".join(f"  {label:<33}" for label in ("lm - supervised", "dense - supervised", "lm - dense"))]
    for d, row in ci["domains"].items():
        loss = m["loss"][d]
        cells = [f"{st['mean']:+.3f} [{st['ci'][0]:+.3f}, {st['ci'][1]:+.3f}] ({100 * st['relative']:+.1f}%)"
                 for st in (row[k] for k in ("lm_minus_supervised", "dense_minus_supervised", "lm_minus_dense"))]
        lines.append(f"{d:<8}{row['sequences']:>5}{loss['supervised']:>11.3f}{loss['lm']:>8.3f}{loss['dense']:>8.3f}"
                     + "".join(f"  {c:<33}" for c in cells))
    acc = m["router_accuracy"]
    lines.append("  router accuracy on held-out text (sequence / token): " + ", ".join(
        f"{v} {100 * acc[v]['sequence']:.1f}% / {100 * acc[v]['token']:.1f}%" for v in acc))
    lines.append(f"  training throughput (router step: routed forward + loss + backward, batch {tp['batch'][0]}x"
                 f"{tp['batch'][1]} on {tp['device']}, {tp['rounds']} interleaved rounds, medians): lm "
                 f"{tp['lm']['tokens_per_s']:.0f} tokens/s, dense {tp['dense']['tokens_per_s']:.0f} tokens/s "
                 f"({tp['lm_vs_dense']:.2f}x dense)")
    return lines


# optional dependencies: (module, what needs it, how to install it)
_NEEDED = (("transformers", "the models", "molora-ops[hf]"), ("peft", "the adapters", "molora-ops[hf]"),
           ("tokenizers", "the tokenizer", "molora-ops[hf]"))
_PLOT = ("matplotlib", "the routing heat map", "molora-ops[plot]")


def check_dependencies(plot: bool) -> None:
    """Exit at once, before any training, when an optional dependency this run needs is not installed."""
    missing = []
    for need in _NEEDED + ((_PLOT,) if plot else ()):
        try:
            importlib.import_module(need[0])
        except ImportError:
            missing.append(need)
    if missing:
        listed = "; ".join(f"{module} (for {use}: pip install '{extra}')" for module, use, extra in missing)
        hint = " To run without the heat map, pass --no-plot." if _PLOT in missing else ""
        raise SystemExit(f"molora demo: missing optional dependencies: {listed}.{hint}")


def run(args) -> int:
    import warnings

    check_dependencies(plot=not args.no_plot)
    start = time.perf_counter()
    # PEFT calls a transformers API that transformers 5 deprecates; it says nothing about this run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # GPT-2's Conv1D projections store weights transposed, its lm_head is an nn.Linear: PEFT flips its config's
    # fan_in_fan_out per module and says so each time. Its tied-embeddings note is about merging, which the
    # demo never does (the lm_head LoRA delta applies to the output head only, in PEFT as in mo.patch).
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*ensure_weight_tying", category=UserWarning)
    settings = QUICK if args.quick else DEFAULT
    if args.steps_scale and args.steps_scale != 1.0:
        s = args.steps_scale
        settings = replace(settings, pretrain_steps=max(1, int(settings.pretrain_steps * s)),
                           adapter_steps=max(1, int(settings.adapter_steps * s)))
    device = resolve_device(args.device)
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    log(f"molora demo: {'quick' if args.quick else 'full'} run on {device} ({threads} threads), seed {args.seed}, "
        f"artifacts in {out}")
    if args.model:
        pieces = load_user(args, settings, device, args.seed, log)
    else:
        if args.adapter or args.router:
            raise SystemExit("--adapter and --router go with --model")
        pieces = build_builtin(settings, out, device, args.seed, log)
    results = evaluate(pieces, settings, out, device, args.seed, log, router_dir=args.router, plot=not args.no_plot,
                       molora=not args.model)
    results["claims"] = check_claims(results)
    results["seconds"] = time.perf_counter() - start
    results["settings"] = asdict(settings)
    results["seed"] = args.seed
    results["device"] = str(device)
    results["threads"] = threads
    results["data"] = pieces["data"]
    results["artifacts"] = {"out": str(out), "base": pieces["base_dir"], "adapters": pieces["adapters"],
                            "sequential": pieces["sequential"], "router": args.router or str(out / "router"),
                            "router_lm": str(out / "router_lm") if results["molora"] else None,
                            "heatmap": results["heatmap"]}
    results["versions"] = _versions()
    print()
    print(format_table(results))
    print(f"heat map: {results['heatmap'] or 'skipped (--no-plot)'}\ntotal {results['seconds']:.1f} s")
    text = json.dumps(results, indent=1)
    (out / "results.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


def _versions() -> dict:
    import molora_ops

    out = {"molora_ops": molora_ops.__version__, "torch": torch.__version__}
    for name in ("transformers", "peft", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - versions are information only
            out[name] = None
    return out

"""The MoLoRA stage: routers trained end to end through the next-token loss of the routed forward (base and
adapters frozen), compared with the supervised router and with a dense soft mixture trained the same way.

    lm     a router whose top-k per token (renormalised weights, `Settings.top_k`) feeds our routed ops: it learns
           whatever routing lowers the LM loss (``mo.train_router(objective="lm")``, MoLoRA's per-token router)
    dense  X-LoRA's setting: every adapter on every token with the router's softmax weights. It is the same patch
           with top_k = N: `select_topk` keeps all N probabilities and renormalises weights that already sum to 1,
           so every token gets softmax(gate) over all adapters and the LM loss reaches every gate logit

Both train on the supervised router's texts with the same router kind, epochs, lr, batches and seed; only top_k
(and so the work per token) differs. Training throughput times the step `mo.train_router` takes
(:func:`~molora_ops.hf.train_router.lm_objective`, then the backward into the router), the two models alternating
round by round on one batch in this process; medians.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

VARIANTS = ("lm", "dense")


def _patched(base, adapters: dict, top_k: int):
    import molora_ops as mo

    return mo.patch(copy.deepcopy(base), adapters=adapters, router=None, top_k=top_k)


def train_lm_routers(base, adapters: dict, texts: dict, tokenizer, settings, *, seed: int, out, log) -> dict:
    """Train the `lm` (top-k) and `dense` (all adapters) routers through the LM loss; each is installed in its own
    patched copy of `base`, and the lm router is saved to out/router_lm. Returns {variant: {"model", "router",
    "top_k", "seconds"}}."""
    import molora_ops as mo

    trained = {}
    for variant in VARIANTS:
        top_k = settings.top_k if variant == "lm" else len(adapters)
        t0 = time.perf_counter()
        model = _patched(base, adapters, top_k)
        router = mo.train_router(
            model, texts, tokenizer, objective="lm", kind=settings.molora_kind, layer=settings.router_layer,
            epochs=settings.molora_epochs, lr=settings.molora_lr, batch_size=settings.molora_batch,
            balance_weight=settings.molora_balance_weight, max_length=settings.seq_len, val_fraction=0.1,
            seed=seed, progress=False, install=True,
            save_to=str(out / "router_lm") if variant == "lm" else None)
        seconds = time.perf_counter() - t0
        rep = router.report
        log(f"router[{variant}]: {type(router).__name__} top-{top_k} of {len(adapters)} through the LM loss, "
            f"{settings.molora_epochs} epochs in {seconds:.1f} s; held-out (router split) LM loss "
            f"{rep['val_lm_loss_before']:.3f} -> {rep['val_lm_loss']:.3f}")
        trained[variant] = {"model": model, "router": router, "top_k": top_k, "seconds": seconds}
    return trained


def _train_step(model, router, top_k: int, balance_weight: float, ids, mask):
    """One training step of `router` (forward, loss, backward into its parameters; no optimizer update, so the
    trained router is left as it is)."""
    from molora_ops.hf.train_router import lm_objective

    params = list(router.parameters())
    terms = lm_objective(model, router, ids, mask, top_k=top_k, balance_weight=balance_weight)
    terms["loss"].backward(inputs=params)
    for p in params:
        p.grad = None


def training_throughput(trained: dict, batch: torch.Tensor, *, rounds: int, balance_weight: float,
                        device) -> dict:
    """Tokens/s of one router training step for each variant on the same `batch` [B, S]: every round runs each
    variant once, in alternating order; medians over `rounds` after one warm-up round. The optimizer update (a
    few hundred parameters) is left out: the step is the routed forward, the loss and the backward into the
    router through the frozen model."""
    ids = batch.to(device)
    mask = torch.ones_like(ids)
    tokens = ids.numel()
    samples = {v: [] for v in trained}
    order = list(trained)
    saved = {v: [p.requires_grad for p in t["router"].parameters()] for v, t in trained.items()}
    try:
        for t in trained.values():
            t["router"].train()
            for p in t["router"].parameters():
                p.requires_grad_(True)
        for r in range(rounds + 1):
            for v in (order if r % 2 == 0 else order[::-1]):
                t = trained[v]
                if torch.cuda.is_available() and ids.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _train_step(t["model"], t["router"], t["top_k"], balance_weight, ids, mask)
                if torch.cuda.is_available() and ids.is_cuda:
                    torch.cuda.synchronize()
                if r > 0:
                    samples[v].append(time.perf_counter() - t0)
    finally:
        for v, t in trained.items():
            t["router"].eval()
            for p, flag in zip(t["router"].parameters(), saved[v]):
                p.requires_grad_(flag)
    out = {"batch": list(ids.shape), "rounds": rounds, "device": str(device),
           "step": "routed forward + next-token loss + load balance + backward into the router (base and "
                   "adapters frozen); no optimizer update"}
    for v, s in samples.items():
        s.sort()
        med = statistics.median(s)
        out[v] = {"top_k": trained[v]["top_k"], "median_ms": 1e3 * med, "p20_ms": 1e3 * s[int(0.2 * (len(s) - 1))],
                  "p80_ms": 1e3 * s[int(0.8 * (len(s) - 1))], "tokens_per_s": tokens / med}
    out["lm_vs_dense"] = out["lm"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    return out


DIFFERENCES = (("lm_minus_supervised", "lm", "supervised"), ("dense_minus_supervised", "dense", "supervised"),
               ("lm_minus_dense", "lm", "dense"))


def paired_comparisons(per_seq: dict, *, seed: int, resamples: int, level: float) -> dict:
    """{domain: {"sequences", "lm_minus_supervised" | "dense_minus_supervised" | "lm_minus_dense": {"mean", "ci",
    "relative", "share_negative"}}} from per-sequence losses {domain: {"supervised" | "lm" | "dense": [n]}} on the
    same held-out sequences (paired bootstrap of the mean, as the demo's other comparisons)."""
    from . import evaluate as ev

    out = {}
    for d, per in per_seq.items():
        n = {int(v.numel()) for v in per.values()}
        if len(n) != 1:
            raise ValueError(f"{d}: the compared losses cover different numbers of sequences {sorted(n)}")
        row = {"sequences": n.pop()}
        for key, a, b in DIFFERENCES:
            stat = ev.paired_bootstrap(per[a] - per[b], resamples=resamples, level=level, seed=seed)
            stat["relative"] = stat["mean"] / float(per[b].mean())
            stat.pop("sequences")
            row[key] = stat
        out[d] = row
    return out


def run_stage(pieces: dict, texts: dict, heldout: dict, supervised: dict, settings, *, out, device, seed: int,
              resamples: int, level: float, log) -> dict:
    """The stage: train the lm and dense routers on `texts` (the supervised router's), evaluate both on the
    held-out blocks `heldout` {domain: [n, S]} the supervised router was evaluated on (`supervised`: its
    per-sequence losses {domain: [n]}), compare, and time their training steps. Returns the JSON's "molora"."""
    from . import evaluate as ev

    names = list(pieces["adapters"])
    stages = {}
    t0 = time.perf_counter()
    trained = train_lm_routers(pieces["base"], pieces["adapters"], texts, pieces["tokenizer"], settings, seed=seed,
                               out=out, log=log)
    stages["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    accuracy, per_seq = {}, {d: {"supervised": supervised[d]} for d in heldout}
    for variant, t in trained.items():
        accuracy[variant], losses = ev.routed_eval(t["model"], heldout, names, batch_size=settings.eval_batch,
                                                   device=device)
        for d, v in losses.items():
            per_seq[d][variant] = v
    loss = {d: {k: float(v.mean()) for k, v in per.items()} for d, per in per_seq.items()}
    comparisons = paired_comparisons(per_seq, seed=seed, resamples=resamples, level=level)
    stages["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per = max(1, settings.molora_batch // len(names))
    batch = torch.cat([pieces["router_train"][n][:per] for n in names])
    throughput = training_throughput(trained, batch, rounds=settings.throughput_rounds,
                                     balance_weight=settings.molora_balance_weight, device=device)
    stages["throughput"] = time.perf_counter() - t0
    log(f"molora: training throughput (interleaved, medians of {settings.throughput_rounds}): lm top-"
        f"{throughput['lm']['top_k']} {throughput['lm']['tokens_per_s']:.0f} tokens/s, dense "
        f"{throughput['dense']['tokens_per_s']:.0f} tokens/s ({throughput['lm_vs_dense']:.2f}x)")
    return {
        "routers": {v: {"kind": type(t["router"]).__name__, "top_k": t["top_k"], "train_seconds": t["seconds"],
                        "report": t["router"].report} for v, t in trained.items()},
        "settings": {"epochs": settings.molora_epochs, "lr": settings.molora_lr, "batch": settings.molora_batch,
                     "balance_weight": settings.molora_balance_weight, "kind": settings.molora_kind,
                     "texts_per_adapter": settings.router_texts},
        "loss": loss,
        "loss_ci": {"level": level, "resamples": resamples, "seed": seed, "domains": comparisons},
        "router_accuracy": {v: {k: a[k] for k in ("sequence", "token", "sequences", "tokens", "confusion")}
                            for v, a in accuracy.items()},
        "throughput": throughput,
        "stages_s": stages,
    }

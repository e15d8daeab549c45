"""Evaluation through ``mo.patch``: held-out losses, router accuracy, routing traces, generations and timing.

Every number here comes from held-out token blocks that no stage trained on. The patched model computes the
adapters with molora_ops' kernels (``routed_lora``), never PEFT's layers; PEFT appears only as the baseline in
`time_forward` and in the parity check `peft_parity`.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from ..hf.routing import BASE
from ..hf.state import state_of

@torch.no_grad()
def heldout_losses(model, data: torch.Tensor, *, batch_size: int, device, routing=None) -> torch.Tensor:
    """Next-token cross-entropy (nats/token) of every sequence of `data` [n, seq]: a float64 tensor [n].
    `routing(batch)` gives a context. Every block has seq-1 predicted tokens, so the mean over sequences is
    the mean over tokens."""
    out = []
    for i in range(0, data.shape[0], batch_size):
        batch = data[i : i + batch_size].to(device)
        ctx = routing(batch.shape[0]) if routing is not None else nullcontext()
        with ctx:
            logits = model(input_ids=batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none"
        )  # [b, seq-1]
        out.append(loss.double().mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def heldout_loss(model, data: torch.Tensor, *, batch_size: int, device, routing=None) -> float:
    """Mean next-token cross-entropy (nats/token) over `data` [n, seq]; `routing(batch)` gives a context."""
    per = heldout_losses(model, data, batch_size=batch_size, device=device, routing=routing)
    return float(per.mean()) if per.numel() else 0.0


def paired_bootstrap(diff: torch.Tensor, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of paired per-sequence differences and its percentile bootstrap confidence interval (resampling
    sequences with replacement, seeded)."""
    diff = diff.double().cpu()
    n = diff.numel()
    gen = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(0, n, (resamples, n), generator=gen)].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"mean": float(diff.mean()), "ci": [lo, hi], "sequences": n,
            "share_negative": float((diff < 0).double().mean())}


@contextmanager
def record_router(model):
    """Collect the probabilities [B, S, N] that the installed router produces, forward by forward."""
    router = state_of(model).router
    calls: list[torch.Tensor] = []
    handle = router.register_forward_hook(lambda mod, args, out: calls.append(out.detach().float().cpu()))
    try:
        yield calls
    finally:
        handle.remove()


@torch.no_grad()
def routed_eval(model, heldout: dict[str, torch.Tensor], names: list[str], *, batch_size: int,
                device) -> tuple[dict, dict[str, torch.Tensor]]:
    """One pass of the installed router over the held-out blocks: its accuracy, read from the probabilities it
    gives inside the forward, and the routed per-sequence losses (as `heldout_losses`) of the same forwards.

    Per token: argmax of the token's probabilities equals the block's domain. Per sequence: argmax of the
    probabilities averaged over the block's tokens (as train_router reports it). Returns (accuracy, losses)."""
    tok_ok = tok_n = seq_ok = seq_n = 0
    confusion = {d: {n: 0 for n in names} for d in heldout}
    losses = {}
    for domain, data in heldout.items():
        label = names.index(domain) if domain in names else -1
        per = []
        for i in range(0, data.shape[0], batch_size):
            batch = data[i : i + batch_size].to(device)
            with record_router(model) as calls:
                logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none")
            per.append(loss.double().mean(1).cpu())
            probs = torch.cat(calls, dim=1) if len(calls) > 1 else calls[0]
            tok_ok += int((probs.argmax(-1) == label).sum())
            tok_n += probs.shape[0] * probs.shape[1]
            seq_pred = probs.mean(1).argmax(-1)
            seq_ok += int((seq_pred == label).sum())
            seq_n += probs.shape[0]
            for p in seq_pred.tolist():
                confusion[domain][names[p]] += 1
        losses[domain] = torch.cat(per)
    acc = {"sequence": seq_ok / seq_n, "token": tok_ok / tok_n, "sequences": seq_n, "tokens": tok_n,
           "confusion": confusion}
    return acc, losses


def router_accuracy(model, heldout: dict[str, torch.Tensor], names: list[str], *, batch_size: int, device) -> dict:
    """Held-out accuracy of the installed router (see `routed_eval`)."""
    return routed_eval(model, heldout, names, batch_size=batch_size, device=device)[0]


@torch.no_grad()
def routing_trace(model, tokenizer, prompt: str, names: list[str], *, device, max_new_tokens: int = 0) -> dict:
    """Greedy generation with the KV cache under the installed router, and the router's probabilities for
    every prompt and generated token (prefill, then one decode step per new token)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    with record_router(model) as calls:
        if max_new_tokens > 0:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
        else:
            model(input_ids=ids, use_cache=False)
            out = ids
    probs = torch.cat([c[0] for c in calls], dim=0)  # [tokens routed, N]
    tokens = out[0].tolist()
    n = min(len(tokens), probs.shape[0])  # the last generated token is never fed back, so it has no routing
    return {
        "prompt": prompt,
        "prompt_tokens": ids.shape[1],
        "text": tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=False),
        "tokens": [tokenizer.decode([t]) for t in tokens[:n]],
        "probs": probs[:n].tolist(),
        "top": [names[int(i)] for i in probs[:n].argmax(-1)],
        "decode_steps": len(calls) - 1,
    }


def summarize_trace(trace: dict) -> str:
    """Runs of tokens by top adapter: 'code[12] math[5] ...' with the prompt/generation boundary as '|'."""
    parts, prev, run = [], None, 0
    for i, top in enumerate(trace["top"]):
        if i == trace["prompt_tokens"]:
            if prev is not None:
                parts.append(f"{prev}[{run}]")
            parts.append("|")
            prev, run = None, 0
        if top == prev:
            run += 1
        else:
            if prev is not None:
                parts.append(f"{prev}[{run}]")
            prev, run = top, 1
    if prev is not None:
        parts.append(f"{prev}[{run}]")
    return " ".join(parts)


def _median_ms(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p20_ms": samples[int(0.2 * (len(samples) - 1))],
            "p80_ms": samples[int(0.8 * (len(samples) - 1))], "repeats": repeats}


@torch.no_grad()
def time_forward(base, patched, peft_model, batch: torch.Tensor, seq_names: list[str], *, repeats: int,
                 device) -> dict:
    """Forward-pass time on one mixed batch (one adapter per sequence), in the same process:
    base model alone; PEFT's mixed batch (``adapter_names=``, its best equivalent); ours with the same
    ``adapter_names``; ours routed (the router picks top-k adapters per token, which PEFT cannot express
    in one pass)."""
    import molora_ops as mo

    batch = batch.to(device)
    out = {"batch": list(batch.shape), "device": str(device)}
    out["base"] = _median_ms(lambda: base(input_ids=batch, use_cache=False), repeats)
    if peft_model is not None:
        out["peft_mixed_batch"] = _median_ms(
            lambda: peft_model(input_ids=batch, adapter_names=seq_names, use_cache=False), repeats
        )

    def ours_names():
        with mo.routing(patched, adapter_names=seq_names):
            patched(input_ids=batch, use_cache=False)

    out["molora_adapter_names"] = _median_ms(ours_names, repeats)
    out["molora_routed_topk"] = _median_ms(lambda: patched(input_ids=batch, use_cache=False), repeats)
    if "peft_mixed_batch" in out:
        out["speedup_vs_peft_mixed_batch"] = (
            out["peft_mixed_batch"]["median_ms"] / out["molora_adapter_names"]["median_ms"]
        )
    return out


@torch.no_grad()
def peft_parity(patched, peft_model, batch: torch.Tensor, seq_names: list[str], *, device) -> float:
    """Max |logits| difference between our patched model and PEFT's mixed batch for the same adapters."""
    import molora_ops as mo

    batch = batch.to(device)
    ref = peft_model(input_ids=batch, adapter_names=seq_names, use_cache=False).logits.float()
    with mo.routing(patched, adapter_names=seq_names):
        got = patched(input_ids=batch, use_cache=False).logits.float()
    return float((ref - got).abs().max())

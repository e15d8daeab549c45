"""Train a TokenRouter or ContextRouter with the base model and the adapters frozen, by one of two objectives.

    router = mo.train_router(model, {"code": code_texts, "math": math_texts}, tokenizer, kind="context")
    router = mo.train_router(patched, texts, tokenizer, objective="lm")   # texts: {adapter: [...]} or [...]
    router.report        # held-out numbers and the losses' weights
    router.save("router/"); router = molora_ops.hf.routers.load_router("router/")

``objective="labels"`` (the default): a classifier. Every token of a text is labelled with its adapter. The hidden
states entering block ``layer`` are computed once with the base model (no adapters, no gradients); only the
router's parameters are trained (Adam, cross-entropy over non-padding tokens). A held-out fraction of each
adapter's texts measures accuracy: per token (argmax of the router's probabilities) and per sequence (argmax of
the mean probability).

``objective="lm"`` (X-LoRA's setting, through our kernels): `model` must be patched with the adapters. The router
is installed in the patched model and trained on the next-token loss of the routed forward: its top-k weights
(renormalised, :func:`~molora_ops.hf.routers.select_topk`) flow with their gradient into every patched layer's
registered op, so the router learns whatever routing lowers the loss. Added to it:

  - ``balance_weight`` x :func:`load_balance_loss`, the Switch / MixLoRA load-balancing term for top-k (1 when the
    tokens' top-k choices and the mean probabilities are uniform over the adapters);
  - ``label_weight`` x the classification loss above, when the texts come labelled ({adapter: [texts]}).

The top-k weights are renormalised over the chosen adapters, so the LM loss moves a token's choice only among its
k > 1 chosen adapters (top_k = 1 gives it no gradient: refused). The report holds the held-out LM loss before and
after training (and the accuracies when the texts are labelled). If `model` is patched and ``install=True`` the
trained router becomes its router.
"""

from __future__ import annotations

import contextvars
import random
from contextlib import nullcontext
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .state import is_patched, state_of
from .routers import ContextRouter, Router, TokenRouter
from .routing import routing

__all__ = ["train_router", "load_balance_loss", "lm_objective"]


# The feature capture of the train_router call running in this thread / task (other threads' forwards through
# the same model are neither captured nor changed).
_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("molora_train_router_capture", default=None)


def _blocks(model):
    if is_patched(model) and state_of(model).blocks is not None:
        return state_of(model).blocks
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise ValueError("cannot find the decoder blocks (an nn.ModuleList) of this model")
    return best


def _encode(tokenizer, texts, max_length):
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"text {text[:40]!r} has no tokens")
        out.append(ids)
    return out


@torch.no_grad()
def _features(model, blocks, layer, seqs, batch_size, device):
    """Hidden states entering block `layer` for each sequence, from the base model (a patched model runs with
    every sequence routed to "__base__", in this thread only): list of [L_i, H] float32 tensors."""
    captured = {}

    def hook(module, args, kwargs):
        if _CAPTURE.get() is captured:
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    token = _CAPTURE.set(captured)
    feats = []
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            base_only = routing(model, adapter_names=["__base__"] * len(chunk)) if is_patched(model) else nullcontext()
            with base_only:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            h = captured.pop("h").float()
            for j, s in enumerate(chunk):
                feats.append(h[j, : len(s)].clone())
    finally:
        _CAPTURE.reset(token)
        handle.remove()
    return feats


def _pad(feats, labels, idx, device):
    width = max(feats[i].shape[0] for i in idx)
    hdim = feats[idx[0]].shape[-1]
    h = torch.zeros(len(idx), width, hdim, device=device)
    mask = torch.zeros(len(idx), width, device=device)
    y = torch.zeros(len(idx), dtype=torch.long, device=device)
    for j, i in enumerate(idx):
        n = feats[i].shape[0]
        h[j, :n] = feats[i]
        mask[j, :n] = 1
        y[j] = labels[i]
    return h, mask, y


def _router_logits(router, h, mask):
    if isinstance(router, ContextRouter):
        return router.logits(h, attention_mask=mask, past_len=0, state=None)
    return router.logits(h)


def load_balance_loss(probs: torch.Tensor, topk_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load balancing extended to top-k (as MixLoRA uses it): ``N * sum_i f_i * P_i``.

    probs [..., N] router probabilities (differentiable); topk_ids [..., K] the chosen adapters (-1: empty slot);
    mask [...] 1 for tokens that count (None: all). f_i is the share of the counted tokens' non-empty top-k slots
    that chose adapter i (a count: no gradient), P_i the mean probability of adapter i over the counted tokens.
    Returns a scalar; 1.0 when both are uniform, N when every token puts everything on one adapter."""
    n = probs.shape[-1]
    if topk_ids.shape[:-1] != probs.shape[:-1]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must have probs' leading dims {tuple(probs.shape[:-1])}")
    p = probs.reshape(-1, n)
    ids = topk_ids.reshape(p.shape[0], -1)
    m = torch.ones(p.shape[0], dtype=p.dtype, device=p.device) if mask is None else mask.reshape(-1).to(p.dtype)
    if mask is not None and mask.numel() != p.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} must have probs' leading dims {tuple(probs.shape[:-1])}")
    live = (ids >= 0).to(p.dtype) * m[:, None]
    counts = torch.zeros(n, dtype=p.dtype, device=p.device).index_add_(0, ids.clamp_min(0).reshape(-1), live.reshape(-1))
    f = counts / live.sum().clamp_min(1.0)
    mean_p = (p * m[:, None]).sum(0) / m.sum().clamp_min(1.0)
    return n * (f.detach() * mean_p).sum()


def _split(texts, val_fraction: float, rng: random.Random):
    """(texts, labels or None, is_val) from {name: [texts]} (label = the name's position) or a list of texts."""
    groups = list(texts.values()) if isinstance(texts, Mapping) else [list(texts)]
    seqs, labels, is_val = [], [], []
    for label, group in enumerate(groups):
        group = list(group)
        order = list(range(len(group)))
        rng.shuffle(order)
        n_val = max(1, int(round(val_fraction * len(group)))) if len(group) >= 2 and val_fraction > 0 else 0
        for rank, i in enumerate(order):
            seqs.append(group[i])
            labels.append(label)
            is_val.append(rank < n_val)
    return seqs, (labels if isinstance(texts, Mapping) else None), is_val


def _check_texts(texts, objective: str, names: Optional[list]) -> None:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (Mapping, Sequence)):
        raise TypeError("texts must be {adapter name: [texts]} or (objective='lm') a list of texts, got "
                        f"{type(texts).__name__}")
    if isinstance(texts, Mapping):
        for name, group in texts.items():
            if isinstance(group, (str, bytes)) or not len(group):
                raise ValueError(f"texts for adapter {name!r} must be a non-empty list of strings")
        if names is not None and [n for n in texts if n not in names]:
            raise ValueError(f"texts name adapters {[n for n in texts if n not in names]} that the patched model "
                             f"does not have (adapters: {names})")
    elif objective == "labels":
        raise TypeError("objective='labels' needs labelled texts {adapter name: [texts]}; a plain list of texts "
                        "trains only with objective='lm'")
    elif len(texts) < 2:
        raise ValueError("objective='lm' needs at least two texts (some are held out)")


def train_router(
    model,
    texts_by_adapter,
    tokenizer,
    *,
    objective: str = "labels",
    kind: str = "token",
    router: Optional[Router] = None,
    layer: int = 0,
    hidden: Optional[int] = None,
    temperature: float = 1.0,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 16,
    max_length: int = 128,
    val_fraction: float = 0.2,
    balance_weight: float = 0.01,
    label_weight: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    install: bool = True,
    save_to: Optional[str] = None,
) -> Router:
    """Train a router; returns it with ``.report`` (held-out numbers, see the module docstring).

    Args:
        model: the transformers model, frozen. "labels": patched or plain (only its hidden states are read).
            "lm": patched with the adapters (the router trains through the routed forward).
        texts_by_adapter: {adapter name: [texts]} (labelled); "lm" also takes a plain list of texts. "labels":
            the names' order is the router's adapter order (for a patched model it must equal the patch's order);
            "lm": the router's adapters are the patch's, and the names (a subset of them) only label the texts.
        tokenizer: the model's tokenizer.
        objective: "labels" (classification on frozen base features) or "lm" (next-token loss through the patch).
        kind: "token" (TokenRouter) or "context" (ContextRouter), unless `router` is given (then it is trained).
        layer: block whose input hidden states the router reads (0 = embeddings).
        hidden: width of an MLP gate (None: linear gate).
        epochs, lr, batch_size: Adam full passes over the training texts.
        val_fraction: held-out share of each adapter's texts (at least one text each when it has two or more).
        balance_weight: "lm": weight of :func:`load_balance_loss` (reported as ``balance_weight``).
        label_weight: "lm" with labelled texts: weight of the per-token classification loss (0: none).
        progress: show a tqdm progress bar.
        install: when `model` is patched, make the trained router its router.
        save_to: optional directory to save the router into.
    """
    if objective not in ("labels", "lm"):
        raise ValueError(f"objective must be 'labels' or 'lm', got {objective!r}")
    state = state_of(model) if is_patched(model) else None
    if objective == "lm":
        if state is None:
            raise ValueError("objective='lm' trains through the adapters: patch the model first (mo.patch)")
        if isinstance(state.router, (list, tuple, nn.ModuleList)):
            raise ValueError("objective='lm' trains one router; this model is patched with per-layer routers")
        if state.top_k < 2:
            raise ValueError(f"objective='lm' needs top_k >= 2 (the patch has top_k={state.top_k}): a single chosen "
                             "adapter's renormalised weight is always 1, so the LM loss gives the router no gradient")
        if balance_weight < 0 or label_weight < 0:
            raise ValueError(f"balance_weight and label_weight must be >= 0, got {balance_weight}, {label_weight}")
        if label_weight > 0 and not isinstance(texts_by_adapter, Mapping):
            raise ValueError("label_weight > 0 needs labelled texts {adapter name: [texts]}")
    _check_texts(texts_by_adapter, objective, state.adapter_names if objective == "lm" else None)
    names = list(state.adapter_names) if objective == "lm" else list(texts_by_adapter)
    if objective == "labels":
        if len(names) < 2:
            raise ValueError("train_router needs texts for at least two adapters")
        if state is not None and install and list(state.adapter_names) != names:
            raise ValueError(f"texts_by_adapter order {names} must match the patched adapters {state.adapter_names}")
    blocks = _blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer={layer} is not a block index (model has {len(blocks)} blocks)")
    device = next(model.parameters()).device
    seqs, labels, is_val = _split(texts_by_adapter, val_fraction, random.Random(seed))
    if labels is not None and objective == "lm":  # label = the adapter's position in the patch
        keys = list(texts_by_adapter)
        labels = [names.index(keys[i]) for i in labels]
    encoded = _encode(tokenizer, seqs, max_length)
    train_idx = [i for i, v in enumerate(is_val) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
    was_training = model.training
    model.eval()
    try:
        if objective == "labels":
            feats = _features(model, blocks, layer, encoded, batch_size, device)
            router = _new_router(router, kind, feats[0].shape[-1], names, layer, hidden, temperature, seed, device)
            report = _fit_labels(router, feats, labels, train_idx, val_idx, names, epochs, lr, batch_size, seed,
                                 device, progress)
        else:
            hdim = getattr(model.config, "hidden_size", None)
            router = _new_router(router, kind, hdim, names, layer, hidden, temperature, seed, device)
            report = _fit_lm(model, state, router, encoded, labels, train_idx, val_idx, epochs, lr, batch_size,
                             seed, device, progress, balance_weight, label_weight, install)
    finally:
        model.train(was_training)
    router.eval()
    router.report = report
    for p in router.parameters():
        p.requires_grad_(False)
    if save_to:
        router.save(save_to)
    if state is not None and install:
        _install(state, router)
    return router


def _new_router(router, kind, hdim, names, layer, hidden, temperature, seed, device) -> Router:
    if router is None:
        if kind not in ("token", "context"):
            raise ValueError(f"kind must be 'token' or 'context', got {kind!r}")
        cls = TokenRouter if kind == "token" else ContextRouter
        torch.manual_seed(seed)
        router = cls(hdim, names, layer=layer, hidden=hidden, temperature=temperature)
    elif list(router.adapter_names) != list(names):
        raise ValueError(f"router was built for adapters {router.adapter_names}, expected {names}")
    router = router.to(device).float().train()
    for p in router.parameters():
        p.requires_grad_(True)
    return router


def _install(state, router) -> None:
    if state.blocks is None or not 0 <= router.layer < len(state.blocks):
        raise ValueError("cannot install the router: block list not found")
    state.router = router
    state.hooks.set_router_block(state.blocks[router.layer])


def _fit_labels(router, feats, labels, train_idx, val_idx, names, epochs, lr, batch_size, seed, device,
                progress) -> dict:
    """The classifier: cross-entropy of the router's per-token probabilities against the text's adapter."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    last_loss = float("nan")
    bar = tqdm(range(epochs), desc="train_router", disable=not progress)
    for _ in bar:
        perm = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
        total, count = 0.0, 0
        for i in range(0, len(perm), batch_size):
            h, mask, y = _pad(feats, labels, perm[i : i + batch_size], device)
            logits = _router_logits(router, h, mask) / router.temperature
            loss_tok = nn.functional.cross_entropy(
                logits.reshape(-1, len(names)), y[:, None].expand_as(mask).reshape(-1), reduction="none"
            )
            loss = (loss_tok * mask.reshape(-1)).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(h)
            count += len(h)
        last_loss = total / max(count, 1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
    report = {"objective": "labels", "train_loss": last_loss, "num_train": len(train_idx), "num_val": len(val_idx)}
    if val_idx:
        with torch.no_grad():
            h, mask, y = _pad(feats, labels, val_idx, device)
            probs = torch.softmax(_router_logits(router, h, mask) / router.temperature, dim=-1)
            report.update(_accuracy(probs, mask, y))
        if progress:
            tqdm.write(
                f"train_router: held-out token accuracy {report['val_token_accuracy']:.3f}, "
                f"sequence accuracy {report['val_sequence_accuracy']:.3f} ({len(val_idx)} texts)"
            )
    return report


def _accuracy(probs, mask, y) -> dict:
    """Per token (argmax) and per sequence (argmax of the mean over its tokens) against labels y [B]."""
    tok_ok = ((probs.argmax(-1) == y[:, None]).float() * mask).sum() / mask.sum()
    seq_probs = (probs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return {"val_token_accuracy": float(tok_ok), "val_sequence_accuracy": float((seq_probs.argmax(-1) == y).float().mean())}


# ------------------------------------------------------------------------------------------ the LM objective
def _token_batch(encoded, labels, idx, device):
    """ids [B, W] (0-padded on the right), mask [B, W] 1 for real tokens, labels [B] (None without labels)."""
    width = max(len(encoded[i]) for i in idx)
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for j, i in enumerate(idx):
        ids[j, : len(encoded[i])] = torch.tensor(encoded[i])
        mask[j, : len(encoded[i])] = 1
    y = None if labels is None else torch.tensor([labels[i] for i in idx], device=device)
    return ids.to(device), mask.to(device), y


def _next_token_loss(logits, ids, mask):
    """(sum of next-token cross-entropies over real target tokens, their count)."""
    target_mask = (mask[:, 1:] * mask[:, :-1]).float()
    ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return (ce * target_mask).sum(), target_mask.sum()


def _routed_step(model, router, ids, mask):
    """One routed forward: (logits, the router's probabilities [B, W, N] of that forward, with their graph)."""
    calls = []
    handle = router.register_forward_hook(lambda mod, args, out: calls.append(out))
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(f"the router ran {len(calls)} times in one forward; expected once")
    return logits, calls[0]


def lm_objective(model, router, ids, mask, *, top_k: int, balance_weight: float = 0.0, label_weight: float = 0.0,
                 labels: Optional[torch.Tensor] = None) -> dict:
    """One routed forward of ``objective="lm"``: the training loss, with its graph, and its parts.

    `router` must be the patched `model`'s installed router; ids, mask [B, W] (mask 1 for real tokens); labels [B]
    the texts' adapter positions (needed when label_weight > 0). Returns {"loss", "lm", "balance", "label",
    "tokens"}: loss = lm + balance_weight x balance (+ label_weight x label), lm the mean next-token loss over
    `tokens` real target tokens, balance :func:`load_balance_loss` of the top_k choices."""
    if label_weight > 0 and labels is None:
        raise ValueError("lm_objective: label_weight > 0 needs labels (a [B] tensor of adapter positions)")
    logits, probs = _routed_step(model, router, ids, mask)
    lm_sum, count = _next_token_loss(logits, ids, mask)
    lm = lm_sum / count.clamp_min(1.0)
    topk_ids, _ = router.select(probs, top_k)
    balance = load_balance_loss(probs, topk_ids, mask)
    loss = lm + balance_weight * balance
    label = torch.zeros(())
    if label_weight > 0:
        label = _label_loss(probs, mask, labels)
        loss = loss + label_weight * label
    return {"loss": loss, "lm": lm, "balance": balance, "label": label, "tokens": count}


def _fit_lm(model, state, router, encoded, labels, train_idx, val_idx, epochs, lr, batch_size, seed, device,
            progress, balance_weight, label_weight, install) -> dict:
    """Adam on LM loss + balance_weight * load balance (+ label_weight * classification) through the patched model,
    with the router installed (the previous router comes back afterwards unless `install`)."""
    from tqdm.auto import tqdm

    previous = state.router
    _install(state, router)
    params = list(router.parameters())
    try:
        before = _lm_eval(model, router, encoded, labels, val_idx, batch_size, device)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        last = {}
        bar = tqdm(range(epochs), desc="train_router[lm]", disable=not progress)
        for _ in bar:
            perm = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
            sums = {"lm": 0.0, "balance": 0.0, "label": 0.0}
            tokens = 0.0
            for i in range(0, len(perm), batch_size):
                ids, mask, y = _token_batch(encoded, labels, perm[i : i + batch_size], device)
                terms = lm_objective(model, router, ids, mask, top_k=state.top_k, balance_weight=balance_weight,
                                     label_weight=label_weight, labels=y)
                opt.zero_grad()
                terms["loss"].backward(inputs=params)
                opt.step()
                n = float(terms["tokens"])
                tokens += n
                for key in ("lm", "balance", "label"):
                    sums[key] += float(terms[key].detach()) * n
            last = {k: v / max(tokens, 1.0) for k, v in sums.items()}
            bar.set_postfix(lm=f"{last['lm']:.4f}", balance=f"{last['balance']:.3f}")
        after = _lm_eval(model, router, encoded, labels, val_idx, batch_size, device)
    finally:
        if not install:
            state.router = previous
            state.hooks.set_router_block(state.blocks[previous.layer] if previous is not None else None)
    report = {"objective": "lm", "train_loss": last.get("lm", float("nan")), "train_balance_loss": last.get("balance"),
              "balance_weight": balance_weight, "label_weight": label_weight, "top_k": state.top_k,
              "num_train": len(train_idx), "num_val": len(val_idx),
              "val_lm_loss_before": before.pop("val_lm_loss"), **after}
    if label_weight > 0:
        report["train_label_loss"] = last.get("label")
    if progress and val_idx:
        tqdm.write(f"train_router[lm]: held-out LM loss {report['val_lm_loss_before']:.4f} -> "
                   f"{report['val_lm_loss']:.4f} ({len(val_idx)} texts)")
    return report


def _label_loss(probs, mask, y):
    """Mean per-token negative log probability of the text's adapter over real tokens."""
    logp = torch.log(probs.clamp_min(1e-30))
    picked = logp.gather(-1, y[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(-1)
    m = mask.to(picked.dtype)
    return -(picked * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def _lm_eval(model, router, encoded, labels, idx, batch_size, device) -> dict:
    """Held-out next-token loss (mean over real target tokens) of the routed model, and with labels the router's
    token and sequence accuracies (argmax of its probabilities in the same forwards)."""
    if not idx:
        return {"val_lm_loss": None}
    total = count = 0.0
    tok_ok = tok_n = seq_ok = 0.0
    for i in range(0, len(idx), batch_size):
        ids, mask, y = _token_batch(encoded, labels, idx[i : i + batch_size], device)
        logits, probs = _routed_step(model, router, ids, mask)
        s, c = _next_token_loss(logits, ids, mask)
        total, count = total + float(s), count + float(c)
        if y is not None:
            acc = _accuracy(probs.float(), mask.float(), y)
            n_tok = float(mask.sum())
            tok_ok += acc["val_token_accuracy"] * n_tok
            tok_n += n_tok
            seq_ok += acc["val_sequence_accuracy"] * len(y)
    out = {"val_lm_loss": total / max(count, 1.0)}
    if labels is not None:
        out.update(val_token_accuracy=tok_ok / max(tok_n, 1.0), val_sequence_accuracy=seq_ok / len(idx))
    return out

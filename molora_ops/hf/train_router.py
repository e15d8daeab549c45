"""Train a TokenRouter or ContextRouter on labelled texts, with the base model and the adapters frozen.

    router = mo.train_router(model, {"code": code_texts, "math": math_texts}, tokenizer, kind="context")
    router.report        # {"val_token_accuracy": ..., "val_sequence_accuracy": ..., "train_loss": ...}
    router.save("router/"); router = molora_ops.hf.routers.load_router("router/")

Every token of a text is labelled with its adapter. The hidden states entering block ``layer`` are computed
once with the base model (no adapters, no gradients); only the router's parameters are trained (Adam,
cross-entropy over non-padding tokens). A held-out fraction of each adapter's texts measures accuracy: per
token (argmax of the router's probabilities) and per sequence (argmax of the mean probability). If `model`
is patched with these adapters and ``install=True`` the trained router becomes its router.
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

__all__ = ["train_router"]


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


def train_router(
    model,
    texts_by_adapter: Mapping[str, Sequence[str]],
    tokenizer,
    *,
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
    seed: int = 0,
    progress: bool = True,
    install: bool = True,
    save_to: Optional[str] = None,
) -> Router:
    """Train a router on {adapter name: [texts]}; returns it with ``.report`` (held-out accuracies).

    Args:
        model: the (patched or plain) transformers model; frozen, used only for hidden states.
        texts_by_adapter: labelled texts; the names' order is the router's adapter order (for a patched model
            it must equal the order given to ``patch``).
        tokenizer: the model's tokenizer.
        kind: "token" (TokenRouter) or "context" (ContextRouter), unless `router` is given.
        layer: block whose input hidden states the router reads (0 = embeddings).
        hidden: width of an MLP gate (None: linear gate).
        epochs, lr, batch_size: Adam full passes over the training texts.
        val_fraction: held-out share of each adapter's texts (at least one text each when it has two or more).
        progress: show a tqdm progress bar.
        install: when `model` is patched, make the trained router its router.
        save_to: optional directory to save the router into.
    """
    from tqdm.auto import tqdm

    names = list(texts_by_adapter)
    if len(names) < 2:
        raise ValueError("train_router needs texts for at least two adapters")
    state = state_of(model) if is_patched(model) else None
    if state is not None and install and list(state.adapter_names) != names:
        raise ValueError(f"texts_by_adapter order {names} must match the patched adapters {state.adapter_names}")
    blocks = _blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer={layer} is not a block index (model has {len(blocks)} blocks)")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    seqs, labels, is_val = [], [], []
    for label, name in enumerate(names):
        texts = list(texts_by_adapter[name])
        if not texts:
            raise ValueError(f"no texts for adapter {name!r}")
        order = list(range(len(texts)))
        rng.shuffle(order)
        n_val = max(1, int(round(val_fraction * len(texts)))) if len(texts) >= 2 and val_fraction > 0 else 0
        for rank, i in enumerate(order):
            seqs.append(texts[i])
            labels.append(label)
            is_val.append(rank < n_val)
    encoded = _encode(tokenizer, seqs, max_length)
    was_training = model.training
    model.eval()
    try:
        feats = _features(model, blocks, layer, encoded, batch_size, device)
    finally:
        model.train(was_training)
    hdim = feats[0].shape[-1]
    if router is None:
        if kind not in ("token", "context"):
            raise ValueError(f"kind must be 'token' or 'context', got {kind!r}")
        cls = TokenRouter if kind == "token" else ContextRouter
        torch.manual_seed(seed)
        router = cls(hdim, names, layer=layer, hidden=hidden, temperature=temperature)
    router = router.to(device).float().train()
    train_idx = [i for i, v in enumerate(is_val) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
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
    router.eval()
    report = {"train_loss": last_loss, "num_train": len(train_idx), "num_val": len(val_idx)}
    if val_idx:
        with torch.no_grad():
            h, mask, y = _pad(feats, labels, val_idx, device)
            probs = torch.softmax(_router_logits(router, h, mask) / router.temperature, dim=-1)
            tok_ok = ((probs.argmax(-1) == y[:, None]).float() * mask).sum() / mask.sum()
            seq_probs = (probs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            report["val_token_accuracy"] = float(tok_ok)
            report["val_sequence_accuracy"] = float((seq_probs.argmax(-1) == y).float().mean())
        if progress:
            tqdm.write(
                f"train_router: held-out token accuracy {report['val_token_accuracy']:.3f}, "
                f"sequence accuracy {report['val_sequence_accuracy']:.3f} ({len(val_idx)} texts)"
            )
    router.report = report
    for p in router.parameters():
        p.requires_grad_(False)
    if save_to:
        router.save(save_to)
    if state is not None and install:
        if router.layer != layer or state.blocks is None:
            raise ValueError("cannot install the router: block list not found")
        state.router = router
        state.hooks.set_router_block(state.blocks[router.layer])
    return router

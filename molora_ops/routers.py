"""Routers: per-token adapter probabilities [B, S, N], then top-k with renormalisation.

A router given to :func:`molora_ops.patch` runs inside the model's own forward: a pre-hook on decoder block
``router.layer`` hands it the hidden states entering that block (``layer=0``: the embeddings), it returns
probabilities, :meth:`select` keeps each token's ``top_k`` and renormalises them, and that routing is shared by
every patched layer of the forward (patched modules in blocks before ``layer`` run the base only).
Routers see one forward at a time; with a KV cache, state that spans tokens (ContextRouter's running mean,
KeywordRouter's counts) is read from and recorded into ``state`` (a :class:`~molora_ops.router_state.RouterState`),
which the patch keeps per position beside the KV cache, so it follows beam reordering, cropping and batch
selection of the cache.

    TokenRouter    a linear (or one-hidden-layer MLP) gate on each token's hidden state
    ContextRouter  the same gate on the causal running mean of hidden states: token t decides from tokens <= t,
                   like Temporal LoRA's "Time Mixer"
    KeywordRouter  rule based: keywords seen so far (causally) add weight to their adapters; a token with no
                   keyword seen gets no adapter (the base model)

Temperature divides the gate logits before the softmax (KeywordRouter: scores ** (1 / T)).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["Router", "TokenRouter", "ContextRouter", "KeywordRouter", "load_router", "select_topk"]


def select_topk(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] probabilities -> ids [..., K] (-1 where the probability is 0) and weights renormalised to sum 1."""
    k = min(int(top_k), probs.shape[-1])
    vals, ids = probs.float().topk(k, dim=-1)
    live = vals > 0
    total = (vals * live).sum(-1, keepdim=True)
    weights = torch.where(live, vals / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(vals))
    return torch.where(live, ids, torch.full_like(ids, -1)), weights


class Router(nn.Module):
    """Base class. Subclasses implement :meth:`forward` -> probabilities [B, S, N]."""

    kind = "router"

    def __init__(self, adapter_names: Sequence[str], *, layer: int = 0, temperature: float = 1.0):
        super().__init__()
        if not adapter_names:
            raise ValueError("a router needs at least one adapter name")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.adapter_names = list(adapter_names)
        self.num_adapters = len(self.adapter_names)
        self.layer = int(layer)
        self.temperature = float(temperature)

    def select(self, probs: torch.Tensor, top_k: int):
        return select_topk(probs, top_k)

    # --- save / load
    def _config(self) -> dict:
        return dict(adapter_names=self.adapter_names, layer=self.layer, temperature=self.temperature)

    def save(self, path: str) -> None:
        """Write ``router.json`` (class and arguments) and ``router.safetensors`` (parameters) into `path`."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "router.json"), "w", encoding="utf-8") as fh:
            json.dump({"class": type(self).__name__, "config": self._config()}, fh, indent=2)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, "router.safetensors"))

    @classmethod
    def load(cls, path: str, **extra) -> "Router":
        return load_router(path, **extra)


def _gate(hidden_size: int, num_adapters: int, hidden: Optional[int]) -> nn.Module:
    if hidden:
        return nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, num_adapters))
    return nn.Linear(hidden_size, num_adapters)


class TokenRouter(Router):
    """A gate on each token's hidden state at block `layer`: softmax(gate(h_t) / T)."""

    kind = "token"

    def __init__(self, hidden_size: int, adapter_names, *, layer: int = 0, hidden: Optional[int] = None,
                 temperature: float = 1.0, normalize: bool = True):
        super().__init__(adapter_names, layer=layer, temperature=temperature)
        self.hidden_size = int(hidden_size)
        self.hidden = hidden
        self.normalize = normalize
        self.gate = _gate(self.hidden_size, self.num_adapters, hidden)

    def _config(self):
        return dict(super()._config(), hidden_size=self.hidden_size, hidden=self.hidden, normalize=self.normalize)

    def _features(self, hidden_states):
        h = hidden_states.float()
        return nn.functional.layer_norm(h, h.shape[-1:]) if self.normalize else h

    def logits(self, hidden_states, **_):
        w = self.gate[0].weight if isinstance(self.gate, nn.Sequential) else self.gate.weight
        return self.gate(self._features(hidden_states).to(w.dtype)).float()

    def forward(self, hidden_states, *, input_ids=None, attention_mask=None, past_len=0, state=None):
        return torch.softmax(self.logits(hidden_states) / self.temperature, dim=-1)


class ContextRouter(TokenRouter):
    """The gate on the causal running mean of hidden states (tokens <= t, padding excluded).

    With a KV cache the running sum and count after each position are kept in `state` across decode steps."""

    kind = "context"

    def running_mean(self, hidden_states, attention_mask=None, past_len=0, state=None):
        h = self._features(hidden_states)  # [B, S, H]
        b, s, _ = h.shape
        mask = torch.ones(b, s, device=h.device, dtype=h.dtype)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= past_len + s:
            mask = attention_mask[:, past_len : past_len + s].to(h.dtype)
        total = torch.cumsum(h * mask[..., None], dim=1)
        count = torch.cumsum(mask, dim=1)
        key = ("context", id(self))
        prev = state.previous(key) if state is not None else None
        if prev is not None:  # the running sum and count after the cached positions
            total = total + prev[0][:, -1, None].to(total.dtype)
            count = count + prev[1][:, -1, None].to(count.dtype)
        if state is not None:
            state.record(key, total, count)
        return total / count[..., None].clamp_min(1.0)

    def logits(self, hidden_states, *, attention_mask=None, past_len=0, state=None):
        mean = self.running_mean(hidden_states, attention_mask, past_len, state)
        w = self.gate[0].weight if isinstance(self.gate, nn.Sequential) else self.gate.weight
        return self.gate(mean.to(w.dtype)).float()

    def forward(self, hidden_states, *, input_ids=None, attention_mask=None, past_len=0, state=None):
        logits = self.logits(hidden_states, attention_mask=attention_mask, past_len=past_len, state=state)
        return torch.softmax(logits / self.temperature, dim=-1)


class KeywordRouter(Router):
    """Rule based. `keywords` maps adapter -> [keyword, ...] or {keyword: weight}. Every occurrence of a keyword
    (as token ids, with and without a leading space) adds its weight to its adapter from that token on; the
    probabilities are the normalised scores (** 1/T). E.g. {"code": {"def": 0.5}, "math": {"sum": 0.4}}."""

    kind = "keyword"

    def __init__(self, keywords: Mapping[str, object], tokenizer=None, *, adapter_names=None, layer: int = 0,
                 temperature: float = 1.0):
        names = list(adapter_names) if adapter_names is not None else list(keywords)
        super().__init__(names, layer=layer, temperature=temperature)
        unknown = [k for k in keywords if k not in names]
        if unknown:
            raise ValueError(f"keywords for unknown adapters {unknown}; adapters: {names}")
        self.keywords = {a: (dict(v) if isinstance(v, Mapping) else {str(w): 1.0 for w in v}) for a, v in keywords.items()}
        self.tokenizer = tokenizer
        self._patterns = None

    def _config(self):
        return dict(super()._config(), keywords=self.keywords)

    def patterns(self):
        """[(token id tuple, adapter index, weight)], from the tokenizer (built once)."""
        if self._patterns is None:
            if self.tokenizer is None:
                raise ValueError("KeywordRouter needs a tokenizer to match keywords")
            pats = set()
            for a, kws in self.keywords.items():
                for word, weight in kws.items():
                    for variant in (word, " " + word):
                        ids = tuple(self.tokenizer.encode(variant, add_special_tokens=False))
                        if ids:
                            pats.add((ids, self.adapter_names.index(a), float(weight)))
            self._patterns = sorted(pats)
        return self._patterns

    def scores(self, input_ids, past_len=0, state=None):
        """[B, S, N] keyword scores of the S new tokens (ids [B, S] on the CPU), counting every keyword seen since
        the start of the sequence (the cached positions' ids and scores come from `state`)."""
        pats = self.patterns()
        longest = max((len(p[0]) for p in pats), default=1)
        b, s = input_ids.shape
        key = ("keyword", id(self))
        prev = state.previous(key) if state is not None else None
        score = prev[0][:, -1].clone() if prev is not None else torch.zeros(b, self.num_adapters)
        tails = prev[1][:, -(longest - 1) :].tolist() if prev is not None and longest > 1 else [[] for _ in range(b)]
        out = torch.zeros(b, s, self.num_adapters)
        rows = input_ids.tolist()
        for i in range(b):
            hist = tails[i]
            for t in range(s):
                hist.append(rows[i][t])
                for ids, a, w in pats:
                    if len(hist) >= len(ids) and tuple(hist[-len(ids):]) == ids:
                        score[i, a] += w
                out[i, t] = score[i]
                del hist[: max(0, len(hist) - longest)]
        if state is not None:
            state.record(key, out, input_ids)
        return out

    def forward(self, hidden_states=None, *, input_ids=None, attention_mask=None, past_len=0, state=None):
        if input_ids is None:
            raise ValueError("KeywordRouter needs input_ids (call the model with input_ids, not inputs_embeds)")
        score = self.scores(input_ids.cpu(), past_len, state).clamp_min(0) ** (1.0 / self.temperature)
        total = score.sum(-1, keepdim=True)
        probs = torch.where(total > 0, score / total.clamp_min(1e-30), torch.zeros_like(score))
        return probs.to(input_ids.device)


_CLASSES = {"TokenRouter": TokenRouter, "ContextRouter": ContextRouter, "KeywordRouter": KeywordRouter}


def load_router(path: str, tokenizer=None) -> Router:
    """Load a router written by :meth:`Router.save` (KeywordRouter needs its tokenizer again)."""
    cfg_path = os.path.join(path, "router.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no router.json (not a saved molora_ops router)")
    with open(cfg_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    cls = _CLASSES.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_path}: unknown router class {meta.get('class')!r}")
    cfg = dict(meta["config"])
    if cls is KeywordRouter:
        return KeywordRouter(cfg.pop("keywords"), tokenizer, **cfg)
    hidden_size = cfg.pop("hidden_size")
    names = cfg.pop("adapter_names")
    router = cls(hidden_size, names, **cfg)
    from safetensors.torch import load_file

    router.load_state_dict(load_file(os.path.join(path, "router.safetensors")))
    return router

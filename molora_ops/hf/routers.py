"""Routers: per-token adapter probabilities [B, S, N], then top-k with renormalisation.

A router given to :func:`molora_ops.patch` runs inside the model's own forward: a pre-hook on decoder block
``router.layer`` hands it the hidden states entering that block (``layer=0``: the embeddings), it returns
probabilities, :meth:`select` keeps each token's ``top_k`` and renormalises them, and that routing is shared by
every patched layer of the forward (patched modules in blocks before ``layer`` run the base only).
Routers see one forward at a time; with a KV cache, state that spans tokens (ContextRouter's running mean,
KeywordRouter's counts) is read from and recorded into ``state`` (a :class:`~molora_ops.hf.router_state.RouterState`),
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

import itertools
import json
import math
import os
import reprlib
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["Router", "TokenRouter", "ContextRouter", "KeywordRouter", "load_router", "check_router", "select_topk"]

ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 when it is float64 (so a float64 router stays gradcheck-able)."""
    return t if t.dtype == torch.float64 else t.float()


def select_topk(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] probabilities -> ids [..., K] (-1 where the probability is 0) and weights renormalised to sum 1
    (float32, or float64 for float64 probabilities)."""
    k = min(int(top_k), probs.shape[-1])
    vals, ids = _wide(probs).topk(k, dim=-1)
    live = vals > 0
    total = (vals * live).sum(-1, keepdim=True)
    weights = torch.where(live, vals / total.clamp_min(torch.finfo(vals.dtype).tiny), torch.zeros_like(vals))
    return torch.where(live, ids, torch.full_like(ids, -1)), weights


class Router(nn.Module):
    """Base class. Subclasses implement :meth:`forward` -> probabilities [B, S, N]."""

    kind = "router"
    stateful = False  # True: its decision at a position depends on earlier positions, kept beside the KV cache
    traceable = True  # False: it cannot run inside torch.compile or a CUDA-graph capture

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
        """Write ``router.json`` (class and arguments) and ``router.safetensors`` (parameters) into `path`.

        Refuses (ValueError) what :func:`load_router` would refuse: non-finite parameters, a config that is not
        JSON."""
        from safetensors.torch import save_file

        check_router(self)
        try:
            text = json.dumps({"class": type(self).__name__, "config": self._config()}, indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot save {type(self).__name__}: its config is not plain JSON ({exc})") from exc
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, ROUTER_CONFIG), "w", encoding="utf-8") as fh:
            fh.write(text)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, ROUTER_WEIGHTS))

    @classmethod
    def load(cls, path: str, **extra) -> "Router":
        """:func:`load_router`, refusing (ValueError) a saved router that is not a `cls`."""
        router = load_router(path, **extra)
        if not isinstance(router, cls):
            raise ValueError(f"{path} holds a {type(router).__name__}, not a {cls.__name__}")
        return router


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
        h = _wide(hidden_states)
        return nn.functional.layer_norm(h, h.shape[-1:]) if self.normalize else h

    def logits(self, hidden_states, **_):
        w = self.gate[0].weight if isinstance(self.gate, nn.Sequential) else self.gate.weight
        return _wide(self.gate(self._features(hidden_states).to(w.dtype)))

    def forward(self, hidden_states, *, input_ids=None, attention_mask=None, past_len=0, state=None):
        return torch.softmax(self.logits(hidden_states) / self.temperature, dim=-1)


class ContextRouter(TokenRouter):
    """The gate on the causal running mean of hidden states (tokens <= t, padding excluded).

    `attention_mask` is [B, S] for the S new tokens (what the patch passes) or the model's [B, past_len + S] mask;
    1 marks real tokens.

    With a KV cache the running sum and count after each position are kept in `state` across decode steps."""

    kind = "context"
    stateful = True  # its running mean continues across cached decode steps (molora_ops.hf.router_state)

    def running_mean(self, hidden_states, attention_mask=None, past_len=0, state=None):
        h = self._features(hidden_states)  # [B, S, H]
        b, s, _ = h.shape
        mask = torch.ones(b, s, device=h.device, dtype=h.dtype)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] in (s, past_len + s):
            mask = attention_mask[:, -s:].to(h.dtype)
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
        return _wide(self.gate(mean.to(w.dtype)))

    def forward(self, hidden_states, *, input_ids=None, attention_mask=None, past_len=0, state=None):
        logits = self.logits(hidden_states, attention_mask=attention_mask, past_len=past_len, state=state)
        return torch.softmax(logits / self.temperature, dim=-1)


class KeywordRouter(Router):
    """Rule based. `keywords` maps adapter -> [keyword, ...] or {keyword: weight}. Every occurrence of a keyword
    (as token ids, with and without a leading space) adds its weight to its adapter from that token on; the
    probabilities are the normalised scores (** 1/T). E.g. {"code": {"def": 0.5}, "math": {"sum": 0.4}}."""

    kind = "keyword"
    stateful = True  # its keyword counts continue across cached decode steps (molora_ops.hf.router_state)
    traceable = False  # keyword matching runs on the host, over token ids

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


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_finite_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _is_keywords(value) -> bool:
    def words(v):
        if isinstance(v, dict):
            return all(isinstance(w, str) and _is_finite_number(x) for w, x in v.items())
        return isinstance(v, list) and all(isinstance(w, str) for w in v)

    return isinstance(value, dict) and all(isinstance(a, str) and words(v) for a, v in value.items())


# router.json's config keys: {key: (check, what is expected)}, and the keys each class saves (its _config())
_CONFIG_CHECKS = {
    "adapter_names": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(n, str) for n in v)
                      and len(set(v)) == len(v), "a non-empty list of distinct adapter names"),
    "layer": (lambda v: _is_int(v, 0), "an int >= 0"),
    "temperature": (lambda v: _is_finite_number(v) and v > 0, "a finite number > 0"),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive int"),
    "hidden": (lambda v: v is None or _is_int(v, 0), "null or an int >= 0"),
    "normalize": (lambda v: isinstance(v, bool), "true or false"),
    "keywords": (_is_keywords, "{adapter: [keyword, ...] or {keyword: weight}}"),
}
_GATE_KEYS = ("adapter_names", "layer", "temperature", "hidden_size", "hidden", "normalize")
_CONFIG_KEYS = {"TokenRouter": _GATE_KEYS, "ContextRouter": _GATE_KEYS,
                "KeywordRouter": ("adapter_names", "layer", "temperature", "keywords")}
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _read_router_config(cfg_path: str) -> tuple[type, dict]:
    """The class and the checked constructor config that router.json names."""
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{cfg_path} is not UTF-8 text; the file is corrupt ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{cfg_path} is not valid JSON; the file is corrupt ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object with 'class' and 'config'")
    name = meta.get("class")
    if not isinstance(name, str) or name not in _CLASSES:
        raise ValueError(f"{cfg_path}: 'class' must be one of {sorted(_CLASSES)}, got {reprlib.repr(name)}")
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: 'config' must be a JSON object, got {reprlib.repr(cfg)}")
    expected = _CONFIG_KEYS[name]
    missing = [k for k in expected if k not in cfg]
    extra = sorted(k for k in cfg if k not in expected)
    if missing or extra:
        raise ValueError(f"{cfg_path}: a {name} config has the keys {list(expected)}; missing {missing}, "
                         f"unexpected {extra}")
    for key in expected:
        check, what = _CONFIG_CHECKS[key]
        if not check(cfg[key]):
            raise ValueError(f"{cfg_path}: config key {key!r} must be {what}, got {reprlib.repr(cfg[key])}")
    return _CLASSES[name], cfg


def _build_router(cls: type, cfg: dict, tokenizer) -> Router:
    kwargs = dict(cfg)
    if cls is KeywordRouter:
        return KeywordRouter(kwargs.pop("keywords"), tokenizer, **kwargs)
    return cls(kwargs.pop("hidden_size"), kwargs.pop("adapter_names"), **kwargs)


def _saved_tensor_dtype(st_path: str, expected: dict[str, tuple]) -> Optional[torch.dtype]:
    """Check router.safetensors' header against `expected` {name: shape}, reading no tensor data; the saved
    tensors' common dtype (None when there are none, or they differ)."""
    from safetensors import safe_open

    try:
        with safe_open(st_path, framework="pt") as fh:
            header = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"cannot read {st_path}: the file is corrupt ({exc})") from exc
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise ValueError(f"{st_path} does not match router.json: missing tensors {missing}, unexpected {extra}")
    for key, shape in expected.items():
        saved_shape, dtype = header[key]
        if saved_shape != shape:
            raise ValueError(f"{st_path}: tensor {key!r} has shape {list(saved_shape)} but router.json's config "
                             f"(hidden_size, hidden, adapter_names) makes it {list(shape)}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{st_path}: tensor {key!r} is {dtype}; expected a floating dtype "
                             f"({', '.join(_FLOAT_DTYPES)})")
    dtypes = {_FLOAT_DTYPES[dtype] for _, dtype in header.values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def load_router(path: str, tokenizer=None) -> Router:
    """Load a router written by :meth:`Router.save` (KeywordRouter needs its tokenizer again).

    ``router.json`` (class and config) and the header of ``router.safetensors`` (tensor names, shapes, dtypes)
    are checked against each other before the router is allocated, and its parameters must be finite
    (:func:`check_router`); anything else raises ValueError naming the file and the key. The router keeps the
    saved tensors' dtype.
    """
    cfg_path = os.path.join(path, ROUTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no {ROUTER_CONFIG} (not a saved molora_ops router)")
    cls, cfg = _read_router_config(cfg_path)
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = {k: tuple(v.shape) for k, v in _build_router(cls, cfg, tokenizer).state_dict().items()}
    st_path = os.path.join(path, ROUTER_WEIGHTS)
    if not expected and not os.path.isfile(st_path):
        return _build_router(cls, cfg, tokenizer)
    if not os.path.isfile(st_path):
        raise ValueError(f"{path} has no {ROUTER_WEIGHTS}, which a {cls.__name__} needs")
    dtype = _saved_tensor_dtype(st_path, expected)
    router = _build_router(cls, cfg, tokenizer)
    if dtype is not None:
        router.to(dtype)
    from safetensors.torch import load_file

    router.load_state_dict(load_file(st_path))
    try:
        check_router(router)
    except ValueError as exc:
        raise ValueError(f"{st_path}: {exc}") from None
    return router


def check_router(router: nn.Module, hidden_size: Optional[int] = None,
                 adapter_names: Optional[Sequence[str]] = None) -> None:
    """Raise ValueError if `router` cannot route: a parameter or buffer with NaN or inf, a ``hidden_size`` other
    than the model's `hidden_size` (routers that read hidden states), or ``adapter_names`` other than the
    patch's `adapter_names` (same names, same order). A None argument skips its check."""
    if not isinstance(router, nn.Module):
        raise TypeError(f"router must be an nn.Module (a molora_ops Router), got {type(router).__name__}")
    for name, t in itertools.chain(router.named_parameters(), router.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{type(router).__name__} parameter {name!r} holds NaN or inf; such a router would "
                             "route every token to nonsense")
    own = getattr(router, "hidden_size", None)
    if hidden_size is not None and own is not None and int(own) != int(hidden_size):
        raise ValueError(f"{type(router).__name__} reads hidden states of size {own}, but this model's are "
                         f"{hidden_size} (a router trained for another model?)")
    names = getattr(router, "adapter_names", None)
    if adapter_names is not None and names is not None and list(names) != list(adapter_names):
        raise ValueError(f"{type(router).__name__} was built for adapters {list(names)} but the patch has "
                         f"{list(adapter_names)} (same names, same order)")

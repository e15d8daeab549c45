"""Read LoRA adapters exactly as PEFT saves them.

An adapter source is one of:
    * a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or, failing that,
      ``adapter_model.bin``, loaded only with ``torch.load(weights_only=True)``: nothing else is unpickled);
    * in-memory PEFT state: ``(config, state_dict)`` or ``{"config": ..., "state_dict": ...}``, where config is a
      ``peft.LoraConfig`` or its dict form and state_dict maps PEFT keys to tensors;
    * a LoRA layer set pulled out of a loaded ``PeftModel`` (see :func:`adapters_from_peft_model`).

What is honoured: ``r``, ``lora_alpha``, ``use_rslora`` (scaling = alpha / sqrt(r)), ``rank_pattern`` and
``alpha_pattern`` (PEFT's own key matching: the pattern must match a suffix of the module name at a ``.``
boundary), ``target_modules`` (list or regex; every module with weights must be targeted), ``fan_in_fan_out``
(GPT-2's Conv1D; PEFT stores A [r, in] and B [out, r] in either case, so the forward uses them as is).
Anything that would change the math and that we do not implement (DoRA, aLoRA, embedding LoRA,
``modules_to_save``, trainable tokens, non-LoRA PEFT types, ...) raises :class:`AdapterError` instead of
silently computing something else, and so does a config or weights file that is malformed: the error names the
file and the key.

Biases. ``bias="lora_only"`` / ``"all"`` adapters carry base-layer biases (``<module>.base_layer.bias`` for LoRA
targets, ``<module>.bias`` for other modules), which PEFT loads into the model in place of its own: they are kept
in :attr:`LoraAdapter.biases`, and :func:`molora_ops.hf.bias.bias_deltas` turns them into routed per-adapter deltas.
``lora_bias=True`` adapters carry a bias on lora_B (``<module>.lora_B.bias``), which PEFT adds scaled by the
adapter's scaling: it is kept in :attr:`LoraModuleWeights.lora_b_bias` and routed the same way.

LoRA on ``lm_head``: PEFT's ``save_pretrained`` (``save_embedding_layers="auto"``) then also saves the base
layer's full weight (``lm_head.base_layer.weight``). Such a copy is kept in :attr:`LoraAdapter.base_weights`, and
:func:`molora_ops.patch` accepts it only if it equals the model's own weight (an unchanged base); a resized or
fine-tuned output embedding gets an :class:`AdapterError`, since molora_ops only adds LoRA deltas.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

__all__ = ["AdapterError", "LoraAdapter", "LoraModuleWeights", "load_adapter", "adapters_from_peft_model"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# Config fields that, when set to a non-default value, change what the adapter computes.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter targets",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron-parallel LoRA",
    # the fields PEFT 0.21 tags as LoRA variants (is_lora_variant): each changes the forward
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights values that are variants at inference time too (PEFT's lora_variants metadata)
_VARIANT_INITS = {"mica": "MiCA"}

# PEFT's EMBEDDING_LAYER_NAMES: targeted ones get their base weight saved next to the LoRA weights
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
_PREFIX = "base_model.model."
_BASE_KEY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_BIAS_KEY_RE = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.bias$")
_BIAS_MODES = ("none", "all", "lora_only")


class AdapterError(ValueError):
    """An adapter that cannot be read, or that would not compute what PEFT computes."""


@dataclass
class LoraModuleWeights:
    """One target module of one adapter: A [r, in], B [out, r], scaling (alpha / r or alpha / sqrt(r)) and, for a
    ``lora_bias=True`` adapter, lora_B's bias [out], which PEFT adds as scaling * lora_b_bias."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    lora_b_bias: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass
class LoraAdapter:
    """A LoRA adapter: {module name: weights}. Module names are relative to the model PEFT wrapped."""

    name: str
    modules: dict[str, LoraModuleWeights] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    # {module name: full base weight} that PEFT saved for a targeted embedding layer (lm_head); must equal the model's
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # {module name: (key, bias [out])}: base-layer biases of a bias="lora_only"/"all" adapter (see molora_ops.hf.bias)
    biases: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ config
def _config_to_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise AdapterError(f"adapter config must be a dict or a peft LoraConfig, got {type(config).__name__}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def _regex_problem(pattern: str) -> Optional[str]:
    """None if `pattern` compiles, else re's complaint."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


def _check_patterns(name: str, cfg: dict, where: str, key: str, valid, expected: str) -> None:
    patterns = cfg.get(key)
    if patterns is None:
        return
    if not isinstance(patterns, Mapping):
        raise AdapterError(f"adapter {name!r}: {where}: {key!r} must be a dict {{pattern: {expected}}}, got "
                           f"{reprlib.repr(patterns)}")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str):
            raise AdapterError(f"adapter {name!r}: {where}: {key!r} has a non-string pattern {pattern!r}")
        problem = _regex_problem(rf"(.*\.)?({pattern})$")
        if problem is not None:
            raise AdapterError(f"adapter {name!r}: {where}: {key!r} pattern {pattern!r} is not a valid regex "
                               f"({problem})")
        if not valid(value):
            raise AdapterError(f"adapter {name!r}: {where}: {key}[{pattern!r}] must be {expected}, got {value!r}")


def _check_config(name: str, cfg: dict, where: str) -> None:
    """Refuse what we do not implement and any ill-typed field we read; `where` names the config's file."""
    peft_type = str(cfg.get("peft_type", "LORA"))
    peft_type = peft_type.split(".")[-1].upper()  # "PeftType.LORA" -> "LORA"
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} ({where}) is a {peft_type} adapter; only plain LoRA is supported")
    for key, what in _UNSUPPORTED_FLAGS.items():
        value = cfg.get(key)
        if value not in (None, False, [], {}, ()):
            raise AdapterError(
                f"adapter {name!r} ({where}) uses {what} ({key}={value!r}); molora_ops does not implement it and "
                "will not silently compute something else"
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in _VARIANT_INITS:
        raise AdapterError(
            f"adapter {name!r} ({where}) is a {_VARIANT_INITS[init.lower()]} variant (init_lora_weights={init!r}); "
            "not supported"
        )
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise AdapterError(f"adapter {name!r}: {where}: config needs 'r' and 'lora_alpha'")

    def bad(key: str, expected: str):
        return AdapterError(f"adapter {name!r}: {where}: {key!r} must be {expected}, got {reprlib.repr(cfg[key])}")

    if not _is_int(cfg["r"]) or cfg["r"] < 1:
        raise bad("r", "a positive int")
    if not _is_finite_number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    for key in ("use_rslora", "lora_bias"):
        if cfg.get(key) not in (None, False, True):
            raise bad(key, "true or false")
    if cfg.get("bias") is not None and cfg["bias"] not in _BIAS_MODES:
        raise bad("bias", " or ".join(map(repr, _BIAS_MODES)))
    _check_patterns(name, cfg, where, "rank_pattern", lambda v: _is_int(v) and v >= 1, "a positive int")
    _check_patterns(name, cfg, where, "alpha_pattern", _is_finite_number, "a finite number")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        problem = None if targets == "all-linear" else _regex_problem(targets)
        if problem is not None:
            raise AdapterError(f"adapter {name!r}: {where}: 'target_modules' {targets!r} is not a valid regex "
                               f"({problem})")
    elif targets is not None and not (
        isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in targets)
    ):
        raise bad("target_modules", "a regex string or a list of module names")


def _pattern_key(pattern_keys, module_name: str):
    """PEFT's get_pattern_key: the first pattern matching a '.'-bounded suffix of the module name."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_targeted(cfg: dict, module_name: str) -> bool:
    """PEFT's target_modules rule: a regex string must fullmatch; list entries match the name or a '.'-suffix."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _rank_and_alpha(cfg: dict, module_name: str) -> tuple[int, float]:
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rk = _pattern_key(rank_pattern.keys(), module_name)
    ak = _pattern_key(alpha_pattern.keys(), module_name)
    r = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
    alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg["lora_alpha"])
    return r, alpha


# --------------------------------------------------------------------------------------------- weights
def _read_weights(path: str, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights file's tensors and its path."""
    st = os.path.join(path, SAFETENSORS_NAME)
    bn = os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file

            return load_file(st, device="cpu"), st
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            raise AdapterError(f"adapter {name!r}: cannot read {st}: the file is corrupt ({exc})") from exc
    if os.path.isfile(bn):
        try:
            return torch.load(bn, map_location="cpu", weights_only=True), bn
        except Exception as exc:
            raise AdapterError(
                f"adapter {name!r}: cannot read {bn} with torch.load(weights_only=True): the file is corrupt or "
                f"holds more than tensors, and nothing else is ever unpickled ({exc})"
            ) from exc
    raise AdapterError(f"adapter {name!r}: {path} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _read_config(path: str, name: str) -> tuple[dict, str]:
    """The parsed adapter_config.json and its path."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"adapter {name!r}: {path} has no {CONFIG_NAME}")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except UnicodeDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not UTF-8 text; the file is corrupt ({exc})") from exc
    except (OSError, ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise AdapterError(f"adapter {name!r}: cannot parse {cfg_path}: the file is corrupt ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {cfg_path} does not hold a JSON object")
    return cfg, cfg_path


def _classify(key: str) -> tuple[str, str, Optional[str]]:
    """(what, module, adapter-name infix) of a PEFT state-dict key; what is "lora_A", "lora_B", "lora_B bias",
    "base weight" or "bias"; "" for a key we do not read. The ``base_model.model.`` prefix is dropped."""
    rel = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    m = _KEY_RE.match(rel)
    if m is not None:
        what = f"lora_{m.group('ab')}" + (" bias" if m.group("param") == "bias" else "")
        return what, m.group("module"), m.group("adapter")
    if "lora_" in rel:
        return "", rel, None
    bm = _BASE_KEY_RE.match(rel)
    if bm is not None and bm.group("module").rsplit(".", 1)[-1] in _EMBEDDING_LAYER_NAMES:
        return "base weight", bm.group("module"), None
    bias = _BIAS_KEY_RE.match(rel)
    if bias is not None:
        return "bias", bias.group("module"), None
    return "", rel, None


def _build(name: str, cfg: dict, state: Any, cfg_where: str, weights_where: str) -> LoraAdapter:
    """An adapter from a config dict and PEFT state; `cfg_where` and `weights_where` name them in errors."""
    _check_config(name, cfg, cfg_where)
    where = f"adapter {name!r} ({weights_where})"
    if not isinstance(state, Mapping):
        raise AdapterError(f"{where}: expected a mapping from PEFT keys to tensors, got {type(state).__name__}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    biases: dict[str, tuple[str, torch.Tensor]] = {}
    claimed: dict[tuple[str, str], str] = {}  # (what, module) -> the key holding it
    infixes: dict[str, str] = {}  # adapter-name infix -> the first key with it
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise AdapterError(f"{where}: key {key!r} is not a string")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{where} holds DoRA magnitude vectors ({key}); DoRA is not supported")
        if "lora_embedding_" in key:
            raise AdapterError(f"{where} has LoRA on an embedding ({key}); not supported")
        what, module, infix = _classify(key)
        if not what:
            if "lora_" in key:
                raise AdapterError(f"{where}: unrecognised LoRA tensor {key!r} (a LoRA variant?)")
            # A full weight in an adapter file (modules_to_save and friends) would change the base model.
            raise AdapterError(f"{where} holds a non-LoRA tensor {key!r}; not supported")
        if what == "lora_A bias":
            raise AdapterError(f"{where}: unrecognised LoRA tensor {key!r} (PEFT's lora_A has no bias)")
        if infix is not None:
            other = next((k for i, k in infixes.items() if i != infix), None)
            if other is not None:
                raise AdapterError(
                    f"{where} holds keys of several adapters ({other!r} and {key!r}); a PEFT adapter file holds one "
                    "adapter, without its name in the keys"
                )
            infixes.setdefault(infix, key)
        first = claimed.setdefault((what, module), key)
        if first != key:
            raise AdapterError(
                f"{where}: {first!r} and {key!r} are both the {what} of module {module!r} (with and without the "
                f"{_PREFIX!r} prefix or an adapter-name infix?); keep one"
            )
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{where}: {key!r} is not a tensor")
        if not tensor.is_floating_point():
            raise AdapterError(f"{where}: {key!r} is a {tensor.dtype} tensor; expected floating point weights")
        if what != "base weight" and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{where}: {key!r} has NaN or infinite values; a routed adapter must be finite")
        if what == "base weight":
            base_weights[module] = tensor  # checked against the model's weight by patch()
        elif what == "bias":
            if tensor.dim() != 1:
                raise AdapterError(f"{where}: bias {key!r} has shape {tuple(tensor.shape)}; expected [out]")
            biases[module] = (key, tensor)  # checked against the model's bias by molora_ops.hf.bias.bias_deltas
        else:
            pairs.setdefault(module, {})[what] = tensor
    if not pairs:
        raise AdapterError(f"{where} holds no LoRA weights")
    for module in base_weights:
        if module not in pairs:
            raise AdapterError(
                f"{where} holds a full weight for {module!r} without LoRA weights for it (a resized or fine-tuned "
                "embedding?); not supported"
            )
    use_rslora = bool(cfg.get("use_rslora", False))
    lora_bias = bool(cfg.get("lora_bias", False))
    adapter = LoraAdapter(name=name, config=cfg, source=weights_where, base_weights=base_weights, biases=biases)
    for module, ab in sorted(pairs.items()):
        if "lora_A" not in ab or "lora_B" not in ab:
            raise AdapterError(f"{where}: module {module!r} has {' and '.join(sorted(ab))} only")
        a, b, b_bias = ab["lora_A"], ab["lora_B"], ab.get("lora_B bias")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                "[r, in] and [out, r] (only Linear/Conv1D LoRA is supported)"
            )
        if lora_bias != (b_bias is not None):
            raise AdapterError(
                f"{where}: module {module!r} {'lacks' if lora_bias else 'has'} a lora_B bias but {cfg_where} says "
                f"lora_bias={lora_bias}; config and weights disagree"
            )
        if b_bias is not None and tuple(b_bias.shape) != (b.shape[0],):
            raise AdapterError(
                f"{where}: module {module!r} has a lora_B bias of shape {tuple(b_bias.shape)}; expected "
                f"({b.shape[0]},) like lora_B's rows"
            )
        if not _is_targeted(cfg, module):
            raise AdapterError(
                f"{where}: weights for {module!r}, which target_modules={cfg.get('target_modules')!r} does not "
                "select; config and weights disagree"
            )
        r, alpha = _rank_and_alpha(cfg, module)
        if r != a.shape[0]:
            raise AdapterError(
                f"{where}: module {module!r} has rank {a.shape[0]} in its weights but r={r} by the config (r / "
                "rank_pattern)"
            )
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        adapter.modules[module] = LoraModuleWeights(a, b, scaling, b_bias)
    return adapter


def load_adapter(name: str, source: Any) -> LoraAdapter:
    """Read one adapter from a PEFT directory or from in-memory PEFT state (see the module docstring)."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isdir(path):
            raise AdapterError(f"adapter {name!r}: directory {path!r} does not exist")
        cfg, cfg_path = _read_config(path, name)
        state, weights_path = _read_weights(path, name)
        return _build(name, cfg, state, cfg_path, weights_path)
    if isinstance(source, tuple) and len(source) == 2:
        cfg, state = source
        return _build(name, _config_to_dict(cfg), state, "<memory> config", "<memory> state_dict")
    if isinstance(source, Mapping) and "config" in source and ("state_dict" in source or "weights" in source):
        state = source.get("state_dict", source.get("weights"))
        return _build(name, _config_to_dict(source["config"]), state, "<memory> config", "<memory> state_dict")
    raise AdapterError(
        f"adapter {name!r}: expected a PEFT directory, (config, state_dict) or {{'config', 'state_dict'}}, "
        f"got {type(source).__name__}"
    )


def adapters_from_peft_model(peft_model, names=None) -> tuple[Any, dict[str, LoraAdapter]]:
    """The wrapped base model and the LoRA adapters loaded in a PeftModel (all of them, or `names`).

    Module names are relative to the wrapped model (``peft_model.base_model.model``) and point at the LoRA
    layers; :func:`molora_ops.patch` routes through their ``base_layer``.
    """
    inner = peft_model.base_model.model
    configs = peft_model.peft_config
    names = list(configs) if names is None else list(names)
    out: dict[str, LoraAdapter] = {}
    for name in names:
        if name not in configs:
            raise AdapterError(f"adapter {name!r} is not loaded in the PeftModel (loaded: {sorted(configs)})")
        cfg = _config_to_dict(configs[name])
        _check_config(name, cfg, "PeftModel config")
        adapter = LoraAdapter(name=name, config=cfg, source="PeftModel")
        for mod_name, mod in inner.named_modules():
            lora_a = getattr(mod, "lora_A", None)
            if lora_a is None or not hasattr(lora_a, "keys") or name not in lora_a.keys():
                continue
            if getattr(mod, "lora_variant", {}).get(name) is not None:
                raise AdapterError(f"adapter {name!r}: module {mod_name!r} uses a LoRA variant (DoRA?); not supported")
            a = mod.lora_A[name].weight.detach()
            b = mod.lora_B[name].weight.detach()
            if a.dim() != 2:
                raise AdapterError(f"adapter {name!r}: module {mod_name!r} is not a Linear/Conv1D LoRA layer")
            b_bias = getattr(mod.lora_B[name], "bias", None)
            b_bias = None if b_bias is None else b_bias.detach()
            for what, t in (("lora_A", a), ("lora_B", b), ("lora_B bias", b_bias)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise AdapterError(f"adapter {name!r}: module {mod_name!r} has NaN or infinite {what} values")
            adapter.modules[mod_name] = LoraModuleWeights(a, b, float(mod.scaling[name]), b_bias)
        if not adapter.modules:
            raise AdapterError(f"adapter {name!r} has no LoRA layers in the PeftModel")
        out[name] = adapter
    return inner, out

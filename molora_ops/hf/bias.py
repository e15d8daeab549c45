"""PEFT adapters with biases, as routed per-adapter bias deltas.

Loading a ``bias="lora_only"`` or ``"all"`` PEFT adapter replaces the model's biases with the ones it saved, and a
``lora_bias=True`` adapter adds its lora_B bias times its scaling s. So at a module, adapter e's model computes

    base(x) + d[e] + s[e] B[e] A[e] x,    d[e] = (saved bias[e] - model bias) + s[e] * lora_B bias[e]

(the saved bias taken in the model's dtype, as PEFT loads it). A routed mixture of the adapters' models adds, for
token t, sum_k w[t,k] * d[e_k] next to the LoRA term: the bias delta is weighted like the LoRA delta and not
scaled again by alpha / r. :func:`bias_deltas` stacks d for the patched modules; :func:`add_routed_bias` adds it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .._validation import ID_DTYPES
from .peft_io import AdapterError, LoraAdapter

__all__ = ["bias_deltas", "add_routed_bias"]


def _model_bias(root: nn.Module, targets: Mapping[str, nn.Module], adapter: str, module: str, key: str):
    """The model's bias tensor of `module`, or AdapterError naming the adapter, module and key."""
    mod = targets.get(module)
    if mod is None:
        try:
            mod = root.get_submodule(module)
        except AttributeError:
            raise AdapterError(
                f"adapter {adapter!r} saved a bias for module {module!r} ({key!r}), which this model does not have"
            ) from None
    bias = getattr(mod, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise AdapterError(
            f"adapter {adapter!r} saved a bias for module {module!r} ({key!r}), but this model's "
            f"{type(mod).__name__} there has no bias"
        )
    return bias


def bias_deltas(root: nn.Module, loaded: Mapping[str, LoraAdapter], names: Sequence[str],
                targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{module name: d [N, H_out] float32} for the patched modules where some adapter's d is not zero.

    Row n is adapter ``names[n]``'s delta d (see the module docstring), zero for an adapter that saved no bias
    there or one equal to the model's. `targets` maps each LoRA-targeted module name to the module whose forward
    is patched (its ``bias`` is the model's). A saved bias for a module outside `targets` is accepted only if it
    equals the model's: it could not be routed. Raises AdapterError, naming the adapter, module and key, for that
    and for a saved bias whose shape is not the model's bias's or whose module has no bias.
    """
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for n, name in enumerate(names):
        adapter = loaded[name]
        for module, (key, saved) in adapter.biases.items():
            model_bias = _model_bias(root, targets, name, module, key)
            if tuple(saved.shape) != tuple(model_bias.shape):
                raise AdapterError(
                    f"adapter {name!r}: the bias it saved for module {module!r} ({key!r}) has shape "
                    f"{tuple(saved.shape)}, this model's has {tuple(model_bias.shape)}"
                )
            saved = saved.to(device=model_bias.device, dtype=model_bias.dtype)
            if torch.equal(saved, model_bias.detach()):
                continue
            if module not in targets:
                raise AdapterError(
                    f"adapter {name!r} saved a bias for module {module!r} ({key!r}) that differs from this model's, "
                    f"and {module!r} is not a LoRA target, so it cannot be routed; load that bias into the model "
                    "first if every adapter shares it"
                )
            rows.setdefault(module, {})[n] = saved.float() - model_bias.detach().float()
        for module, weights in adapter.modules.items():
            if weights.lora_b_bias is None:
                continue
            target = targets.get(module)
            if target is None:
                raise AdapterError(f"adapter {name!r}: module {module!r} has a lora_B bias but is not a patch target")
            term = weights.scaling * weights.lora_b_bias.to(device=target.weight.device, dtype=torch.float32)
            per = rows.setdefault(module, {})
            per[n] = per[n] + term if n in per else term
    out: dict[str, torch.Tensor] = {}
    for module, per in rows.items():
        first = next(iter(per.values()))
        stacked = torch.zeros(len(names), first.shape[0], dtype=torch.float32, device=first.device)
        for n, delta in per.items():
            stacked[n] = delta
        if bool(stacked.ne(0).any()):
            out[module] = stacked
    return out


def add_routed_bias(out2d: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    deltas: torch.Tensor) -> torch.Tensor:
    """out2d[t] + sum_k topk_weights[t,k] * deltas[topk_ids[t,k]] over the slots whose id is not -1.

    out2d [T, H_out] floating; topk_ids [T, K] int32/int64 in [-1, N) (the range is not checked here: that would be
    a host sync per call); topk_weights [T, K] floating; deltas [N, H_out] (from :func:`bias_deltas`). An empty
    slot adds nothing, whatever its weight (NaN included), and a non-finite delta reaches only the tokens routed
    to it. The sum is accumulated in float32 (float64 if any input is float64) and added to out2d with one
    rounding to out2d's dtype.

    Adds in place into out2d and returns it, unless grad mode is on and out2d, topk_weights or deltas requires
    grad: then out2d is left alone and a new tensor is returned. Either way, use the returned tensor.
    """
    for arg, t in (("out2d", out2d), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("deltas", deltas)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{arg} must be 2-D, got shape {tuple(t.shape)}")
        if t.device != out2d.device:
            raise ValueError(f"{arg} is on {t.device} but out2d is on {out2d.device}; all must share one device")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    for arg, t in (("out2d", out2d), ("topk_weights", topk_weights), ("deltas", deltas)):
        if not t.is_floating_point():
            raise TypeError(f"{arg} must be a floating tensor, got {t.dtype}")
    if topk_ids.shape[0] != out2d.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must both be [T, K] with T = out2d's {out2d.shape[0]} rows, got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    if deltas.shape[1] != out2d.shape[1]:
        raise ValueError(f"deltas must be [N, {out2d.shape[1]}] (out2d's columns), got {tuple(deltas.shape)}")

    acc_dtype = torch.float64 if torch.float64 in (out2d.dtype, topk_weights.dtype, deltas.dtype) else torch.float32
    live = topk_ids >= 0
    ids = topk_ids.clamp_min(0).long()
    table = deltas.to(acc_dtype)
    weights = topk_weights.to(acc_dtype)
    acc = torch.zeros(out2d.shape, dtype=acc_dtype, device=out2d.device)
    for k in range(topk_ids.shape[1]):
        term = table.index_select(0, ids[:, k]) * weights[:, k, None]
        acc = acc + torch.where(live[:, k, None], term, torch.zeros((), dtype=term.dtype, device=term.device))
    if torch.is_grad_enabled() and (out2d.requires_grad or topk_weights.requires_grad or deltas.requires_grad):
        return (out2d.to(acc_dtype) + acc).to(out2d.dtype)
    return out2d.add_(acc)  # computed in acc_dtype, rounded once to out2d's dtype

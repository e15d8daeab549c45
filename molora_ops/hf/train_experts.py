"""Train new LoRA experts and a top-k router together on a frozen base (MoLoRA / MixLoRA), through mo.patch.

    out = mo.train_experts(model, texts, tokenizer, num_experts=4, rank=8, top_k=2, save_to="moe/")
    model = mo.patch(base, adapters=out["adapters"], router=load_router(out["router_dir"]), top_k=2)

The experts start as PEFT does (A random, B zero) on every projection named in `target_modules`; the model is
patched with them and a TokenRouter / ContextRouter. The patched modules' stacked weights (``molora_lora_a`` /
``molora_lora_b``) and the router's parameters are the trained leaves: the routed forward runs the registered ops,
whose backward gives d/dA and d/dB per adapter segment and d/d(top-k weights) for the router. The loss is the
next-token loss plus ``balance_weight`` x :func:`~molora_ops.hf.train_router.load_balance_loss`.

Saved (``save_to``): ``experts/<name>/`` in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``PeftModel.from_pretrained`` and by ``mo.patch``) and ``router/`` (:meth:`Router.save`). The weights
are read back from the patch's stacking: a module's own ``molora_lora_a`` [N, r, H_in] and ``molora_lora_b``
[N, H_out, r] with ``molora_scaling``; a sibling group (q/k/v, gate/up: ``SIBLING_GROUPS``) keeps the members' A's
concatenated along r on its first member and each member's B with its scaling folded in.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional, Sequence

import torch
from torch import nn

from .layers import io_features
from .patch import SIBLING_GROUPS, patch, unpatch
from .routers import ContextRouter, TokenRouter
from .train_router import _encode, _next_token_loss, _routed_step, _token_batch, load_balance_loss

__all__ = ["train_experts"]


def _targets(model, target_modules: Sequence[str]) -> dict[str, tuple[int, int, bool]]:
    """{module name: (in, out, is Conv1D)} of the projections whose last name is in `target_modules`."""
    out = {}
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] in target_modules and io_features(mod) is not None:
            out[name] = (*io_features(mod), not isinstance(mod, nn.Linear))
    if not out:
        raise ValueError(f"no nn.Linear / Conv1D module of this model is named one of {list(target_modules)}")
    return out


def _config(rank: int, alpha: float, targets: dict):
    from peft import LoraConfig

    leaves = sorted({n.rpartition(".")[2] for n in targets})
    conv = any(t[2] for t in targets.values())
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=leaves, lora_dropout=0.0, bias="none",
                      fan_in_fan_out=conv, task_type="CAUSAL_LM")


def _initial_experts(names, rank, alpha, targets, seed) -> dict:
    """PEFT's initialisation per expert: A ~ kaiming-uniform(a=sqrt(5)) rows, B = 0 (as (config, state_dict))."""
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(rank, alpha, targets)
    experts = {}
    for name in names:
        state = {}
        for mod_name, (in_f, out_f, _) in targets.items():
            bound = 1.0 / in_f ** 0.5
            state[f"base_model.model.{mod_name}.lora_A.weight"] = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
            state[f"base_model.model.{mod_name}.lora_B.weight"] = torch.zeros(out_f, rank)
        experts[name] = (cfg, state)
    return experts


def _group_of(mod_name: str, targets) -> Optional[list[str]]:
    """The sibling group (full names, patch order) `mod_name` belongs to, if any."""
    parent, _, leaf = mod_name.rpartition(".")
    for row in SIBLING_GROUPS:
        if leaf in row:
            full = [f"{parent}.{m}" if parent else m for m in row if (f"{parent}.{m}" if parent else m) in targets]
            return full if len(full) > 1 else None
    return None


def _trainable(model, targets) -> list[torch.Tensor]:
    """The patched modules' stacked weight buffers, made trainable leaves."""
    leaves = []
    for mod_name in targets:
        mod = model.get_submodule(mod_name)
        for buf in ("molora_lora_a", "molora_lora_b"):
            t = mod._buffers.get(buf)
            if t is not None:
                leaves.append(t.requires_grad_(True))
    return leaves


def expert_state_dicts(model, names: Sequence[str], targets, rank: int, scaling: float) -> dict[str, dict]:
    """{expert name: PEFT state dict} read from the patched model's stacked buffers (see the module docstring)."""
    out = {n: {} for n in names}
    for mod_name in targets:
        mod = model.get_submodule(mod_name)
        if "molora_scaling" in mod._buffers:  # a module of its own
            a, b = mod._buffers["molora_lora_a"], mod._buffers["molora_lora_b"]
        else:  # a sibling group's member
            group = _group_of(mod_name, targets)
            pos = group.index(mod_name)
            a = model.get_submodule(group[0])._buffers["molora_lora_a"][:, pos * rank : (pos + 1) * rank]
            b = mod._buffers["molora_lora_b"] / scaling  # folded in by the patch
        for i, n in enumerate(names):
            out[n][f"base_model.model.{mod_name}.lora_A.weight"] = a[i, :rank].detach().float().cpu().contiguous()
            out[n][f"base_model.model.{mod_name}.lora_B.weight"] = b[i, :, :rank].detach().float().cpu().contiguous()
    return out


@torch.no_grad()
def _mean_loss(model, encoded, idx, batch_size, device) -> float:
    """Mean next-token loss over the texts `idx` (real target tokens) of the routed model as it is now."""
    total = count = 0.0
    for i in range(0, len(idx), batch_size):
        ids, mask, _ = _token_batch(encoded, None, idx[i : i + batch_size], device)
        s, c = _next_token_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def save_expert(path: str, config, state: dict) -> None:
    """Write one expert in PEFT format: adapter_config.json and adapter_model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, default=str)
    save_file(state, os.path.join(path, "adapter_model.safetensors"))


def train_experts(model, texts: Sequence[str], tokenizer, *, num_experts: int = 4, rank: int = 8,
                  alpha: float = 16.0, target_modules: Sequence[str] = ("c_attn", "c_proj", "c_fc"),
                  top_k: int = 2, kind: str = "token", epochs: int = 3, lr: float = 3e-3, router_lr: float = 1e-2,
                  batch_size: int = 8, max_length: int = 128, balance_weight: float = 0.01, seed: int = 0,
                  progress: bool = True, save_to: Optional[str] = None) -> dict:
    """Train `num_experts` LoRA experts and a top-k router jointly on `texts` with `model` (unpatched) frozen.

    Returns {"adapters": {name: directory} (when saved) or {name: (config, state_dict)}, "router": the router,
    "router_dir", "report": {"train_loss", "train_balance_loss", "balance_weight", ...}}. `model` is left
    unpatched (its own weights untouched)."""
    from tqdm.auto import tqdm

    if not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"num_experts must be an int >= 2, got {num_experts!r}")
    if not isinstance(top_k, int) or not 2 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [2, num_experts={num_experts}], got {top_k!r}")
    if isinstance(texts, (str, bytes)) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    if kind not in ("token", "context"):
        raise ValueError(f"kind must be 'token' or 'context', got {kind!r}")
    targets = _targets(model, target_modules)
    names = [f"expert{i}" for i in range(num_experts)]
    experts = _initial_experts(names, rank, alpha, targets, seed)
    torch.manual_seed(seed)
    hdim = model.config.hidden_size
    router = (TokenRouter if kind == "token" else ContextRouter)(hdim, names)
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    patch(model, adapters=experts, router=router, top_k=top_k, backend="torch" if device.type == "cpu" else "auto")
    try:
        leaves = _trainable(model, targets)
        router.float().train()
        opt = torch.optim.Adam([{"params": leaves, "lr": lr}, {"params": list(router.parameters()), "lr": router_lr}])
        encoded = _encode(tokenizer, list(texts), max_length)
        gen = torch.Generator().manual_seed(seed)
        order = list(range(len(encoded)))
        random.Random(seed).shuffle(order)
        last = {"lm": float("nan"), "balance": float("nan")}
        bar = tqdm(range(epochs), desc="train_experts", disable=not progress)
        for _ in bar:
            perm = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
            sums, count_all = {"lm": 0.0, "balance": 0.0}, 0.0
            for i in range(0, len(perm), batch_size):
                ids, mask, _ = _token_batch(encoded, None, perm[i : i + batch_size], device)
                logits, probs = _routed_step(model, router, ids, mask)
                lm_sum, count = _next_token_loss(logits, ids, mask)
                lm = lm_sum / count.clamp_min(1.0)
                balance = load_balance_loss(probs, router.select(probs, top_k)[0], mask)
                opt.zero_grad()
                (lm + balance_weight * balance).backward(inputs=leaves + list(router.parameters()))
                opt.step()
                n = float(count)
                count_all += n
                sums["lm"] += float(lm.detach()) * n
                sums["balance"] += float(balance.detach()) * n
            last = {k: v / max(count_all, 1.0) for k, v in sums.items()}
            bar.set_postfix(lm=f"{last['lm']:.4f}", balance=f"{last['balance']:.3f}")
        final = _mean_loss(model, encoded, order, batch_size, device)
        states = expert_state_dicts(model, names, targets, rank, alpha / rank)
    finally:
        unpatch(model)
        model.train(was_training)
        for p, req in frozen:
            p.requires_grad_(req)
    router.eval()
    for p in router.parameters():
        p.requires_grad_(False)
    config = _config(rank, alpha, targets)
    report = {"train_loss": last["lm"], "final_train_loss": final, "train_balance_loss": last["balance"], "balance_weight": balance_weight,
              "num_experts": num_experts, "top_k": top_k, "rank": rank, "alpha": alpha, "num_texts": len(texts)}
    router.report = report
    out = {"adapters": {n: (config, states[n]) for n in names}, "router": router, "router_dir": None, "report": report}
    if save_to:
        out["adapters"] = {}
        for n in names:
            path = os.path.join(save_to, "experts", n)
            save_expert(path, config, states[n])
            out["adapters"][n] = path
        out["router_dir"] = os.path.join(save_to, "router")
        router.save(out["router_dir"])
    return out

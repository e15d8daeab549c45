"""Domain LoRA adapters trained with PEFT and saved in PEFT format, plus the sequential baseline.

The demo's adapters target GPT-2's fused ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc`` Conv1D layers,
which store their weights transposed, hence ``fan_in_fan_out=True``, and the output head ``lm_head`` (an
``nn.Linear``; PEFT sets ``fan_in_fan_out`` per module and says so). The sequential baseline is one LoRA trained on the
domains one after another; its first stage is the same training run as the first domain's adapter (same
initialisation, same batches), so it starts from a copy of that adapter instead of repeating the run.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .model import train_lm

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]


def lora_config(rank: int, alpha: int, targets=TARGET_MODULES):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                      fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")


def _new_lora(base, rank: int, alpha: int, seed: int, targets=TARGET_MODULES):
    from peft import get_peft_model

    torch.manual_seed(seed)  # the LoRA A initialisation
    return get_peft_model(copy.deepcopy(base), lora_config(rank, alpha, targets))


def train_adapters(base, blocks, out_dir: Path, *, domains, rank: int, alpha: int, steps: int, batch_size: int,
                   lr: float, seed: int, device, targets=TARGET_MODULES) -> dict:
    """Train one adapter per domain from the frozen base; save each as PEFT does to out_dir/<domain>.

    Returns {"paths": {domain: dir}, "seconds": ..., "first": the first domain's PeftModel (for the baseline)}.
    """
    start = time.perf_counter()
    paths, first = {}, None
    for i, domain in enumerate(domains):
        peft_model = _new_lora(base, rank, alpha, seed + 1000, targets)
        train_lm(peft_model, blocks.train[domain], steps=steps, batch_size=batch_size, lr=lr, seed=seed + 17 * i,
                 device=device, desc=f"adapter {domain}")
        path = Path(out_dir) / domain
        peft_model.save_pretrained(path, save_embedding_layers=False)  # LoRA tensors only
        paths[domain] = path
        if i == 0:
            first = peft_model
    return {"paths": paths, "seconds": time.perf_counter() - start, "first": first}


def train_sequential(first_stage, blocks, out_dir: Path, *, domains, steps: int, batch_size: int, lr: float,
                     seed: int, device) -> dict:
    """Continue the first domain's adapter on each later domain in turn (one LoRA, trained sequentially)."""
    start = time.perf_counter()
    peft_model = copy.deepcopy(first_stage)
    for i, domain in enumerate(domains[1:], start=1):
        train_lm(peft_model, blocks.train[domain], steps=steps, batch_size=batch_size, lr=lr, seed=seed + 17 * i,
                 device=device, desc=f"sequential +{domain}")
    path = Path(out_dir) / "sequential"
    peft_model.save_pretrained(path, save_embedding_layers=False)
    return {"path": path, "order": list(domains), "seconds": time.perf_counter() - start}

"""One PEFT LoRA adapter whose rank is the concatenation of several adapters' ranks.

For adapters i with A_i [r_i, in], B_i [out, r_i], scaling s_i and weights w_i, the concatenated adapter of a
module has

    A = [w_1 s_1 A_1; pad; w_2 s_2 A_2; pad; ...]   [R, in]        R = sum_i width_i
    B = [B_1, pad, B_2, pad, ...]                     [out, R]

with lora_alpha = r = R (scaling 1), so B A x = sum_i w_i s_i B_i A_i x: PEFT's ``cat`` combination, which is
molora_ops' blend. Adapter i owns rank columns [offset_i, offset_i + width_i); width_i >= its largest rank over
modules, and the padding is zeros, so the layout is the same for every module (a module an adapter does not
target has zeros in its segment). ``widths`` all equal make the rank axis a view [N, width, ...] (the routed
layout, see :mod:`molora_ops.vllm.routed`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..hf.peft_io import LoraAdapter

__all__ = ["concat_adapter", "segment_widths", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."


def segment_widths(adapters: Sequence[LoraAdapter], uniform: bool) -> list[int]:
    """Each adapter's segment width: its largest rank over modules, or (uniform) the largest over all adapters."""
    own = [max(m.rank for m in a.modules.values()) for a in adapters]
    return [max(own)] * len(own) if uniform else own


def _refuse_unservable(adapter: LoraAdapter) -> None:
    if adapter.biases or any(m.lora_b_bias is not None for m in adapter.modules.values()):
        raise ValueError(f"adapter {adapter.name!r} ({adapter.source}) changes biases (bias='all'/'lora_only' or "
                         "lora_bias=True); vLLM's LoRA layers add no bias, so it cannot be served this way")
    if adapter.base_weights:
        raise ValueError(f"adapter {adapter.name!r} ({adapter.source}) targets {sorted(adapter.base_weights)} "
                         "(an embedding or lm_head LoRA); only linear layers are served")


def _module_shapes(adapters: Sequence[LoraAdapter]) -> dict[str, tuple[int, int]]:
    """{module: (out, in)}, checked to agree across adapters."""
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for name, m in adapter.modules.items():
            shape = (int(m.lora_b.shape[0]), int(m.lora_a.shape[1]))
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"module {name!r} is [out, in] = {list(shapes[name])} in one adapter but "
                                 f"{list(shape)} in {adapter.name!r}: adapters of different base models")
    return shapes


def concat_adapter(adapters: Sequence[LoraAdapter], weights: Sequence[float],
                   widths: Sequence[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, PEFT state dict of float32 tensors) of the concatenated adapter (module docstring).

    Raises ValueError for adapters vLLM cannot serve (bias changes, embedding / lm_head LoRA) or that disagree on
    a module's shape, and for a width below an adapter's rank."""
    if not adapters or len(adapters) != len(weights) or len(adapters) != len(widths):
        raise ValueError("concat_adapter needs one weight and one width per adapter, and at least one adapter")
    for adapter, width in zip(adapters, widths):
        _refuse_unservable(adapter)
        rank = max(m.rank for m in adapter.modules.values())
        if width < rank:
            raise ValueError(f"segment width {width} of adapter {adapter.name!r} is below its rank {rank}")
    total = int(sum(widths))
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in sorted(_module_shapes(adapters).items()):
        a = torch.zeros(total, in_f, dtype=torch.float32)
        b = torch.zeros(out_f, total, dtype=torch.float32)
        offset = 0
        for adapter, weight, width in zip(adapters, weights, widths):
            m = adapter.modules.get(name)
            if m is not None:
                a[offset:offset + m.rank] = (float(weight) * m.scaling) * m.lora_a.float()
                b[:, offset:offset + m.rank] = m.lora_b.float()
            offset += int(width)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    return _config(adapters, total), tensors


def _config(adapters: Sequence[LoraAdapter], total: int) -> dict:
    targets = sorted({name.rsplit(".", 1)[-1] for a in adapters for name in a.modules})
    first = adapters[0].config
    return {
        "peft_type": "LORA",
        "task_type": first.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": total,
        "lora_alpha": total,
        "use_rslora": False,
        "target_modules": targets,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(first.get("fan_in_fan_out", False)),
        "use_dora": False,
        "init_lora_weights": True,
    }

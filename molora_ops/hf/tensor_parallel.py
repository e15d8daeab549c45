"""Routed LoRA on a model loaded with transformers tensor parallelism (TP).

transformers' TP (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``, or ``tp_plan="auto"``)
shards each planned projection's weight as a DTensor and sets ``module.forward = tp_forward`` on the instance. What a
patched module sees around that forward decides how its stacked adapters are sharded (:class:`Layout`):

    kind          plan styles                                   x seen      output seen          adapters
    "shard_out"   colwise                                       replicated  this rank's rows     B[:, rows]
    "shard_in"    rowwise                                       this rank's replicated, reduced  A[:, :, cols];
                                                                columns                          h all-reduced
    "replicated"  colwise_rep, colwise_gather_output,           replicated  replicated, full     unsharded
                  rowwise_rep, rowwise_split_input

"shard_out" needs no communication: out_local[t] += sum_k w s B[e][rows] (A[e] x[t]). "shard_in" computes the
partial shrink h_r[t, k] = w A[e][:, cols] x_r[t] on each rank, sums it over the TP group (h is [T, K, R]: small)
and expands it with the whole B into the output transformers already all-reduced, so the delta is added once.
Any other style on a patched module (packed/strided shards, sequence parallel, a DTensor weight the plan does not
name) is refused with :class:`TensorParallelError` naming the module and its style.

The routing must be the same on every rank: routers read the hidden state entering a block, which TP keeps
replicated, and the rank-space all-reduce relies on every rank taking the same CPU strategy (same routing and the
same intra-op thread count, as under ``torchrun``). Inference only: the all-reduce is not differentiable, so a call
whose delta would need a gradient raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["Layout", "TensorParallelError", "detect", "shard_stack", "all_reduce_rank_space", "check_inference",
           "install_forward", "restore_forward", "full_weight"]

_KINDS = {
    "colwise": "shard_out",
    "rowwise": "shard_in",
    "colwise_rep": "replicated",
    "colwise_gather_output": "replicated",
    "rowwise_rep": "replicated",
    "rowwise_split_input": "replicated",
}
_WEIGHT_SHARD_DIM = {"shard_out": 0, "shard_in": 1}  # nn.Linear weight [out, in]


class TensorParallelError(NotImplementedError):
    """A targeted module's tensor-parallel layout that routed LoRA does not support."""


@dataclass
class Layout:
    """How one patched module is sharded. kind: see the module docstring; style: its plan entry; group: the TP
    process group (for "shard_in"'s all-reduce); index: this rank's rows (shard_out) or columns (shard_in) as a
    slice of the full out / in features, None for "replicated"; in_f / out_f: the sizes the module's forward sees
    (local for the sharded side)."""

    kind: str
    style: str
    group: object
    index: Optional[slice]
    in_f: int
    out_f: int

    def describe(self) -> str:
        return f"tp={self.style}"


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight (gathered over the TP group when it is a DTensor: every rank must call it)."""
    return weight.full_tensor() if _is_dtensor(weight) else weight


def _plan_of(root: nn.Module) -> dict:
    plan = getattr(root, "tp_plan", None)
    if not isinstance(plan, Mapping):
        plan = getattr(root, "_tp_plan", None)
    return dict(plan) if isinstance(plan, Mapping) else {}


def _style_of(plan: dict, name: str) -> Optional[str]:
    """The plan entry for module `name`: plans name modules with '*' for layer numbers (transformers' rule)."""
    generic = re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)
    return plan.get(generic, plan.get(name))


def _group_of(weight) -> object:
    mesh = weight.device_mesh
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


def _check_placement(name: str, style: str, kind: str, weight) -> None:
    """A sharded kind needs the weight split into contiguous blocks along the dim its style shards."""
    if kind not in _WEIGHT_SHARD_DIM:
        return
    from torch.distributed.tensor import Shard

    dim = _WEIGHT_SHARD_DIM[kind]
    placements = tuple(weight.placements) if _is_dtensor(weight) else ()
    ok = (len(placements) == 1 and type(placements[0]) is Shard
          and placements[0].dim in (dim, dim - weight.dim()))
    if not ok:
        raise TensorParallelError(
            f"molora_ops.patch: module {name!r} has tensor-parallel plan style {style!r} but its weight is "
            f"{type(weight).__name__} with placements {placements or None}, not one contiguous Shard({dim}); "
            "routed LoRA cannot tell which rows/columns this rank holds"
        )


def _refuse(name: str, style, why: str) -> TensorParallelError:
    supported = ", ".join(sorted(_KINDS))
    return TensorParallelError(
        f"molora_ops.patch: module {name!r} is tensor-parallel with plan style {style!r}: {why}. Routed LoRA "
        f"supports the styles {supported} on nn.Linear projections; load the model with a plan that uses them "
        "for the adapters' target modules (or without tensor parallelism)"
    )


def detect(root: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Layout]:
    """{module name: Layout} for the targets that transformers' TP shards (others are not TP and absent).

    A target is TP when its weight is a DTensor, or the model was loaded tensor-parallel (it has a device mesh) and
    its plan names the target, whose forward is replaced on the instance. Raises TensorParallelError naming the
    module and its style for a layout that is not supported. All ranks must call this together: it all-gathers the
    local shard sizes once (uneven shards are allowed)."""
    plan = _plan_of(root)
    loaded_tp = getattr(root, "_device_mesh", None) is not None  # a plan alone (every Llama config has one) is not TP
    found: dict[str, tuple] = {}
    for name, mod in targets.items():
        weight = getattr(mod, "weight", None)
        style = _style_of(plan, name)
        sharded = _is_dtensor(weight)
        if not sharded and not (loaded_tp and style is not None and "forward" in mod.__dict__):
            continue
        if style is None:
            raise _refuse(name, style, "its weight is a DTensor but the model's tp_plan has no entry for it")
        kind = _KINDS.get(style)
        if kind is None:
            raise _refuse(name, style, "this style is not supported")
        if not isinstance(mod, nn.Linear):
            raise _refuse(name, style, f"it is a {type(mod).__name__}, not an nn.Linear")
        if "forward" not in mod.__dict__:
            raise _refuse(name, style, "its forward is not transformers' tp_forward (no instance-level forward)")
        if not sharded:
            raise _refuse(name, style, "its weight is not a DTensor, so its shard is unknown")
        _check_placement(name, style, kind, weight)
        found[name] = (mod, style, kind, _group_of(weight))
    return _with_offsets(found)


def _with_offsets(found: dict) -> dict[str, Layout]:
    """Layouts with this rank's slice of each sharded dimension, from one all-gather of the local sizes (per group)."""
    layouts: dict[str, Layout] = {}
    by_group: dict = {}
    for name, (mod, style, kind, group) in found.items():
        if kind in _WEIGHT_SHARD_DIM:
            by_group.setdefault(group, []).append(name)
        else:
            layouts[name] = Layout(kind, style, group, None, mod.in_features, mod.out_features)
    for group, names in by_group.items():
        import torch.distributed as dist

        local = torch.tensor([_local_size(found[n]) for n in names], dtype=torch.int64)
        sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, local, group=group)
        before = torch.stack(sizes[: dist.get_rank(group)]).sum(0) if dist.get_rank(group) else torch.zeros_like(local)
        total = torch.stack(sizes).sum(0)
        for i, name in enumerate(names):
            mod, style, kind, _ = found[name]
            full = mod.out_features if kind == "shard_out" else mod.in_features
            if int(total[i]) != full:
                raise _refuse(name, style, f"its shards hold {int(total[i])} of {full} features")
            index = slice(int(before[i]), int(before[i]) + int(local[i]))
            in_f = mod.in_features if kind == "shard_out" else int(local[i])
            out_f = int(local[i]) if kind == "shard_out" else mod.out_features
            layouts[name] = Layout(kind, style, group, index, in_f, out_f)
    return layouts


def _local_size(entry) -> int:
    mod, _, kind, _ = entry
    return int(mod.weight.to_local().shape[_WEIGHT_SHARD_DIM[kind]])


def shard_stack(layout: Optional[Layout], a: torch.Tensor, b: torch.Tensor):
    """This rank's part of the stacked lora_a [N, R, H_in] and lora_b [N, H_out, R]: B's rows (shard_out), A's
    columns (shard_in), or both whole (replicated, or no layout)."""
    if layout is None or layout.kind == "replicated":
        return a, b
    if layout.kind == "shard_out":
        return a, b[:, layout.index].contiguous()
    return a[:, :, layout.index].contiguous(), b


def all_reduce_rank_space(h, group) -> None:
    """Sum the shrink result (a RankSpace; its data is a tensor or a list of tensors in one strategy's layout, the
    same on every rank for the same routing) over `group`, in place, with one collective."""
    import torch.distributed as dist

    data = h.data
    if isinstance(data, torch.Tensor):
        dist.all_reduce(data, group=group)
        return
    flat = torch.cat([d.reshape(-1) for d in data]) if data else None
    if flat is None:
        return
    dist.all_reduce(flat, group=group)
    offset = 0
    for d in data:
        d.copy_(flat[offset : offset + d.numel()].view_as(d))
        offset += d.numel()


def check_inference(name: str, *tensors: torch.Tensor) -> None:
    """TP deltas are inference only: RuntimeError naming the module when grad mode would need their gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"molora_ops: {name} is tensor-parallel, where the routed LoRA delta is inference only (its all-reduce "
            "and shards carry no gradient); run the model under torch.no_grad() or torch.inference_mode()"
        )


def _local(name: str, t):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        if any(not p.is_replicate() for p in t.placements):
            raise TensorParallelError(
                f"molora_ops: {name} received a DTensor input with placements {tuple(t.placements)}; only a "
                "replicated or plain (local) input is supported"
            )
        return t.to_local()
    return t


def install_forward(module: nn.Module, name: str) -> None:
    """Wrap transformers' instance-level tp_forward: run it, then add the routed delta (module._molora_slot) to the
    tensor it returns: the local shard (colwise) or the all-reduced output (rowwise)."""
    tp_forward = module.__dict__["forward"]

    def routed_tp_forward(x, *args, **kwargs):
        out = tp_forward(x, *args, **kwargs)
        if _is_dtensor(out):
            raise TensorParallelError(
                f"molora_ops: {name}'s tensor-parallel forward returned a DTensor; only styles that return local "
                "tensors (use_local_output) are supported"
            )
        return module._molora_slot.apply(module, _local(name, x), out)

    module._molora_tp_forward = tp_forward
    module.forward = routed_tp_forward


def restore_forward(module: nn.Module) -> None:
    """Put transformers' tp_forward back (undo :func:`install_forward`); no-op for a module without it."""
    tp_forward = module.__dict__.pop("_molora_tp_forward", None)
    if tp_forward is not None:
        module.forward = tp_forward

"""Backend registry: which implementations exist, which can run here, and which one "auto" picks.

Each backend module exposes the same three device-level functions (inputs already validated, `scale` a
[N] float32 tensor, `plan` a RoutingPlan, `out` preallocated; `accumulate=False` means overwrite out; `ranks`
None or the int32 [N] real ranks that bound every rank loop, see molora_ops.ops):
    shrink(x, lora_a, topk_ids, topk_weights, scale, plan, ranks=None) -> h [T, K, R] float32
    expand(h, lora_b, topk_ids, plan, out, accumulate, ranks=None) -> None
    routed_lora(x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, accumulate, ranks=None) -> None
and a `status() -> (compiled, available, reason)`. The backward functions (shrink_backward, expand_backward,
routed_lora_backward) live in torch_backward.py and triton_backend.py only; molora_ops.ops picks one per call. Importing a backend module never raises because a
toolchain or library is missing; status() says why it cannot run instead.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "torch_grouped", "triton": "triton_backend", "cuda": "cuda_backend"}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the torch backend computes in: float64 when any of `tensors` is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_name(name: str) -> None:
    if name not in _MODULES:
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {name!r}")


def get(name: str) -> ModuleType:
    """The backend module for `name` (one of BACKENDS)."""
    _check_name(name)
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


@torch.compiler.assume_constant_result
def _status(name: str) -> tuple[bool, bool, str]:
    """(compiled, available, reason). Under torch.compile it runs once at trace time and is a constant."""
    if name == "torch":
        from . import cpu_fused

        kernels = "loaded" if cpu_fused.available() else f"not used, {cpu_fused.status()[1]}"
        return True, True, f"plain PyTorch: grouped by adapter, one matmul per active adapter; C++ CPU kernels {kernels}"
    try:
        module = get(name)
    except ImportError as exc:  # a broken install must not break `import molora_ops` or `backends()`
        return False, False, f"backend module failed to import: {exc}"
    return module.status()


def backends() -> dict[str, dict]:
    """{name: {"available": bool, "compiled": bool, "reason": str}} for torch, triton and cuda."""
    report = {}
    for name in BACKENDS:
        compiled, available, reason = _status(name)
        report[name] = {"available": available, "compiled": compiled, "reason": reason}
    return report


def resolve(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`, and check that an explicit one can run.

    auto: the CUDA extension when it is built and the tensors are on CUDA, else Triton on CUDA, else torch.
    """
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                compiled, available, _ = _status(candidate)
                if compiled and available:
                    return candidate
        return "torch"
    _check_name(backend)
    if backend == "torch":
        return backend
    compiled, available, reason = _status(backend)
    if not (compiled and available):
        raise RuntimeError(f"backend={backend!r} is not available here: {reason}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not get("triton").interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors on {device}"
        )
    return backend

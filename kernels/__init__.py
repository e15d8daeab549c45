"""Triton kernels for molora_ops (installed as ``molora_ops.kernels``).

``configs`` is plain Python (shape heuristics) and imports without triton. ``routed_lora`` holds the
``@triton.jit`` kernels and their launchers; import it only after TRITON_INTERPRET has its final value,
because triton decides at decoration time whether a kernel is compiled or interpreted. The backend
(molora_ops.impl.triton_backend) imports it lazily for that reason.
"""

from . import configs

__all__ = ["configs"]

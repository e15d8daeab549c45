"""molora_ops: fast, exact kernels for routed multi-LoRA inference.

One frozen base model, N LoRA adapters and a router that gives each token its top-k adapters with
probabilities. `routed_lora` adds sum_k p[t,k] * s[e] * B[e] A[e] x[t] into the base projection's output,
grouped by adapter, with float32 accumulation; `reference` holds the plain-PyTorch oracle.
"""

from . import reference
from .impl import backends
from .ops import lora_expand, lora_shrink, routed_lora
from .plan import RoutingPlan, build_plan
from .hf.merge import merge
from .hf.patch import patch, unpatch
from .hf.routers import ContextRouter, KeywordRouter, TokenRouter, load_router
from .hf.routing import routing
from .hf.train_router import train_router

__version__ = "0.1.0"

__all__ = [
    "routed_lora",
    "lora_shrink",
    "lora_expand",
    "reference",
    "RoutingPlan",
    "build_plan",
    "backends",
    "patch",
    "unpatch",
    "routing",
    "train_router",
    "merge",
    "TokenRouter",
    "ContextRouter",
    "KeywordRouter",
    "load_router",
    "__version__",
]

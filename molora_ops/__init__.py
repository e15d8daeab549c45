"""molora_ops: fast, exact kernels for routed multi-LoRA inference.

One frozen base model, N LoRA adapters and a router that gives each token its top-k adapters with
probabilities. `routed_lora` adds each token's weighted mixture of its adapters' LoRA deltas into the base
projection's output, grouped by adapter, with float32 accumulation; `reference` states the semantics once and
is the plain-PyTorch oracle. Layers: ops.py / reference.py / plan.py / runtime.py (the op layer), impl/
(backends), hf/ (the transformers integration, which imports the op layer, never the reverse).
"""

from . import reference
from .impl import backends
from .ops import lora_expand, lora_shrink, routed_lora
from .plan import RoutingPlan, build_plan
from .hf.merge import merge
from .hf.patch import patch, unpatch
from .hf.routers import ContextRouter, KeywordRouter, TokenRouter, load_router
from .hf.routing import routing
from .hf.train_experts import train_experts
from .hf.train_router import load_balance_loss, train_router

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
    "train_experts",
    "load_balance_loss",
    "merge",
    "TokenRouter",
    "ContextRouter",
    "KeywordRouter",
    "load_router",
    "__version__",
]

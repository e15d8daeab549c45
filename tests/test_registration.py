"""torch.library registration: opcheck passes for every op, and torch.compile(fullgraph=True) traces
routed_lora with no graph break."""

import pytest
import torch

import molora_ops as mo
import molora_ops.ops  # noqa: F401  (registers the ops)

from _utils import assert_close, make_problem

OPCHECK_BACKENDS = ("torch", "triton")


def _backend_or_skip(name):
    status = mo.backends()[name]
    if not status["available"]:
        pytest.skip(status["reason"])
    return name


def _op_args(p, backend, with_plan):
    plan = mo.build_plan(p.topk_ids, p.lora_a.shape[0]) if with_plan else None
    tensors = (plan.sorted_pairs, plan.seg_offsets) if plan else (None, None)
    scale = p.scaling.float()
    return tensors, scale


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("with_plan", (False, True))
def test_opcheck_all_ops(backend, with_plan):
    backend = _backend_or_skip(backend)
    p = make_problem(11, 2, 4, 8, 24, 20, torch.float32, empty_frac=0.2)
    (sorted_pairs, seg_offsets), scale = _op_args(p, backend, with_plan)
    ops = torch.ops.molora
    h = ops.shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, scale, sorted_pairs, seg_offsets, backend)
    base = torch.randn(11, 20)
    cases = [
        (ops.shrink, (p.x, p.lora_a, p.topk_ids, p.topk_weights, scale, sorted_pairs, seg_offsets, backend)),
        (ops.expand, (h, p.lora_b, p.topk_ids, sorted_pairs, seg_offsets, backend, None)),
        (ops.expand, (h, p.lora_b, p.topk_ids, sorted_pairs, seg_offsets, backend, base)),
        (ops.expand_, (torch.randn(11, 20), h, p.lora_b, p.topk_ids, sorted_pairs, seg_offsets, backend)),
        (ops.routed_lora, (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scale, sorted_pairs, seg_offsets, backend, None)),
        (ops.routed_lora, (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scale, sorted_pairs, seg_offsets, backend, base)),
        (
            ops.routed_lora_,
            (torch.randn(11, 20), p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scale, sorted_pairs, seg_offsets, backend),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class _RoutedProjection(torch.nn.Module):
    """A base linear plus a routed-LoRA delta added into its output in place: the patch layer's shape."""

    def __init__(self, p, backend):
        super().__init__()
        self.base = torch.nn.Linear(p.x.shape[1], p.lora_b.shape[1])
        self.p, self.backend = p, backend

    def forward(self, x, topk_ids, topk_weights):
        plan = mo.build_plan(topk_ids, self.p.lora_a.shape[0])
        y = self.base(x)
        mo.routed_lora(x, self.p.lora_a, self.p.lora_b, topk_ids, topk_weights, scaling=self.p.scaling, out=y,
                       backend=self.backend, plan=plan)
        return torch.relu(y) + mo.routed_lora(x, self.p.lora_a, self.p.lora_b, topk_ids, topk_weights,
                                              scaling=0.5, backend=self.backend, plan=plan)


@pytest.mark.parametrize("backend", ("auto", "torch"))
def test_torch_compile_fullgraph_no_graph_break(backend):
    p = make_problem(13, 2, 5, 8, 32, 24, torch.float32, empty_frac=0.2)
    module = _RoutedProjection(p, backend)
    eager = module(p.x, p.topk_ids, p.topk_weights)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(p.x, p.topk_ids, p.topk_weights)
    assert_close(got, eager, atol=1e-6, rtol=1e-6)
    # New routing on the same compiled graph: the op reads the ids at run time, nothing was baked in.
    ids2 = torch.randint(-1, 5, p.topk_ids.shape)
    assert_close(compiled(p.x, ids2, p.topk_weights), module(p.x, ids2, p.topk_weights), atol=1e-6, rtol=1e-6)
    explanation = torch._dynamo.explain(module)(p.x, p.topk_ids, p.topk_weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons

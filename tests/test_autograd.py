"""Autograd of the routed-LoRA ops: float64 gradcheck, gradients against autograd through molora_ops.reference,
opcheck with inputs that require grad, the out= path under autograd, and torch.compile with a backward."""

import os

import pytest
import torch

import molora_ops as mo
from molora_ops import reference

from _utils import TOLERANCE, assert_close, edge_case_problem

F64 = torch.float64
ops = torch.ops.molora


def _backends():
    """torch and triton, each skipped where it cannot run unless MOLORA_REQUIRE_BACKENDS names it."""
    status = mo.backends()
    required = os.environ.get("MOLORA_REQUIRE_BACKENDS", "").split(",")
    return [
        pytest.param(name, marks=[] if status[name]["available"] or name in required else
                     [pytest.mark.skip(reason=status[name]["reason"])])
        for name in ("torch", "triton")
    ]


BACKENDS = _backends()

# (T, K, N, R, H_in, H_out): T = 0 and 1, odd sizes, K from 1 to 3.
GRADCHECK_SHAPES = (
    (0, 2, 3, 3, 5, 4),
    (1, 1, 3, 2, 7, 5),
    (1, 3, 4, 3, 5, 3),
    (7, 3, 5, 3, 9, 6),
    (13, 2, 6, 5, 11, 7),
)


def _shape_id(shape):
    return "T{}K{}N{}R{}_{}x{}".format(*shape)


def _leaves(p, dtype=None):
    """(x, lora_a, lora_b, topk_weights, scaling) as fresh leaves that require grad, optionally cast."""
    return tuple(
        (t if dtype is None else t.to(dtype)).detach().clone().requires_grad_()
        for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, p.scaling)
    )


def _grads(fn, inputs, grad_out):
    """d <fn(*inputs), grad_out> / d inputs, with zeros where an input got no gradient."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


NAMES = ("x", "lora_a", "lora_b", "topk_weights", "scaling")


def _assert_grads(got, want, tol, names=NAMES):
    for g, w, name in zip(got, want, names):
        assert_close(g, w, **(tol or dict(atol=1e-12, rtol=1e-12)), name=f"d/d{name}")


# ----------------------------------------------------------------------------------- float64 gradcheck
@pytest.mark.parametrize("with_plan", (False, True), ids=("no_plan", "plan"))
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=_shape_id)
def test_gradcheck_routed_lora(shape, with_plan):
    p = edge_case_problem(shape, F64)
    ids = p.topk_ids
    plan = mo.build_plan(ids, shape[2]) if with_plan else None
    inputs = _leaves(p, F64)

    def fn(x, a, b, w, s):
        return mo.routed_lora(x, a, b, ids, w, scaling=s, backend="torch", plan=plan)

    assert torch.autograd.gradcheck(fn, inputs)
    grad_out = torch.randn(shape[0], shape[5], dtype=F64)
    _, got = _grads(fn, inputs, grad_out)
    _, want = _grads(lambda x, a, b, w, s: reference.routed_lora(x, a, b, ids, w, scaling=s), inputs, grad_out)
    _assert_grads(got, want, None)
    assert bool((got[3][ids < 0] == 0).all()), "empty slots must get a zero weight gradient"
    assert bool((got[1][-1] == 0).all() and (got[2][-1] == 0).all()), "an adapter with no tokens gets zero grads"


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=_shape_id)
def test_gradcheck_shrink_and_expand(shape):
    p = edge_case_problem(shape, F64)
    ids = p.topk_ids
    x, a, b, w, s = _leaves(p, F64)
    h = reference.lora_shrink(p.x, p.lora_a, ids, p.topk_weights.to(F64), scaling=p.scaling.to(F64))
    h = h.detach().requires_grad_()

    def shrink(x, a, w, s):
        return mo.lora_shrink(x, a, ids, w, scaling=s, backend="torch")

    def expand(h, b):
        return mo.lora_expand(h, b, ids, backend="torch")

    assert torch.autograd.gradcheck(shrink, (x, a, w, s))
    assert torch.autograd.gradcheck(expand, (h, b))
    grad_h = torch.randn(h.shape, dtype=F64)
    _, got = _grads(shrink, (x, a, w, s), grad_h)
    _, want = _grads(lambda x, a, w, s: reference.lora_shrink(x, a, ids, w, scaling=s), (x, a, w, s), grad_h)
    _assert_grads(got, want, None, names=("x", "lora_a", "topk_weights", "scaling"))
    grad_y = torch.randn(shape[0], shape[5], dtype=F64)
    _, got = _grads(expand, (h, b), grad_y)
    _, want = _grads(lambda h, b: reference.lora_expand(h, b, ids), (h, b), grad_y)
    _assert_grads(got, want, None, names=("h", "lora_b"))


def test_gradcheck_out_path():
    """out= under autograd: gradients reach x, the adapters, the weights, the scaling and the base output."""
    p = edge_case_problem((9, 3, 4, 3, 7, 5), F64)
    ids = p.topk_ids
    base = torch.randn(9, 5, dtype=F64, requires_grad=True)
    h = torch.randn(9, 3, 3, dtype=F64, requires_grad=True)

    def routed(x, a, b, w, s, base):
        return mo.routed_lora(x, a, b, ids, w, scaling=s, out=base * 1.5, backend="torch")

    def expand(h, b, base):
        return mo.lora_expand(h, b, ids, out=base * 1.5, backend="torch")

    x, a, b, w, s = _leaves(p, F64)
    assert torch.autograd.gradcheck(routed, (x, a, b, w, s, base))
    assert torch.autograd.gradcheck(expand, (h, b, base))


# --------------------------------------------------------------------- every backend, every dtype
def _check_grads_against_float64(backend, dtype, use_out, device="cpu"):
    """Gradients in the inputs' dtypes (accumulated in float32) against float64 autograd through the
    reference on the same (rounded) inputs, at the dtype's table tolerance."""
    shape = (19, 3, 6, 5, 37, 23)
    p = edge_case_problem(shape, dtype).to(device)
    ids = p.topk_ids
    grad_out = torch.randn(shape[0], shape[5]).to(dtype).to(device)
    base = torch.randn(shape[0], shape[5]).to(dtype).to(device)

    def run(fn, x, a, b, w, s, base):
        out = base * 2 if use_out else None  # a non-leaf out that is part of the graph
        return fn(x, a, b, ids, w, scaling=s, out=out, **({"backend": backend} if fn is mo.routed_lora else {}))

    leaves = (*_leaves(p), base.clone().requires_grad_())
    _, got = _grads(lambda *t: run(mo.routed_lora, *t), leaves, grad_out)
    exact_leaves = tuple(t.detach().to(F64).requires_grad_() for t in leaves)
    _, want = _grads(lambda *t: run(reference.routed_lora, *t), exact_leaves, grad_out.to(F64))
    assert [g.dtype for g in got] == [dtype, dtype, dtype, torch.float32, torch.float32, dtype]
    _assert_grads(got, want, TOLERANCE[dtype], names=(*NAMES, "out"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("use_out", (False, True), ids=("functional", "out"))
def test_grads_match_float64(backend, dtype, use_out):
    _check_grads_against_float64(backend, dtype, use_out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("use_out", (False, True), ids=("functional", "out"))
def test_grads_match_float64_gpu(backend, dtype, use_out):
    """Each backend's forward and backward on CUDA tensors (cuda's backward is the Triton one)."""
    status = mo.backends()[backend]
    if not status["available"]:
        pytest.skip(status["reason"])
    _check_grads_against_float64(backend, dtype, use_out, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_expand_grads_float32_match_float64(backend):
    p = edge_case_problem((23, 2, 5, 7, 41, 29), torch.float32)
    ids = p.topk_ids
    grad_h, grad_y = torch.randn(23, 2, 7), torch.randn(23, 29)
    h = torch.randn(23, 2, 7)

    def shrink(x, a, w, s, h, b):
        return mo.lora_shrink(x, a, ids, w, scaling=s, backend=backend), mo.lora_expand(h, b, ids, backend=backend)

    def exact(x, a, w, s, h, b):
        return reference.lora_shrink(x, a, ids, w, scaling=s), reference.lora_expand(h, b, ids)

    def inputs(dtype):
        return tuple(t.to(dtype).detach().clone().requires_grad_() for t in
                     (p.x, p.lora_a, p.topk_weights, p.scaling, h, p.lora_b))

    got = torch.autograd.grad(shrink(*(i := inputs(torch.float32))), i, (grad_h, grad_y))
    want = torch.autograd.grad(exact(*(i := inputs(F64))), i, (grad_h.to(F64), grad_y.to(F64)))
    _assert_grads(got, want, TOLERANCE[torch.float32], names=("x", "lora_a", "topk_weights", "scaling", "h", "lora_b"))


@pytest.mark.parametrize("only", NAMES)
def test_one_input_requires_grad(only):
    """Only the gradient asked for is computed (e.g. router training with frozen adapters), and it is right."""
    p = edge_case_problem((17, 3, 5, 4, 13, 11), F64)
    ids = p.topk_ids
    inputs = [t.to(F64).detach().clone() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, p.scaling)]
    i = NAMES.index(only)
    inputs[i].requires_grad_()
    grad_out = torch.randn(17, 11, dtype=F64)
    got = torch.autograd.grad(mo.routed_lora(*inputs[:3], ids, inputs[3], scaling=inputs[4]), inputs[i], grad_out)
    want = torch.autograd.grad(reference.routed_lora(*inputs[:3], ids, inputs[3], scaling=inputs[4]), inputs[i], grad_out)
    assert_close(got[0], want[0], atol=1e-12, rtol=1e-12, name=f"d/d{only}")


# ------------------------------------------------------------------------------------- the out= path
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_out_path_bits_equal_with_and_without_grad(backend, dtype):
    """The autograd form of out= (out-of-place, then copied) gives the in-place kernel's result bit for bit."""
    p = edge_case_problem((21, 2, 5, 8, 33, 19), dtype)
    base = torch.randn(21, 19).to(dtype)
    args = (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    plain = base.clone()
    ret = mo.routed_lora(*args, scaling=p.scaling, out=plain, backend=backend)
    assert ret is plain
    w = p.topk_weights.clone().requires_grad_()
    tracked = base.clone()
    ret = mo.routed_lora(*args[:4], w, scaling=p.scaling, out=tracked, backend=backend)
    assert ret is tracked and tracked.grad_fn is not None
    assert torch.equal(tracked, plain)

    h = mo.lora_shrink(*args[:2], p.topk_ids, p.topk_weights, scaling=p.scaling, backend=backend)
    plain, tracked = base.clone(), base.clone()
    mo.lora_expand(h, p.lora_b, p.topk_ids, out=plain, backend=backend)
    mo.lora_expand(h.requires_grad_(), p.lora_b, p.topk_ids, out=tracked, backend=backend)
    assert tracked.grad_fn is not None and torch.equal(tracked, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_path_grads_equal_out_of_place(backend):
    """A base projection plus the delta added into its (strided view of the) output: x.grad includes the LoRA
    term, topk_weights and scaling get gradients, and all of them equal the out-of-place form's."""
    p = edge_case_problem((15, 3, 5, 4, 21, 13), torch.float32)
    ids = p.topk_ids
    weight = torch.randn(13, 21, requires_grad=True)
    grad_out = torch.randn(15, 13)

    def in_place(x, a, b, w, s, weight):
        y = torch.nn.functional.linear(x, weight)
        wide = torch.cat([y, y[:, :2]], dim=1)  # out is a non-contiguous view of a non-leaf
        mo.routed_lora(x, a, b, ids, w, scaling=s, out=wide[:, :13], backend=backend)
        return wide[:, :13]

    def out_of_place(x, a, b, w, s, weight):
        return torch.nn.functional.linear(x, weight) + mo.routed_lora(x, a, b, ids, w, scaling=s, backend=backend)

    leaves = _leaves(p)
    y1, g1 = _grads(in_place, (*leaves, weight), grad_out)
    y2, g2 = _grads(out_of_place, (*leaves, weight), grad_out)
    assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    _assert_grads(g1, g2, dict(atol=1e-6, rtol=1e-6), names=(*NAMES, "weight"))
    assert float(g1[3].abs().max()) > 0 and float(g1[4].abs().max()) > 0
    x_base_only = torch.autograd.grad(torch.nn.functional.linear(leaves[0], weight), leaves[0], grad_out)[0]
    assert float((g1[0] - x_base_only).abs().max()) > 1e-3, "x.grad must include the LoRA term"


def test_out_leaf_that_requires_grad_is_refused():
    p = edge_case_problem((6, 2, 3, 4, 9, 7), torch.float32)
    args = (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    h = torch.randn(6, 2, 4)
    for x_grad in (False, True):
        out = torch.randn(6, 7, requires_grad=True)
        before = out.detach().clone()
        x = p.x.clone().requires_grad_(x_grad)
        with pytest.raises(ValueError, match="out is a leaf tensor that requires grad"):
            mo.routed_lora(x, *args[1:], out=out)
        with pytest.raises(ValueError, match="out is a leaf tensor that requires grad"):
            mo.lora_expand(h, p.lora_b, p.topk_ids, out=out)
        assert torch.equal(out.detach(), before), "a refused out must be left untouched"
    # Without grad mode, autograd records nothing, so a leaf is written in place as torch itself allows.
    with torch.no_grad():
        assert mo.routed_lora(*args, out=out) is out
    assert not torch.equal(out.detach(), before)


def test_saved_ids_modified_before_backward_raises():
    """The backward reuses the forward's routing; ids changed in place in between are an error, never a
    silently wrong gradient."""
    p = edge_case_problem((8, 2, 4, 3, 9, 5), torch.float32)
    x = p.x.clone().requires_grad_()
    y = mo.routed_lora(x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    p.topk_ids.fill_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases(backend, dtype, with_plan):
    p = edge_case_problem((11, 3, 5, 4, 13, 9), dtype)
    ids = p.topk_ids
    plan = mo.build_plan(ids, 5) if with_plan else None
    sp, so = (plan.sorted_pairs, plan.seg_offsets) if plan else (None, None)
    x, a, b, w, s = _leaves(p)
    s = s.to(F64 if dtype == F64 else torch.float32).detach().requires_grad_()
    h = torch.randn(11, 3, 4, dtype=s.dtype, requires_grad=True)
    base = torch.randn(11, 9, dtype=dtype, requires_grad=True)
    return [
        (ops.shrink, (x, a, ids, w, s, sp, so, backend)),
        (ops.expand, (h, b, ids, sp, so, backend, None)),
        (ops.expand, (h, b, ids, sp, so, backend, base)),
        (ops.routed_lora, (x, a, b, ids, w, s, sp, so, backend, None)),
        (ops.routed_lora, (x, a, b, ids, w, s, sp, so, backend, base)),
    ]


@pytest.mark.parametrize("backend,dtype", [
    pytest.param("torch", F64), pytest.param("torch", torch.float32),
    pytest.param("triton", torch.float32, marks=BACKENDS[1].marks),
], ids=str)
@pytest.mark.parametrize("with_plan", (False, True), ids=("no_plan", "plan"))
def test_opcheck_with_autograd(backend, dtype, with_plan):
    """All of opcheck's tests (schema, autograd registration, fake tensors, aot dispatch with dynamic shapes,
    whose gradients are compared with eager ones) on every functional op, with inputs that require grad."""
    for op, args in _opcheck_cases(backend, dtype, with_plan):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("needs", ((True, True, True, True, True), (True, False, False, True, False)), ids=str)
def test_opcheck_backward_ops(needs):
    p = edge_case_problem((10, 2, 4, 3, 11, 7), torch.float32)
    ids, s = p.topk_ids, p.scaling.float()
    plan = mo.build_plan(ids, 4)
    h, gy = torch.randn(10, 2, 3), torch.randn(10, 7)
    for sp, so in ((None, None), (plan.sorted_pairs, plan.seg_offsets)):
        torch.library.opcheck(
            ops.routed_lora_backward,
            (gy, p.x, p.lora_a, p.lora_b, ids, p.topk_weights, s, sp, so, None, "torch", list(needs)),
        )
        shrink_needs = [needs[0], needs[1], needs[3], needs[4]]
        torch.library.opcheck(
            ops.shrink_backward, (h, p.x, p.lora_a, ids, p.topk_weights, s, sp, so, "torch", shrink_needs)
        )
        torch.library.opcheck(ops.expand_backward, (gy, h, p.lora_b, ids, sp, so, "torch", [needs[0], needs[2]]))


# ------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ("auto", "torch"))
def test_torch_compile_backward(backend):
    """fullgraph compile (aot_eager) of a projection that uses out= and the functional form; the backward
    graph holds the backward ops, and its gradients equal eager ones."""
    p = edge_case_problem((13, 2, 5, 8, 32, 24), torch.float32)
    linear = torch.nn.Linear(32, 24)

    def forward(x, a, b, w, s, ids):
        plan = mo.build_plan(ids, 5)
        y = linear(x)
        mo.routed_lora(x, a, b, ids, w, scaling=s, out=y, backend=backend, plan=plan)
        h = mo.lora_shrink(x, a, ids, w, backend=backend, plan=plan)
        return torch.tanh(y) + mo.lora_expand(h, b, ids, backend=backend, plan=plan)

    grad_out = torch.randn(13, 24)
    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    for ids in (p.topk_ids, torch.randint(-1, 5, p.topk_ids.shape)):
        params = (*_leaves(p), linear.weight)  # forward reads linear.weight itself
        y_eager, g_eager = _grads(lambda x, a, b, w, s, _: forward(x, a, b, w, s, ids), params, grad_out)
        y_comp, g_comp = _grads(lambda x, a, b, w, s, _: compiled(x, a, b, w, s, ids), params, grad_out)
        assert_close(y_comp, y_eager, atol=1e-6, rtol=1e-6)
        _assert_grads(g_comp, g_eager, dict(atol=1e-6, rtol=1e-6), names=(*NAMES, "linear.weight"))

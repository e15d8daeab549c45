"""The backends' backward (molora_ops/impl/torch_backward.py, kernels/routed_lora_backward.py under the Triton
interpreter): gradients against float64 autograd through molora_ops.reference over the parity grid (empty slots,
duplicate ids in a token's top-k, adapters with no tokens, T = 0 and 1, odd sizes), the saved-u training op,
the dispatch of the backward ops on the forward's backend, determinism, gradcheck/opcheck, and a compiled
patched model's gradients."""

from __future__ import annotations

import pytest
import torch

import molora_ops as mo
from molora_ops import reference
from molora_ops.impl import cpu_train, torch_backward, triton_backend

from _utils import TOLERANCE, assert_close, edge_case_problem

F64 = torch.float64
ops = torch.ops.molora
NAMES = ("x", "lora_a", "lora_b", "topk_weights", "scale")

_, _TRITON_AVAILABLE, _TRITON_REASON = triton_backend.status()
needs_triton = pytest.mark.skipif(not _TRITON_AVAILABLE, reason=_TRITON_REASON)
BACKENDS = ("torch", pytest.param("triton", marks=needs_triton))
# the backwards: "torch" runs the C++ CPU kernels where they are loaded (impl/cpu_train.py), "torch-pure" the grouped
# pure-PyTorch code (impl/torch_backward.py with the kernels switched off)
GRAD_BACKENDS = ("torch", "torch-pure", pytest.param("triton", marks=needs_triton))

# (T, K, N, R, H_in, H_out): small enough for the interpreter; T = 0, 1, 3, 7 and odd sizes.
SHAPES_SMOKE = ((0, 2, 3, 3, 5, 4), (1, 1, 3, 2, 7, 5), (3, 3, 4, 5, 9, 6), (7, 2, 5, 3, 19, 23))


def _shape_id(shape):
    return "T{}K{}N{}R{}_{}x{}".format(*shape)


def _exact_grads(p, grad_out):
    """float64 autograd through the reference on the same (rounded) inputs: (dx, dA, dB, dw, ds)."""
    leaves = [t.detach().to(F64).requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, p.scaling)]
    out = reference.routed_lora(*leaves[:3], p.topk_ids, leaves[3], scaling=leaves[4])
    return torch.autograd.grad(out, leaves, grad_out.to(F64), allow_unused=True)


def _backend_grads(backend, p, grad_out, needs=(True,) * 5, u=None):
    impl = triton_backend if backend == "triton" else torch_backward
    plan = mo.build_plan(p.topk_ids, p.lora_a.shape[0])
    scale = p.scaling.to(F64 if p.x.dtype == F64 else torch.float32)
    use, cpu_train.USE = cpu_train.USE, backend != "torch-pure"
    try:
        return impl.routed_lora_backward(grad_out, p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scale, plan,
                                         needs, u)
    finally:
        cpu_train.USE = use


def _unscaled_u(p):
    return reference.lora_shrink(p.x, p.lora_a, p.topk_ids, torch.ones_like(p.topk_weights), scaling=1.0)


def _check(got, want, dtype, names=NAMES):
    for g, w, name in zip(got, want, names):
        tol = TOLERANCE[torch.float32] if name in ("topk_weights", "scale") else TOLERANCE[dtype]
        assert_close(g, torch.zeros_like(g) if w is None else w, **tol, name=f"d/d{name}")


# ----------------------------------------------------------------------------- parity with the reference
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("saved_u", (False, True), ids=("recompute", "saved_u"))
@pytest.mark.parametrize("shape", SHAPES_SMOKE, ids=_shape_id)
def test_routed_lora_backward_matches_reference(backend, dtype, saved_u, shape):
    p = edge_case_problem(shape, dtype)
    grad_out = torch.randn(shape[0], shape[5]).to(dtype)
    got = _backend_grads(backend, p, grad_out, u=_unscaled_u(p) if saved_u else None)
    assert [g.dtype for g in got] == [dtype, dtype, dtype, torch.float32, torch.float32]
    _check(got, _exact_grads(p, grad_out), dtype)
    ids = p.topk_ids
    assert bool((got[3][ids < 0] == 0).all()), "empty slots get a zero weight gradient"
    assert bool((got[1][-1] == 0).all() and (got[2][-1] == 0).all()), "an adapter with no tokens gets zero grads"


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES_SMOKE[1:], ids=_shape_id)
def test_shrink_and_expand_backward_match_reference(backend, shape, monkeypatch):
    p = edge_case_problem(shape, torch.float32)
    ids, plan = p.topk_ids, mo.build_plan(p.topk_ids, shape[2])
    impl = triton_backend if backend == "triton" else torch_backward
    monkeypatch.setattr(cpu_train, "USE", backend != "torch-pure")
    grad_h, grad_y, h = torch.randn(shape[0], shape[1], shape[3]), torch.randn(shape[0], shape[5]), torch.randn(shape[0], shape[1], shape[3])
    got = impl.shrink_backward(grad_h, p.x, p.lora_a, ids, p.topk_weights, p.scaling, plan, (True,) * 4)
    leaves = [t.detach().to(F64).requires_grad_() for t in (p.x, p.lora_a, p.topk_weights, p.scaling)]
    want = torch.autograd.grad(reference.lora_shrink(leaves[0], leaves[1], ids, leaves[2], scaling=leaves[3]),
                               leaves, grad_h.to(F64))
    _check(got, want, torch.float32, names=("x", "lora_a", "topk_weights", "scale"))
    got = impl.expand_backward(grad_y, h, p.lora_b, ids, plan, (True, True))
    leaves = [t.detach().to(F64).requires_grad_() for t in (h, p.lora_b)]
    want = torch.autograd.grad(reference.lora_expand(leaves[0], leaves[1], ids), leaves, grad_y.to(F64))
    _check(got, want, torch.float32, names=("h", "lora_b"))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("needs", ((False, False, False, True, False), (True, False, True, False, True),
                                   (False, True, False, False, False)), ids=str)
def test_only_needed_gradients_are_formed(backend, needs):
    p = edge_case_problem((7, 2, 4, 3, 11, 9), torch.float32)
    grad_out = torch.randn(7, 9)
    got = _backend_grads(backend, p, grad_out, needs)
    want = _exact_grads(p, grad_out)
    for g, w, need, name in zip(got, want, needs, NAMES):
        if need:
            _check((g,), (w,), torch.float32, names=(name,))
        else:
            assert g is None, f"d/d{name} was formed but not asked for"


# (T, K, N, R, H_in, H_out) whose strides are 16-byte multiples in float32: torch._grouped_mm takes them
SHAPES_ALIGNED = ((0, 2, 3, 4, 8, 12), (1, 2, 3, 4, 8, 4), (33, 2, 5, 8, 24, 24), (64, 3, 6, 16, 40, 36))


@pytest.mark.parametrize("grouped", (True, False), ids=("grouped_mm", "mm_loop"))
@pytest.mark.parametrize("shape", SHAPES_ALIGNED, ids=_shape_id)
def test_torch_pair_rows_paths_match_reference(grouped, shape, monkeypatch):
    """The torch forward (routed_lora_train: out and u) and backward through both GEMM paths of impl/pair_rows.py
    (torch._grouped_mm over all adapters, or one torch.mm per adapter), against float64 autograd of the reference;
    the grouped path is really taken where asked (every GEMM but those written into a dead buffer: the dx rows, and
    the forward's expand when H_out == H_in), and never where disabled."""
    from molora_ops.impl import pair_rows

    calls = []
    real = pair_rows._GROUPED_MM

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pair_rows, "_GROUPED_MM", counted if grouped else None)
    monkeypatch.setattr(cpu_train, "USE", False)  # the pure-PyTorch forward and backward
    p = edge_case_problem(shape, torch.float32)
    scale = p.scaling.float()
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, scale)]
    out, u = ops.routed_lora_train(*leaves[:3], p.topk_ids, leaves[3], leaves[4], None, None, "torch", None)
    exact = reference.routed_lora(*(t.detach().to(F64) for t in leaves[:3]), p.topk_ids, leaves[3].detach().to(F64),
                                  scaling=scale.to(F64))
    assert_close(out, exact, **TOLERANCE[torch.float32], name="out")
    assert_close(u, _unscaled_u(p), **TOLERANCE[torch.float32], name="u")
    grad_out = torch.randn(shape[0], shape[5])
    grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    _check(grads, _exact_grads(p, grad_out), torch.float32)
    expected = (4 + (shape[4] != shape[5])) if grouped and shape[0] else 0
    assert len(calls) == expected, calls
    again = torch.autograd.grad(out, leaves, grad_out)
    assert all(torch.equal(g, h) for g, h in zip(grads, again)), "the torch backward must be bit-reproducible"


@needs_triton
def test_triton_backward_is_deterministic_and_atomic_switch_agrees():
    p = edge_case_problem((23, 3, 4, 5, 37, 29), torch.float32)
    grad_out = torch.randn(23, 29)
    first = _backend_grads("triton", p, grad_out)
    again = _backend_grads("triton", p, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "the default backward must be bit-reproducible"
    with triton_backend.override(atomic_backward=True):
        atomic = _backend_grads("triton", p, grad_out)
    _check(atomic, first, torch.float32)


# ------------------------------------------------------------------------------------ the op layer
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_ops_dispatch_on_the_forward_backend(backend, monkeypatch):
    """The gradients of a forward made with `backend` come from that backend's backward (cuda's: Triton's)."""
    called = []
    impl = torch_backward if backend == "torch" else triton_backend
    real = impl.routed_lora_backward
    monkeypatch.setattr(impl, "routed_lora_backward", lambda *a: called.append(backend) or real(*a))
    p = edge_case_problem((5, 2, 3, 4, 7, 6), torch.float32)
    x = p.x.clone().requires_grad_()
    mo.routed_lora(x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling, backend=backend).sum().backward()
    assert called == [backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_lora_train_saves_u_and_matches_routed_lora(backend):
    p = edge_case_problem((9, 3, 4, 5, 13, 11), torch.float32)
    scale = p.scaling.float()
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, scale)]
    args = (*leaves[:3], p.topk_ids, leaves[3], leaves[4], None, None, backend, None)
    out, u = ops.routed_lora_train(*args)
    assert not u.requires_grad and u.dtype == torch.float32
    assert_close(u, _unscaled_u(p), **TOLERANCE[torch.float32], name="u")
    assert_close(out, ops.routed_lora(*args), **TOLERANCE[torch.float32], name="out")
    grad_out = torch.randn(9, 11)
    _check(torch.autograd.grad(out, leaves, grad_out), _exact_grads(p, grad_out), torch.float32)


@pytest.mark.parametrize("shape", SHAPES_SMOKE, ids=_shape_id)
def test_gradcheck_float64_through_both_routed_ops(shape):
    p = edge_case_problem(shape, F64)
    ids = p.topk_ids
    leaves = [t.detach().to(F64).requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, p.scaling)]
    for op in (ops.routed_lora, lambda *a: ops.routed_lora_train(*a)[0]):
        assert torch.autograd.gradcheck(lambda x, a, b, w, s: op(x, a, b, ids, w, s, None, None, "torch", None), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_plan", (False, True), ids=("no_plan", "plan"))
def test_opcheck_train_op_and_backward_ops(backend, with_plan):
    p = edge_case_problem((6, 2, 4, 3, 9, 7), torch.float32)
    ids, s = p.topk_ids, p.scaling.float()
    plan = mo.build_plan(ids, 4)
    sp, so = (plan.sorted_pairs, plan.seg_offsets) if with_plan else (None, None)
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, s)]
    torch.library.opcheck(ops.routed_lora_train, (*leaves[:3], ids, leaves[3], leaves[4], sp, so, backend, None))
    gy, u = torch.randn(6, 7), _unscaled_u(p)
    for needs in ([True] * 5, [False, False, False, True, False]):
        torch.library.opcheck(ops.routed_lora_backward,
                              (gy, p.x, p.lora_a, p.lora_b, ids, p.topk_weights, s, sp, so, u, backend, needs))


# ------------------------------------------------------------------------------------- torch.compile
def test_compiled_patched_model_backward_equals_eager(tmp_path_factory):
    """A patched tiny Llama under torch.compile(fullgraph=True, aot_eager): the LM loss's gradients w.r.t. the
    per-token routing weights and the base embedding (which flow through the routed ops' backward) equal eager."""
    hf = pytest.importorskip("_hf")
    setup = hf.shared_setup("llama", tmp_path_factory)
    model = setup.patched()
    ids = setup.ids
    weights = torch.rand(*ids.shape, len(hf.ADAPTERS), generator=torch.Generator().manual_seed(3))
    embed = model.get_input_embeddings().weight

    def grads(fn):
        w = weights.clone().requires_grad_()
        embed.grad = None
        embed.requires_grad_(True)
        logits = fn(ids, adapter_weights=w).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), w.grad, embed.grad.clone()

    torch._dynamo.reset()
    try:
        eager = grads(model)
        compiled = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    finally:
        embed.requires_grad_(False)
        torch._dynamo.reset()
    assert eager[1] is not None and float(eager[1].abs().max()) > 0, "routing weights got no gradient"
    for got, want, name in zip(compiled, eager, ("loss", "d/dadapter_weights", "d/dembed")):
        assert_close(got, want, atol=1e-5, rtol=1e-4, name=name)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_backward_on_cuda_matches_reference(backend, dtype):
    status = mo.backends()[backend]
    if not status["available"]:
        pytest.skip(status["reason"])
    p = edge_case_problem((133, 2, 8, 16, 123, 2049), dtype, device="cuda")
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, p.scaling)]
    grad_out = torch.randn(133, 2049, device="cuda").to(dtype)
    out = mo.routed_lora(*leaves[:3], p.topk_ids, leaves[3], scaling=leaves[4], backend=backend)
    got = torch.autograd.grad(out, leaves, grad_out)
    _check(got, _exact_grads(p, grad_out), dtype)

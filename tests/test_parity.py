"""Parity of every fast backend against molora_ops.reference: dtypes, odd sizes, traffic patterns, empty
slots, duplicate ids, zero tokens, in-place accumulation and non-contiguous inputs."""

import functools
import os

import pytest
import torch

import molora_ops as mo
from molora_ops import reference

from _utils import TRAFFIC_PATTERNS, assert_close, assert_parity, make_problem, naive_lowp

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (T, K, N, R, H_in, H_out). Odd sizes everywhere; T = 0 and 1; H = 2049 (past any power-of-two tile).
SHAPES_SMOKE = (
    (0, 2, 3, 8, 32, 16),
    (1, 1, 4, 8, 64, 64),
    (3, 2, 5, 7, 123, 77),
    (7, 3, 6, 16, 64, 130),
    (64, 4, 8, 8, 96, 64),
    (133, 2, 9, 16, 123, 96),
    (5, 2, 3, 4, 2049, 33),
)
SHAPES_FULL = SHAPES_SMOKE + (
    (1, 2, 32, 16, 4096, 4096),
    (133, 4, 16, 64, 2049, 2049),
    (1024, 2, 32, 16, 4096, 1024),
)


def _backends(status: dict, required: list[str], interpreting: bool) -> list:
    """The backends of the CPU-tensor tests: torch, and triton under its interpreter. Each is skipped where it
    cannot run, unless `required` (MOLORA_REQUIRE_BACKENDS; CI sets it) names it, so a backend that silently
    stopped loading fails the run instead of skipping. Triton runs CPU tensors only under TRITON_INTERPRET=1:
    with it off (a CUDA machine, where tests/conftest.py leaves it unset) triton skips here whatever `required`
    says, and the gpu tests at the end of this file run it on CUDA tensors."""
    params = []
    for name in ("torch", "triton"):
        why = None if status[name]["available"] or name in required else status[name]["reason"]
        if name == "triton" and not interpreting:
            why = "CPU tensors run Triton only under TRITON_INTERPRET=1; the gpu tests cover CUDA tensors"
        params.append(pytest.param(name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


BACKENDS = _backends(mo.backends(), os.environ.get("MOLORA_REQUIRE_BACKENDS", "").split(","),
                     os.environ.get("TRITON_INTERPRET") == "1")


def _shape_id(shape):
    return "T{}K{}N{}R{}_{}x{}".format(*shape)


def _check_routed(problem, backend, dtype):
    got = mo.routed_lora(
        problem.x, problem.lora_a, problem.lora_b, problem.topk_ids, problem.topk_weights,
        scaling=problem.scaling, backend=backend,
    )
    assert got.dtype == dtype and got.shape == (problem.x.shape[0], problem.lora_b.shape[1])
    assert_parity(got, problem.exact(), naive_lowp(problem), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_SMOKE, ids=_shape_id)
def test_routed_lora_grid(backend, dtype, shape):
    problem = make_problem(*shape, dtype, empty_frac=0.2, duplicate_frac=0.2)
    _check_routed(problem, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", TRAFFIC_PATTERNS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_traffic_patterns(backend, pattern, dtype):
    problem = make_problem(48, 2, 8, 16, 96, 80, dtype, pattern=pattern, empty_frac=0.1)
    _check_routed(problem, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", (1, 2, 3, 4))
def test_top_k_1_to_4_int32_ids(backend, top_k):
    problem = make_problem(19, top_k, 6, 8, 40, 24, torch.float32, id_dtype=torch.int32, duplicate_frac=0.3)
    _check_routed(problem, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_and_expand(backend, dtype):
    p = make_problem(37, 3, 5, 12, 71, 45, dtype, empty_frac=0.2, duplicate_frac=0.2)
    h = mo.lora_shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, scaling=p.scaling, backend=backend)
    d = torch.float64
    h_exact = reference.lora_shrink(p.x.to(d), p.lora_a.to(d), p.topk_ids, p.topk_weights.to(d), scaling=p.scaling.to(d))
    assert h.dtype == torch.float32 and h.shape == (37, 3, 12)
    assert_close(h, h_exact, atol=1e-5, rtol=1e-5, name="h")
    assert bool((h[p.topk_ids < 0] == 0).all()), "empty slots must give h == 0"

    y = mo.lora_expand(h_exact.float(), p.lora_b, p.topk_ids, backend=backend)
    y_exact = reference.lora_expand(h_exact.float().double(), p.lora_b.to(d), p.topk_ids)
    assert y.dtype == dtype
    assert_parity(y, y_exact, reference.lora_expand(h_exact.float(), p.lora_b, p.topk_ids), dtype, name="expand")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_accumulates_in_place(backend, dtype):
    p = make_problem(29, 2, 4, 8, 50, 61, dtype, empty_frac=0.25)
    base = torch.randn(29, 61).to(dtype)
    out = base.clone()
    ret = mo.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling, out=out, backend=backend)
    assert ret.data_ptr() == out.data_ptr(), "out= must be returned, not a copy"
    exact = base.double() + p.exact()
    lowp = base + naive_lowp(p)
    assert_parity(out, exact, lowp, dtype)

    h = mo.lora_shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, scaling=p.scaling, backend=backend)
    out2 = base.clone()
    mo.lora_expand(h, p.lora_b, p.topk_ids, out=out2, backend=backend)
    assert_parity(out2, exact, lowp, dtype, name="expand out=")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_slots_empty_adds_nothing(backend):
    p = make_problem(9, 2, 3, 4, 16, 12, torch.float16)
    ids = torch.full_like(p.topk_ids, -1)
    got = mo.routed_lora(p.x, p.lora_a, p.lora_b, ids, p.topk_weights, backend=backend)
    assert torch.equal(got, torch.zeros_like(got))
    out = torch.randn(9, 12).half()
    before = out.clone()
    mo.routed_lora(p.x, p.lora_a, p.lora_b, ids, p.topk_weights, out=out, backend=backend)
    assert torch.equal(out, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    p = make_problem(0, 3, 4, 8, 32, 24, torch.float32)
    assert mo.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, backend=backend).shape == (0, 24)
    assert mo.lora_shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, backend=backend).shape == (0, 3, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_without_tokens_and_scaling_forms(backend):
    p = make_problem(21, 2, 16, 8, 33, 17, torch.float32)
    p.topk_ids.clamp_(max=2)  # adapters 3..15 get no tokens
    args = (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    for scaling in (None, 0.37, p.scaling):
        got = mo.routed_lora(*args, scaling=scaling, backend=backend)
        want = reference.routed_lora(*args, scaling=scaling)
        assert_close(got, want, atol=2e-5, rtol=2e-5, name=f"scaling={type(scaling).__name__}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    p = make_problem(23, 2, 5, 8, 64, 48, torch.float32, empty_frac=0.1)
    x_nc = torch.randn(64, 23).t()  # [23, 64], column-major
    x_nc.copy_(p.x)
    a_nc = torch.randn(5, 64, 8).transpose(1, 2)
    a_nc.copy_(p.lora_a)
    ids_nc = torch.randint(0, 5, (2, 23)).t()
    ids_nc.copy_(p.topk_ids)
    w_nc = p.topk_weights.t().contiguous().t()
    assert not (x_nc.is_contiguous() or a_nc.is_contiguous() or ids_nc.is_contiguous() or w_nc.is_contiguous())
    got = mo.routed_lora(x_nc, a_nc, p.lora_b, ids_nc, w_nc, scaling=p.scaling, backend=backend)
    assert_parity(got, p.exact(), naive_lowp(p), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_plan_matches_fresh_plan(backend):
    p = make_problem(40, 2, 6, 8, 32, 32, torch.float32, empty_frac=0.2, duplicate_frac=0.2)
    plan = mo.build_plan(p.topk_ids, 6)
    args = (p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights)
    with_plan = mo.routed_lora(*args, scaling=p.scaling, backend=backend, plan=plan)
    without = mo.routed_lora(*args, scaling=p.scaling, backend=backend)
    assert torch.equal(with_plan, without)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_unvalidated_are_never_read(backend):
    """With validate=False an id outside [0, N) must not be dereferenced: it contributes nothing."""
    p = make_problem(17, 3, 4, 8, 24, 20, torch.float32)
    bad = p.topk_ids.clone()
    bad[::3, 0] = 4  # == N
    bad[1::4, 2] = 1_000_000
    bad[2::5, 1] = -7
    got = mo.routed_lora(p.x, p.lora_a, p.lora_b, bad, p.topk_weights, backend=backend, validate=False)
    cleaned = torch.where((bad >= 0) & (bad < 4), bad, torch.full_like(bad, -1))
    want = reference.routed_lora(p.x, p.lora_a, p.lora_b, cleaned, p.topk_weights)
    assert_close(got, want, atol=2e-5, rtol=2e-5)


def _routed_fn(backend):
    return reference.routed_lora if backend == "reference" else functools.partial(mo.routed_lora, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_non_finite_adapter_reaches_only_its_tokens(backend, dtype):
    """NaN in lora_a of adapter 0 (which the reference gathers for empty slots), NaN and Inf in lora_b of
    adapters 2 and 3: outputs are non-finite exactly where the float64 answer is (tokens routed there) and
    right everywhere else. 70 fp16 tokens take Triton's default tensor-core expand."""
    p = make_problem(70, 2, 5, 8, 40, 24, dtype, empty_frac=0.1, duplicate_frac=0.2)
    lowp = naive_lowp(p)  # before poisoning: the rounding yardstick for the healthy tokens
    p.lora_a[0, 1, 5] = float("nan")
    p.lora_b[2, 3, 1] = float("nan")
    p.lora_b[3, 0, 0] = float("inf")
    exact = p.exact()
    got = _routed_fn(backend)(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling)
    routed_to_poisoned = ((p.topk_ids == 0) | (p.topk_ids == 2) | (p.topk_ids == 3)).any(dim=1)
    assert torch.equal(exact.isfinite().all(dim=1), ~routed_to_poisoned)
    assert torch.equal(got.isfinite(), exact.isfinite())
    healthy = ~routed_to_poisoned
    assert_parity(got[healthy], exact[healthy], lowp[healthy], dtype)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_non_finite_weight_in_empty_slot_adds_nothing(backend):
    """The contract: an empty slot adds nothing, so its weight is never read into the result (the reference
    multiplied it by 0, and NaN * 0 = NaN)."""
    p = make_problem(33, 3, 4, 8, 24, 20, torch.float32, empty_frac=0.3)
    p.topk_ids[0] = -1
    exact, lowp = p.exact(), naive_lowp(p)
    empty = p.topk_ids < 0
    p.topk_weights[empty] = float("nan")
    p.topk_weights[empty & (torch.rand(empty.shape) < 0.5)] = float("inf")
    got = _routed_fn(backend)(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, scaling=p.scaling)
    assert_parity(got, exact, lowp, torch.float32)
    shrink = reference.lora_shrink if backend == "reference" else functools.partial(mo.lora_shrink, backend=backend)
    h = shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, scaling=p.scaling)
    assert bool((h[empty] == 0).all()) and bool(h.isfinite().all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_FULL, ids=_shape_id)
def test_routed_lora_grid_gpu(backend, dtype, shape):
    problem = make_problem(*shape, dtype, empty_frac=0.2, duplicate_frac=0.2, device="cuda")
    _check_routed(problem, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", TRAFFIC_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_traffic_patterns_gpu(pattern, dtype):
    problem = make_problem(1024, 2, 32, 16, 1024, 1024, dtype, pattern=pattern, empty_frac=0.1, device="cuda")
    _check_routed(problem, "triton", dtype)


def test_cpu_backend_params_on_a_cuda_machine():
    """What a CUDA machine collects: triton available but the interpreter off, so the CPU-tensor triton cases
    skip (even when required) and torch runs; with the interpreter on (CI), a required triton never skips."""
    up = {"available": True, "reason": "ok"}
    down = {"available": False, "reason": "no triton"}
    on_cuda = _backends({"torch": up, "triton": up}, ["triton"], interpreting=False)
    assert [p.values[0] for p in on_cuda] == ["torch", "triton"]
    assert on_cuda[0].marks == () or list(on_cuda[0].marks) == []
    (skip,) = on_cuda[1].marks
    assert skip.name == "skip" and "TRITON_INTERPRET" in skip.kwargs["reason"]
    in_ci = _backends({"torch": up, "triton": down}, ["torch", "triton"], interpreting=True)
    assert all(not p.marks for p in in_ci)
    unrequired = _backends({"torch": up, "triton": down}, [""], interpreting=True)
    assert unrequired[1].marks[0].kwargs["reason"] == "no triton"

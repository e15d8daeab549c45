"""Bad input gets a ValueError or TypeError that names the argument and what was expected."""

import functools

import pytest
import torch

import molora_ops as mo
from molora_ops import _validation, reference

T, K, N, R, H_IN, H_OUT = 6, 2, 3, 4, 10, 12


def _args(**overrides):
    args = dict(
        x=torch.randn(T, H_IN),
        lora_a=torch.randn(N, R, H_IN),
        lora_b=torch.randn(N, H_OUT, R),
        topk_ids=torch.randint(0, N, (T, K)),
        topk_weights=torch.rand(T, K),
    )
    args.update(overrides)
    return args


def _call(fn, scaling=None, out=None, **overrides):
    a = _args(**overrides)
    return fn(a["x"], a["lora_a"], a["lora_b"], a["topk_ids"], a["topk_weights"], scaling=scaling, out=out)


CASES = [
    (dict(x=torch.randn(T, H_IN, 1)), ValueError, r"x must be 2-D"),
    (dict(x=torch.randn(T, H_IN).to(torch.int32)), TypeError, r"x must be float16, bfloat16 or float32"),
    (dict(lora_a=torch.randn(N, R, H_IN + 1)), ValueError, r"lora_a must be \[N, R, H_in\] with H_in = x.shape\[1\]"),
    (dict(lora_a=torch.randn(N, R, H_IN).half()), TypeError, r"lora_a must have x's dtype"),
    (dict(lora_b=torch.randn(N + 1, H_OUT, R)), ValueError, r"lora_b must be \[N, H_out, R\]"),
    (dict(lora_b=torch.randn(N, H_OUT, R + 1)), ValueError, r"lora_b must be \[N, H_out, R\]"),
    (dict(lora_b=torch.randn(N, H_OUT, R).double()), TypeError, r"lora_b must have x's dtype"),
    (dict(topk_ids=torch.randint(0, N, (T + 1, K))), ValueError, r"topk_ids must have 6 rows"),
    (dict(topk_ids=torch.randint(0, N, (T, K)).float()), TypeError, r"topk_ids must be int32 or int64"),
    (dict(topk_ids=torch.zeros(T, 0, dtype=torch.long), topk_weights=torch.zeros(T, 0)), ValueError, r"K >= 1"),
    (dict(topk_ids=torch.full((T, K), N)), ValueError, r"topk_ids must lie in \[-1, 3\)"),
    (dict(topk_ids=torch.full((T, K), -2)), ValueError, r"topk_ids must lie in \[-1, 3\)"),
    (dict(topk_weights=torch.rand(T, K + 1)), ValueError, r"topk_weights must have the shape of topk_ids"),
    (dict(topk_weights=torch.ones(T, K, dtype=torch.long)), TypeError, r"topk_weights must be a floating tensor"),
    (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    (dict(topk_weights=None), TypeError, r"topk_weights must be a \[T, K\] floating tensor .* got None"),
]


@pytest.mark.parametrize("fn", (mo.routed_lora, reference.routed_lora), ids=("ops", "reference"))
@pytest.mark.parametrize("overrides,exc,message", CASES)
def test_bad_input_names_the_argument(fn, overrides, exc, message):
    with pytest.raises(exc, match=message):
        _call(fn, **overrides)


@pytest.mark.parametrize("fn", (mo.routed_lora, reference.routed_lora), ids=("ops", "reference"))
def test_bad_out_and_scaling(fn):
    with pytest.raises(ValueError, match=r"out must have shape \[T, H_out\] = \(6, 12\)"):
        _call(fn, out=torch.zeros(T, H_OUT + 1))
    with pytest.raises(TypeError, match=r"out must have dtype torch.float32"):
        _call(fn, out=torch.zeros(T, H_OUT, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scaling must have shape \[N\] = \(3,\)"):
        _call(fn, scaling=torch.ones(N + 1))
    with pytest.raises(TypeError, match=r"scaling must be None, a float or a \[N\] tensor"):
        _call(fn, scaling="2")


def test_meta_device_mix_is_rejected():
    with pytest.raises(ValueError, match=r"lora_a is on meta but x is on cpu"):
        _call(mo.routed_lora, lora_a=torch.randn(N, R, H_IN, device="meta"))


def test_unknown_backend_and_plan_mismatch():
    a = _args()
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'torch', 'triton', 'cuda'"):
        mo.routed_lora(*a.values(), backend="tpu")
    plan = mo.build_plan(torch.zeros(T + 1, K, dtype=torch.long), N)
    with pytest.raises(ValueError, match=r"plan was built for topk_ids \(7, 2\)"):
        mo.routed_lora(*a.values(), plan=plan)
    with pytest.raises(TypeError, match=r"plan must be a molora_ops.RoutingPlan"):
        mo.routed_lora(*a.values(), plan=(1, 2))


def test_cuda_backend_refuses_cpu_tensors_or_reports_unavailable():
    with pytest.raises((ValueError, RuntimeError), match=r"backend='cuda'"):
        mo.routed_lora(*_args().values(), backend="cuda")


def test_expand_and_shrink_checks():
    h = torch.zeros(T, K, R)
    with pytest.raises(TypeError, match=r"h must be float32"):
        mo.lora_expand(h.half(), torch.randn(N, H_OUT, R), torch.zeros(T, K, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lora_b must be \[N, H_out, R\] with R = h.shape\[2\] = 4"):
        mo.lora_expand(h, torch.randn(N, H_OUT, R + 2), torch.zeros(T, K, dtype=torch.long))
    with pytest.raises(ValueError, match=r"topk_ids must be \[T, K\] = \(6, 2\) to match h"):
        mo.lora_expand(h, torch.randn(N, H_OUT, R), torch.zeros(T, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"topk_ids must lie in"):
        mo.lora_shrink(torch.randn(T, H_IN), torch.randn(N, R, H_IN), torch.full((T, K), 9), torch.rand(T, K))


@pytest.mark.parametrize("fn", (mo.lora_expand, reference.lora_expand), ids=("ops", "reference"))
def test_expand_with_rank_zero_names_lora_b(fn):
    """As lora_shrink refuses R = 0 (naming lora_a), lora_expand refuses it naming lora_b."""
    with pytest.raises(ValueError, match=r"lora_b must have N >= 1 adapters and rank R >= 1, got \(3, 12, 0\)"):
        fn(torch.zeros(T, K, 0), torch.randn(N, H_OUT, 0), torch.randint(0, N, (T, K)))


def test_out_sharing_memory_with_x_is_rejected():
    x = torch.randn(T, H_IN)
    a = _args(x=x, lora_b=torch.randn(N, H_IN, R))
    with pytest.raises(ValueError, match=r"out must not share memory with x"):
        mo.routed_lora(*a.values(), out=x)


def _overlapping(like: torch.Tensor, out_shape, out_dtype, overlap_bytes: int):
    """(a copy of `like`, out) laid out in one byte buffer so that out begins `overlap_bytes` (rounded up to
    8) before the copy ends: they share memory in that range only."""
    n_in = like.numel() * like.element_size()
    n_out = torch.Size(out_shape).numel() * out_dtype.itemsize
    start = (n_in - overlap_bytes) // 8 * 8
    buf = torch.zeros(start + n_out + n_in, dtype=torch.uint8)
    out = buf[start : start + n_out].view(out_dtype).view(out_shape)
    out.copy_(torch.randn(out_shape))
    copy = buf[:n_in].view(like.dtype).view(like.shape)
    copy.copy_(like)  # written last: the shared bytes hold valid ids / weights
    return copy, out


ROUTED_INPUTS = ("x", "lora_a", "lora_b", "topk_ids", "topk_weights", "scaling")


@pytest.mark.parametrize("backend", ("torch", "triton", "cuda", "reference"))
@pytest.mark.parametrize("name", ROUTED_INPUTS)
def test_out_overlapping_any_input_is_rejected(backend, name):
    """Sharing even the last element with any input is refused, on every backend, before anything runs."""
    a = _args()
    a["scaling"] = torch.rand(N) + 0.5
    a[name], out = _overlapping(a[name], (T, H_OUT), torch.float32, overlap_bytes=4)
    fn = reference.routed_lora if backend == "reference" else functools.partial(mo.routed_lora, backend=backend)
    with pytest.raises(ValueError, match=rf"out must not share memory with {name}\b"):
        fn(a["x"], a["lora_a"], a["lora_b"], a["topk_ids"], a["topk_weights"], scaling=a["scaling"], out=out)


@pytest.mark.parametrize("backend", ("torch", "triton", "cuda", "reference"))
@pytest.mark.parametrize("name", ("h", "lora_b", "topk_ids"))
def test_expand_out_overlapping_any_input_is_rejected(backend, name):
    a = dict(h=torch.randn(T, K, R), lora_b=torch.randn(N, H_OUT, R), topk_ids=torch.randint(0, N, (T, K)))
    a[name], out = _overlapping(a[name], (T, H_OUT), torch.float32, overlap_bytes=4)
    fn = reference.lora_expand if backend == "reference" else functools.partial(mo.lora_expand, backend=backend)
    with pytest.raises(ValueError, match=rf"out must not share memory with {name}\b"):
        fn(a["h"], a["lora_b"], a["topk_ids"], out=out)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_out_in_disjoint_part_of_an_inputs_buffer_is_accepted(backend):
    """Overlap means shared bytes, not a shared allocation: x and out as interleaved column blocks of one
    buffer (their extents overlap, their elements do not), and out right after x's last byte."""
    a = _args()
    base = torch.randn(T, H_OUT)
    want = reference.routed_lora(*a.values(), out=base.clone())
    buf = torch.randn(T, H_IN + H_OUT + 1)
    x, out = buf[:, :H_IN], buf[:, H_IN + 1 :]
    x.copy_(a["x"])
    out.copy_(base)
    got = mo.routed_lora(x, *list(a.values())[1:], out=out, backend=backend)
    assert got is out
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    flat = torch.randn(T * H_IN + T * H_OUT)
    x, out = flat[: T * H_IN].view(T, H_IN), flat[T * H_IN :].view(T, H_OUT)
    x.copy_(a["x"])
    out.copy_(base)
    mo.routed_lora(x, *list(a.values())[1:], out=out, backend=backend)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ("torch", "triton", "cuda", "reference"))
@pytest.mark.parametrize(
    "make_out",
    (
        lambda: torch.randn(1, H_OUT).expand(T, H_OUT),  # stride 0 over rows
        lambda: torch.randn(T, 1).expand(T, H_OUT),  # stride 0 over columns
        lambda: torch.randn(T * H_OUT).as_strided((T, H_OUT), (5, 3)),  # 3 * 5 == 5 * 3: rows interleave
    ),
    ids=("expand-rows", "expand-cols", "as_strided-5-3"),
)
def test_out_with_internal_overlap_is_rejected(backend, make_out):
    fn = reference.routed_lora if backend == "reference" else functools.partial(mo.routed_lora, backend=backend)
    with pytest.raises(ValueError, match=r"out has internal overlap"):
        _call(fn, out=make_out())
    a = _args()
    exp = reference.lora_expand if backend == "reference" else functools.partial(mo.lora_expand, backend=backend)
    with pytest.raises(ValueError, match=r"out has internal overlap"):
        exp(torch.randn(T, K, R), a["lora_b"], a["topk_ids"], out=make_out())


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_out_with_interleaved_but_distinct_elements_is_accepted(backend):
    """Strides (5, 7) interleave the rows' extents but address 72 distinct elements (5 * di = 7 * dj has no
    solution with |di| < 6): a correct output, not an overlap."""
    out = torch.randn(200).as_strided((T, H_OUT), (5, 7))
    base = out.clone()
    a = _args()
    mo.routed_lora(*a.values(), out=out, backend=backend)
    torch.testing.assert_close(out, reference.routed_lora(*a.values(), out=base), atol=2e-5, rtol=2e-5)


def _byte_set(t: torch.Tensor) -> set:
    item = t.element_size()
    offsets = torch.zeros((), dtype=torch.long)
    for n, s in zip(t.shape, t.stride()):
        offsets = (offsets[..., None] + torch.arange(n) * s).reshape(-1)
    return {t.data_ptr() + int(o) * item + b for o in offsets.reshape(-1).tolist() for b in range(item)}


def test_overlap_checks_are_exact_against_brute_force():
    """_intersect and _has_internal_overlap against enumerated byte sets, over random strided views of one
    buffer: sizes 1 to 5 per dim, strides 0 to 9 (permuted, repeated), element sizes 2 and 4."""
    gen = torch.Generator().manual_seed(0)
    buf = torch.zeros(4096, dtype=torch.uint8)

    def rand_view():
        ndim = int(torch.randint(1, 4, (1,), generator=gen))
        dtype = (torch.float16, torch.float32)[int(torch.randint(0, 2, (1,), generator=gen))]
        sizes = torch.randint(1, 6, (ndim,), generator=gen).tolist()
        strides = torch.randint(0, 10, (ndim,), generator=gen).tolist()
        offset = int(torch.randint(0, 120, (1,), generator=gen))
        return buf.view(dtype).as_strided(sizes, strides, offset)

    seen = {True: 0, False: 0}
    for _ in range(3000):
        a, b = rand_view(), rand_view()
        want = bool(_byte_set(a) & _byte_set(b))
        assert _validation._intersect(_validation._memory_view(a), _validation._memory_view(b)) == want, (
            a.shape, a.stride(), a.storage_offset(), a.dtype, b.shape, b.stride(), b.storage_offset(), b.dtype
        )
        seen[want] += 1
        if a.dim() == 2:
            elems = len(_byte_set(a)) // a.element_size()
            assert _validation._has_internal_overlap(a) == (elems < a.numel()), (a.shape, a.stride())
    assert min(seen.values()) > 300, seen


def test_shrink_is_float32_even_with_float64_scaling():
    a = _args()
    h = mo.lora_shrink(a["x"], a["lora_a"], a["topk_ids"], a["topk_weights"], scaling=torch.rand(N, dtype=torch.float64))
    assert h.dtype == torch.float32

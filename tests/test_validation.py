"""Bad input gets a ValueError or TypeError that names the argument and what was expected."""

import pytest
import torch

import molora_ops as mo
from molora_ops import reference

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


def test_out_sharing_memory_with_x_is_rejected():
    x = torch.randn(T, H_IN)
    a = _args(x=x, lora_b=torch.randn(N, H_IN, R))
    with pytest.raises(ValueError, match=r"out must not share memory with x"):
        mo.routed_lora(*a.values(), out=x)


def test_shrink_is_float32_even_with_float64_scaling():
    a = _args()
    h = mo.lora_shrink(a["x"], a["lora_a"], a["topk_ids"], a["topk_weights"], scaling=torch.rand(N, dtype=torch.float64))
    assert h.dtype == torch.float32

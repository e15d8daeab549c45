"""The routing plan groups (token, slot) pairs by adapter, stably, with no host sync; the ops refuse a plan
that was not built from the topk_ids they are given, and a plan whose buffers do not fit its sizes."""

import dataclasses

import pytest
import torch

import molora_ops as mo
from molora_ops import reference


def test_segments_hold_exactly_each_adapters_pairs_in_order():
    ids = torch.tensor([[2, 0], [-1, 2], [0, 0], [3, -1], [2, 2]])
    plan = mo.build_plan(ids, 5)
    assert plan.seg_offsets.tolist() == [0, 3, 3, 7, 8, 8]
    assert plan.sorted_pairs.dtype == torch.int32 and plan.seg_offsets.dtype == torch.int32
    flat = ids.reshape(-1)
    for e in range(5):
        lo, hi = plan.seg_offsets[e], plan.seg_offsets[e + 1]
        pairs = plan.sorted_pairs[lo:hi].tolist()
        assert pairs == sorted(pairs), "segments must be stable (ascending pair index)"
        assert pairs == [p for p in range(flat.numel()) if flat[p] == e]
    assert sorted(plan.sorted_pairs[8:].tolist()) == [2, 7], "empty slots sort after every segment"
    assert plan.active_adapters() == [0, 2, 3]


def test_out_of_range_ids_belong_to_no_segment():
    ids = torch.tensor([[7, 1], [-5, 1]])
    plan = mo.build_plan(ids, 2)
    assert plan.seg_offsets.tolist() == [0, 0, 2]


def test_preallocated_plan_updates_in_place():
    plan = mo.RoutingPlan.empty(6, 2, 4)
    ptrs = (plan.sorted_pairs.data_ptr(), plan.seg_offsets.data_ptr())
    for _ in range(3):
        ids = torch.randint(-1, 4, (6, 2))
        plan.update_(ids)
        fresh = mo.build_plan(ids, 4)
        assert torch.equal(plan.sorted_pairs, fresh.sorted_pairs)
        assert torch.equal(plan.seg_offsets, fresh.seg_offsets)
    assert (plan.sorted_pairs.data_ptr(), plan.seg_offsets.data_ptr()) == ptrs


def test_zero_tokens_plan():
    plan = mo.build_plan(torch.zeros(0, 3, dtype=torch.long), 4)
    assert plan.sorted_pairs.numel() == 0 and plan.seg_offsets.tolist() == [0] * 5


# ------------------------------------------------------------------------------- plans are checked, not trusted
T, K, N, R, H_IN, H_OUT = 9, 2, 4, 8, 24, 20


def _problem():
    ids = torch.randint(-1, N, (T, K))
    return (torch.randn(T, H_IN), torch.randn(N, R, H_IN), torch.randn(N, H_OUT, R), ids, torch.rand(T, K) + 0.1)


def _backends():
    return [b for b in ("torch", "triton") if mo.backends()[b]["available"]]


def _all_ops(x, a, b, ids, w, plan, backend):
    """Run the three public ops with `plan` (each must raise before computing anything)."""
    h = torch.randn(T, K, R)
    for call in (
        lambda: mo.routed_lora(x, a, b, ids, w, plan=plan, backend=backend),
        lambda: mo.routed_lora(x, a, b, ids, w, out=torch.randn(T, H_OUT), plan=plan, backend=backend),
        lambda: mo.lora_shrink(x, a, ids, w, plan=plan, backend=backend),
        lambda: mo.lora_expand(h, b, ids, plan=plan, backend=backend),
    ):
        yield call


@pytest.mark.parametrize("backend", _backends())
def test_plan_built_for_other_ids_of_the_same_shape_is_refused(backend, monkeypatch):
    x, a, b, ids, w = _problem()
    other = torch.randint(-1, N, (T, K))
    plan = mo.build_plan(other, N)
    _refuse_kernels(monkeypatch, backend)
    for call in _all_ops(x, a, b, ids, w, plan, backend):
        with pytest.raises(ValueError, match=r"plan was built from another topk_ids tensor"):
            call()
    equal_values = other.clone()  # same values, other tensor: the plan cannot know, so it refuses too
    for call in _all_ops(x, a, b, equal_values, w, plan, backend):
        with pytest.raises(ValueError, match=r"plan was built from another topk_ids"):
            call()


@pytest.mark.parametrize("backend", _backends())
def test_empty_plan_never_updated_and_hand_built_plans_are_refused(backend, monkeypatch):
    x, a, b, ids, w = _problem()
    fresh = mo.build_plan(ids, N)
    plans = (
        mo.RoutingPlan.empty(T, K, N),
        mo.RoutingPlan(fresh.sorted_pairs.clone(), fresh.seg_offsets.clone(), T, K, N),
    )
    _refuse_kernels(monkeypatch, backend)
    for plan in plans:
        for call in _all_ops(x, a, b, ids, w, plan, backend):
            with pytest.raises(ValueError, match=r"plan has no live topk_ids it was built from"):
                call()


def _refuse_kernels(monkeypatch, backend):
    """Make the backend raise if any of its functions is reached."""
    from molora_ops import impl

    module = impl.get(backend)
    for fn in ("shrink", "expand", "routed_lora"):
        monkeypatch.setattr(module, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{backend}.{_fn} ran with a bad plan"))


@pytest.mark.parametrize("backend", _backends())
def test_ids_modified_in_place_make_the_plan_stale(backend):
    x, a, b, ids, w = _problem()
    plan = mo.build_plan(ids, N)
    got = mo.routed_lora(x, a, b, ids, w, plan=plan, backend=backend)
    torch.testing.assert_close(got, reference.routed_lora(x, a, b, ids, w), atol=2e-5, rtol=2e-5)
    ids[0, 0] = (int(ids[0, 0]) + 2) % N  # through a view: the version counter is shared
    for call in _all_ops(x, a, b, ids, w, plan, backend):
        with pytest.raises(ValueError, match=r"plan is stale: topk_ids was modified in place"):
            call()
    plan.update_(ids)
    got = mo.routed_lora(x, a, b, ids, w, plan=plan, backend=backend)
    torch.testing.assert_close(got, reference.routed_lora(x, a, b, ids, w), atol=2e-5, rtol=2e-5)


def test_a_view_of_the_same_ids_is_the_same_routing():
    x, a, b, ids, w = _problem()
    plan = mo.build_plan(ids.view(T, K), N)  # a temporary view: the plan follows the memory, not the object
    got = mo.routed_lora(x, a, b, ids, w, plan=plan, backend="torch")
    torch.testing.assert_close(got, reference.routed_lora(x, a, b, ids, w), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"another topk_ids"):  # same memory, other layout
        mo.routed_lora(x, a, b, ids.t().contiguous().t(), w, plan=plan, backend="torch")


def test_preallocated_plan_follows_its_static_ids_through_update():
    """The CUDA-graph pattern: static ids refilled in place, update_ before each step."""
    x, a, b, _, w = _problem()
    static_ids = torch.full((T, K), -1)
    plan = mo.RoutingPlan.empty(T, K, N)
    for step in range(3):
        static_ids.copy_(torch.randint(-1, N, (T, K)))
        if step == 1:
            with pytest.raises(ValueError, match=r"plan"):
                mo.routed_lora(x, a, b, static_ids, w, plan=plan, backend="torch")
        plan.update_(static_ids)
        got = mo.routed_lora(x, a, b, static_ids, w, plan=plan, backend="torch", validate=False)
        torch.testing.assert_close(got, reference.routed_lora(x, a, b, static_ids, w), atol=2e-5, rtol=2e-5)


def test_plan_to_another_device_records_the_moved_ids():
    x, a, b, ids, w = _problem()
    plan = mo.build_plan(ids, N)
    moved_ids = ids.clone()  # stands for ids.to(other_device)
    moved = plan.to("cpu", moved_ids)
    assert torch.equal(moved.sorted_pairs, plan.sorted_pairs) and moved.sorted_pairs is not plan.sorted_pairs
    got = mo.routed_lora(x, a, b, moved_ids, w, plan=moved, backend="torch")
    torch.testing.assert_close(got, reference.routed_lora(x, a, b, ids, w), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"another topk_ids"):
        mo.routed_lora(x, a, b, ids, w, plan=moved, backend="torch")
    with pytest.raises(ValueError, match=r"plan has no live topk_ids"):
        mo.RoutingPlan.empty(T, K, N).to("cpu", moved_ids)
    with pytest.raises(ValueError, match=r"topk_ids must have the plan's shape"):
        plan.to("cpu", moved_ids[:-1])


@pytest.mark.parametrize(
    "sorted_pairs,seg_offsets,exc,message",
    [
        (torch.arange(T * K + 5, dtype=torch.int32), torch.zeros(N + 1, dtype=torch.int32), ValueError,
         r"plan.sorted_pairs must have shape \(18,\)"),
        (torch.arange(T * K - 1, dtype=torch.int32), torch.zeros(N + 1, dtype=torch.int32), ValueError,
         r"plan.sorted_pairs must have shape \(18,\)"),
        (torch.arange(T * K, dtype=torch.int32), torch.zeros(N, dtype=torch.int32), ValueError,
         r"plan.seg_offsets must have shape \(5,\)"),
        (torch.arange(T * K), torch.zeros(N + 1, dtype=torch.int32), TypeError, r"plan.sorted_pairs must be int32"),
        (torch.arange(T * K, dtype=torch.int32), torch.zeros(N + 1), TypeError, r"plan.seg_offsets must be int32"),
        (torch.arange(T * K, dtype=torch.int32).view(T, K), torch.zeros(N + 1, dtype=torch.int32), ValueError,
         r"plan.sorted_pairs must have shape"),
        (torch.arange(T * K, dtype=torch.int32), torch.zeros(N + 1, dtype=torch.int32, device="meta"), ValueError,
         r"plan.seg_offsets is on meta but plan.sorted_pairs on cpu"),
        ([0] * (T * K), torch.zeros(N + 1, dtype=torch.int32), TypeError, r"plan.sorted_pairs must be a torch.Tensor"),
    ],
    ids=["pairs-too-long", "pairs-too-short", "offsets-too-short", "pairs-int64", "offsets-float", "pairs-2d",
         "mixed-devices", "pairs-list"],
)
def test_hand_built_plan_with_inconsistent_buffers_raises_at_construction(sorted_pairs, seg_offsets, exc, message):
    with pytest.raises(exc, match=message):
        mo.RoutingPlan(sorted_pairs, seg_offsets, T, K, N)


@pytest.mark.parametrize("backend", _backends())
def test_op_called_directly_with_inconsistent_plan_tensors_raises_before_the_kernel(backend, monkeypatch):
    """torch.ops.molora.* take raw plan tensors: a sorted_pairs longer than T * K made the Triton shrink read
    past x and topk_ids, a seg_offsets shorter than N + 1 was read past its end."""
    x, a, b, ids, w = _problem()
    scale = torch.ones(N)
    _refuse_kernels(monkeypatch, backend)
    ok_pairs, ok_offsets = mo.build_plan(ids, N).sorted_pairs, mo.build_plan(ids, N).seg_offsets
    long_pairs = torch.cat([ok_pairs, torch.arange(40, 60, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"plan.sorted_pairs must have shape \(18,\)"):
        torch.ops.molora.shrink(x, a, ids, w, scale, long_pairs, ok_offsets, backend)
    with pytest.raises(ValueError, match=r"plan.seg_offsets must have shape \(5,\)"):
        torch.ops.molora.shrink(x, a, ids, w, scale, ok_pairs, ok_offsets[:2], backend)


def test_plan_buffers_resized_after_construction_are_refused():
    x, a, b, ids, w = _problem()
    plan = mo.build_plan(ids, N)
    plan.seg_offsets.resize_(2)
    with pytest.raises(ValueError, match=r"plan.seg_offsets must have shape \(5,\)"):
        mo.routed_lora(x, a, b, ids, w, plan=plan, backend="torch")


def test_plan_fields_cannot_be_reassigned():
    plan = mo.build_plan(torch.zeros(T, K, dtype=torch.long), N)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.sorted_pairs = torch.arange(100, dtype=torch.int32)


def test_plan_checks_compile_without_graph_breaks():
    """A plan built eagerly and passed into a compiled function: the identity check is skipped while tracing,
    the buffer checks trace, and fullgraph=True holds."""
    x, a, b, ids, w = _problem()
    plan = mo.build_plan(ids, N)

    def f(x, ids, w, plan):
        return mo.routed_lora(x, a, b, ids, w, plan=plan, backend="torch", validate=False)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids, w, plan)
    torch.testing.assert_close(got, reference.routed_lora(x, a, b, ids, w), atol=2e-5, rtol=2e-5)

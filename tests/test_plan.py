"""The routing plan groups (token, slot) pairs by adapter, stably, with no host sync."""

import torch

import molora_ops as mo


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

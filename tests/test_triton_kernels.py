"""Kernel-level tests of the Triton backend: both routed_lora paths (fused and two-launch), split-K on and
off (and the atomic switch), out-of-range ids that must never be dereferenced, bitwise determinism, token
counts spanning many tiles, and strided / non-contiguous operands.

Every kernel test runs on two devices (DEVICES): CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets
it when there is no CUDA device; skipped when it is off, as on a CUDA machine), and CUDA tensors, marked gpu,
where the kernels are compiled and half-precision inputs take the bf16/fp16 tensor-core dots that the
interpreter replaces by fp32 ones. Sizes stay small for the interpreter. The parity grid over all backends
lives in test_parity.py.
"""

import pytest
import torch

import molora_ops as mo
from molora_ops import reference
from molora_ops.impl import triton_backend as tb
from molora_ops.kernels import configs

from _utils import assert_close, assert_parity, make_problem, naive_lowp

compiled, available, reason = tb.status()
pytestmark = pytest.mark.skipif(not available, reason=reason)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_OFF = ("CPU tensors run Triton kernels only under TRITON_INTERPRET=1 (tests/conftest.py sets it without "
                   "a CUDA device); the cuda variant of this test covers this machine")


def device_params(interpreting: bool) -> tuple:
    """The devices a kernel test runs on: "cpu" (the interpreter; skipped unless `interpreting`) and "cuda"
    (marked gpu, so it is skipped without a CUDA device and selected by `pytest -m gpu`)."""
    return (
        pytest.param("cpu", id="interp", marks=pytest.mark.skipif(not interpreting, reason=INTERPRETER_OFF)),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    )


DEVICES = device_params(tb.interpreting())


def device_dtypes(dtypes, cuda_only=()) -> list:
    """(device, dtype) params: `dtypes` on every device, `cuda_only` on CUDA alone (the interpreter's bf16
    tl.dot is wrong, DESIGN.md section 6)."""
    return [
        pytest.param(d.values[0], dt, marks=d.marks, id=f"{d.id}-{str(dt).replace('torch.', '')}")
        for d in DEVICES for dt in tuple(dtypes) + (tuple(cuda_only) if d.values[0] == "cuda" else ())
    ]

# The ways routed_lora can run: one fused launch (its H_in loop sequential, or software-pipelined over 3 stages:
# tl.range(num_stages=3), the decode path the GPU check compares with split-K), or shrink + one of the three
# expand kernels.
PATHS = (
    pytest.param(dict(fused=True), id="fused"),
    pytest.param(dict(fused=True, fused_stages=3), id="fused-pipelined"),
    pytest.param(dict(fused=False, expand="gather"), id="unfused-gather"),
    pytest.param(dict(fused=False, expand="dot"), id="unfused-dot"),
    pytest.param(dict(fused=False, expand="grouped"), id="unfused-grouped"),
)


def _run(p, path=None, *, split_k=None, out=None, validate=True, ids=None):
    ids = p.topk_ids if ids is None else ids
    with tb.override(split_k=split_k, **(path or {})):
        return mo.routed_lora(
            p.x, p.lora_a, p.lora_b, ids, p.topk_weights, scaling=p.scaling, out=out, backend="triton",
            validate=validate,
        )


def _shrink(p, *, split_k=None, atomic=False, ids=None, validate=True):
    ids = p.topk_ids if ids is None else ids
    with tb.override(split_k=split_k, atomic_split_k=atomic):
        return mo.lora_shrink(p.x, p.lora_a, ids, p.topk_weights, scaling=p.scaling, backend="triton", validate=validate)


def _exact_shrink(p, ids=None):
    d = torch.float64
    ids = p.topk_ids if ids is None else ids
    return reference.lora_shrink(p.x.to(d), p.lora_a.to(d), ids, p.topk_weights.to(d), scaling=p.scaling.to(d))


# --------------------------------------------------------------------------------------------- status
def test_status_and_interpreting_agree_with_environment():
    assert compiled and available
    assert tb.interpreting() == (__import__("os").environ.get("TRITON_INTERPRET") == "1")
    assert mo.backends()["triton"]["available"]


def test_import_without_triton_never_raises():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import molora_ops\n"
        "from molora_ops.impl import triton_backend as t\n"
        "compiled, available, reason = t.status()\n"
        "assert not compiled and not available and 'triton' in reason, reason\n"
        "assert molora_ops.backends()['triton']['available'] is False\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_float64_is_a_type_error():
    p = make_problem(3, 2, 3, 4, 16, 8, torch.float64)
    plan = mo.build_plan(p.topk_ids, 3)
    out = torch.empty(3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tb.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling, plan, out, False)


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 4, 16, 64, 64), (7, 4, 5, 7, 123, 77), (13, 3, 6, 8, 2049, 40)],
                         ids=lambda s: "T{}K{}N{}R{}_{}x{}".format(*s))
def test_fused_and_unfused_match_reference(path, dtype, shape, dev):
    p = make_problem(*shape, dtype, empty_frac=0.2, duplicate_frac=0.3, device=dev)
    got = _run(p, path)
    assert got.dtype == dtype
    assert_parity(got, p.exact(), naive_lowp(p), dtype)


@pytest.mark.parametrize("dev", DEVICES)
def test_heuristic_picks_fused_at_decode_and_two_launches_for_prefill(monkeypatch, dev):
    kernels = tb._kernels()
    calls = []
    for fn in ("launch_fused", "launch_shrink", "launch_expand", "launch_expand_dot", "launch_expand_grouped"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _real=real, _fn=fn, **kw: (calls.append(_fn), _real(*a, **kw))[1])

    decode = make_problem(2, 2, 4, 16, 64, 48, torch.float16, device=dev)
    assert tb.choose_fused(2, 2, 16, 64, 48)
    assert_parity(_run(decode), decode.exact(), naive_lowp(decode), torch.float16)
    assert calls == ["launch_fused"]

    calls.clear()
    prefill = make_problem(70, 2, 4, 16, 64, 48, torch.float16, device=dev)
    assert not tb.choose_fused(70, 2, 16, 64, 48)
    assert_parity(_run(prefill), prefill.exact(), naive_lowp(prefill), torch.float16)
    assert calls == ["launch_shrink", "launch_expand_dot"], "few adapters, fp16 prefill: tensor-core expand"
    assert not tb.choose_fused(1, 4, 64, 64, 48), "R * K too large for the fused path"
    assert tb.choose_expand(70, 2, 4, 16, torch.float32) == "gather", "fp32 dots are not on tensor cores"
    assert tb.choose_expand(70, 2, 64, 16, torch.bfloat16) == "grouped", "too many adapters per tile"
    assert tb.choose_expand(70, 2, 4, 64, torch.float16) == "grouped", "rank beyond the dot tile"
    calls.clear()
    many = make_problem(70, 2, 20, 16, 64, 48, torch.float16, device=dev)
    assert_parity(_run(many), many.exact(), naive_lowp(many), torch.float16)
    assert calls == ["launch_shrink", "launch_expand_grouped"], "many adapters, fp16 prefill: grouped expand"
    assert tb.choose_expand(8, 2, 4, 16, torch.bfloat16) == "gather", "decode"


def test_dot_expand_rank_bound_and_warps():
    """The tensor-core expand's tile holds the whole rank: 4 warps spilled from R = 32 and R = 64 still spilled
    with 8 (compile_check on sm_80 / sm_90), so R = 32 runs with 8 warps and larger ranks take the gather."""
    assert configs.DOT_EXPAND_MAX_RANK == 32
    for num_tokens in (64, 4096):
        assert configs.expand_variant(num_tokens, 2, 4, 32, True) == "dot"
        assert configs.expand_dot_config(num_tokens, 32, 4096).num_warps == 8
        assert configs.expand_dot_config(num_tokens, 16, 4096).num_warps == 4
        for rank in (33, 64, 128):
            assert configs.expand_variant(num_tokens, 2, 4, rank, True) == "grouped"
    with tb.override(expand="dot"):
        assert tb.choose_expand(4096, 2, 4, 32, torch.bfloat16) == "dot"
        assert tb.choose_expand(4096, 2, 4, 64, torch.bfloat16) == "gather", "forced dot falls back past the bound"


def test_dot_expand_adapter_bound_does_not_grow_with_top_k():
    """N bounds the distinct adapters per token tile (one pass of K h loads and two dots each): the per-slot
    allowance stops at DOT_EXPAND_MAX_ADAPTERS instead of growing with K."""
    cap = configs.DOT_EXPAND_MAX_ADAPTERS
    assert configs.expand_variant(4096, 1, 8, 16, True) == "dot"
    assert configs.expand_variant(4096, 1, 9, 16, True) == "grouped"
    for top_k in (2, 4, 8, 16):
        assert configs.expand_variant(4096, top_k, cap, 16, True) == "dot"
        assert configs.expand_variant(4096, top_k, cap + 1, 16, True) == "grouped"
    assert configs.expand_variant(4096, 8, 64, 16, True) == "grouped", "was 'dot' while the bound was 8 * K"
    assert configs.expand_variant(4096, 8, 64, 16, False) == "gather", "float32 weights stay off tensor cores"
    assert configs.expand_variant(63, 2, 64, 16, True) == "gather", "decode sizes"


# -------------------------------------------------------------------------------------------- split-K
@pytest.mark.parametrize("split_k", (1, 2, 5))
@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float32, torch.bfloat16), cuda_only=(torch.float16,)))
def test_shrink_split_k(split_k, dtype, dev):
    p = make_problem(9, 3, 4, 7, 1100, 8, dtype, empty_frac=0.25, duplicate_frac=0.3, device=dev)
    cfg = tb._shrink_config(27, 4, 7, 1100)
    if split_k > 1:
        assert cfg.with_split(split_k, 1100).SPLIT_K > 1
    h = _shrink(p, split_k=split_k)
    assert h.dtype == torch.float32 and h.shape == (9, 3, 7)
    assert_close(h, _exact_shrink(p), atol=1e-5, rtol=1e-5, name=f"h split_k={split_k}")
    assert bool((h[p.topk_ids < 0] == 0).all())
    # the routed result through the two-launch path with this split
    assert_parity(_run(p, dict(fused=False), split_k=split_k), p.exact(), naive_lowp(p), dtype)


def test_heuristic_splits_until_the_grid_fills_twice_the_sms():
    """split_k_for's rule: the fewest splits that give SPLIT_K_TARGET_CTAS (2 x 132 SMs) tile programs, capped
    by SPLIT_K_MAX and SPLIT_K_MIN_STEPS H_in steps per split; none once the tiles alone fill the target."""
    assert configs.SPLIT_K_TARGET_CTAS == 2 * 132
    assert configs.shrink_config(4, 8, 16, 4096).SPLIT_K == 8, "capped by 32 steps // 4"
    assert configs.shrink_config(8192, 8, 16, 4096).SPLIT_K == 3, "128 tiles -> 3 x 128 >= 264"
    assert configs.shrink_config(65536, 8, 16, 4096).SPLIT_K == 1
    assert configs.shrink_config(512, 8, 16, 64).SPLIT_K == 1, "a short H_in is not split"
    for num_pairs in (1, 64, 512, 2048, 8192, 20000):
        cfg = configs.shrink_config(num_pairs, 8, 16, 4096)
        tiles = configs.cdiv(num_pairs, cfg.BLOCK_M) * configs.cdiv(16, cfg.BLOCK_R)
        steps = configs.cdiv(4096, cfg.BLOCK_K)
        cap = min(configs.SPLIT_K_MAX, steps // configs.SPLIT_K_MIN_STEPS)
        assert tiles * cfg.SPLIT_K >= configs.SPLIT_K_TARGET_CTAS or cfg.SPLIT_K == cap
        assert cfg.SPLIT_K == 1 or tiles * (cfg.SPLIT_K - 1) < configs.SPLIT_K_TARGET_CTAS, "the fewest splits"
    for num_pairs in (1, 7, 64, 130, 5000):
        for h_in in (1, 16, 123, 2049, 4096, 8191):
            for rank in (1, 7, 16, 64, 70):
                cfg = configs.shrink_config(num_pairs, 4, rank, h_in)
                assert min(cfg.BLOCK_M, cfg.BLOCK_R, cfg.BLOCK_K) >= 16, "tl.dot needs tiles >= 16"
                per = cfg.k_per_split(h_in)
                assert per % cfg.BLOCK_K == 0 and per * cfg.SPLIT_K >= h_in
                assert per * (cfg.SPLIT_K - 1) < max(h_in, 1), "no split may be empty"


@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float32,), cuda_only=(torch.float16, torch.bfloat16)))
def test_atomic_split_k_switch_is_off_by_default_and_still_correct(dev, dtype):
    assert tb.settings.atomic_split_k is False or __import__("os").environ.get("MOLORA_TRITON_ATOMIC_SPLITK") == "1"
    p = make_problem(6, 2, 3, 8, 600, 8, dtype, empty_frac=0.3, device=dev)
    h = _shrink(p, split_k=4, atomic=True)
    assert_close(h, _exact_shrink(p), atol=1e-5, rtol=1e-5, name="h (atomic split-K)")
    assert bool((h[p.topk_ids < 0] == 0).all())


# --------------------------------------------------------------------------------- out-of-range ids
def _nan_fenced(p):
    """Copies of lora_a / lora_b living in the middle of NaN-filled buffers: reading adapter -1 or N (or
    any row outside the real weights) turns the result into NaN."""
    n = p.lora_a.shape[0]
    a = torch.full((n + 2,) + p.lora_a.shape[1:], float("nan"), dtype=p.lora_a.dtype, device=p.lora_a.device)
    b = torch.full((n + 2,) + p.lora_b.shape[1:], float("nan"), dtype=p.lora_b.dtype, device=p.lora_b.device)
    a[1 : n + 1] = p.lora_a
    b[1 : n + 1] = p.lora_b
    return a[1 : n + 1], b[1 : n + 1]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_ids_unvalidated_contribute_nothing(path, dev):
    p = make_problem(23, 3, 4, 8, 40, 24, torch.float32, device=dev)
    p.lora_a, p.lora_b = _nan_fenced(p)
    bad = p.topk_ids.clone()
    bad[::3, 0] = 4  # == N
    bad[1::4, 2] = 1_000_000
    bad[2::5, 1] = -7
    bad[5] = torch.tensor([-1, 4, 99], device=dev)  # a token with no valid slot at all
    cleaned = torch.where((bad >= 0) & (bad < 4), bad, torch.full_like(bad, -1))
    want = reference.routed_lora(p.x, p.lora_a, p.lora_b, cleaned, p.topk_weights, scaling=p.scaling)

    got = _run(p, path, ids=bad, validate=False)
    assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert bool((got[5] == 0).all())

    base = torch.randn(23, 24, device=dev)
    out = base.clone()
    _run(p, path, ids=bad, validate=False, out=out)
    assert_close(out, base + want, atol=3e-5, rtol=2e-5, name="out=")
    assert torch.equal(out[5], base[5])

    h = _shrink(p, split_k=3, ids=bad, validate=False)
    assert_close(h, _exact_shrink(p, cleaned), atol=1e-5, rtol=1e-5, name="h")
    assert bool((h[cleaned < 0] == 0).all())
    with tb.override(**path):
        y = mo.lora_expand(h, p.lora_b, bad, backend="triton", validate=False)
    assert_close(y, want, atol=2e-5, rtol=2e-5, name="expand")


def _listed_under_own_adapter(plan, ids):
    """ids with -1 wherever the plan does not list the pair in the segment of its own adapter."""
    n, num_pairs = plan.num_adapters, ids.numel()
    bounds = plan.seg_offsets.long().clamp(0, num_pairs)
    kept = torch.full((num_pairs,), -1, dtype=ids.dtype, device=ids.device)
    flat = ids.reshape(-1)
    for e in range(n):
        lo, hi = int(bounds[e]), max(int(bounds[e]), int(bounds[e + 1]))
        for pair in plan.sorted_pairs[lo:hi].tolist():
            if 0 <= pair < num_pairs and int(flat[pair]) == e:
                kept[pair] = e
    return kept.view_as(ids)


@pytest.mark.parametrize(
    "path,split_k,atomic",
    [(dict(expand="gather"), 1, False), (dict(expand="dot"), 1, False), (dict(expand="gather"), 3, False),
     (dict(expand="dot"), 3, True), (dict(expand="grouped"), 1, False)],
    ids=["gather", "dot", "gather-splitk3", "dot-splitk3-atomic", "grouped"],
)
@pytest.mark.parametrize("dev", DEVICES)
def test_stale_or_inconsistent_plan_never_reads_uninitialised_memory(monkeypatch, path, split_k, atomic, dev):
    """The public ops refuse these plans (tests/test_plan.py); the backend, called directly, must still be
    safe: a pair counts only when the plan lists it in its own adapter's segment, every other pair is an empty
    slot. Every torch.empty here starts as NaN, so a row of h (or of the split-K partials) that the shrink
    never wrote would poison the output."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    T, K, N = 23, 3, 4
    p = make_problem(T, K, N, 8, 300, 24, torch.float32, empty_frac=0.1, duplicate_frac=0.2, device=dev)
    other = p.topk_ids.clone()
    other[::2] = torch.randint(-1, N, (12, K), dtype=other.dtype, device=dev)
    plans = {
        "empty, never updated": mo.RoutingPlan.empty(T, K, N, device=dev),
        "built for other ids": mo.build_plan(other, N),
        "offsets out of range": mo.RoutingPlan(
            torch.randperm(T * K, dtype=torch.int32, device=dev),
            torch.tensor([-3, 10, 10, 40, T * K + 7], dtype=torch.int32, device=dev),
            T, K, N,
        ),
    }
    for name, plan in plans.items():
        kept = _listed_under_own_adapter(plan, p.topk_ids)
        assert bool((kept >= 0).any()) or name.startswith("empty")
        want = reference.routed_lora(p.x, p.lora_a, p.lora_b, kept, p.topk_weights, scaling=p.scaling)
        with pytest.raises(ValueError, match=r"^plan "):
            mo.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, backend="triton", plan=plan)
        got = torch.empty(T, 24, device=dev)
        with tb.override(fused=False, split_k=split_k, atomic_split_k=atomic, **path):
            tb.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling, plan, got, False)
            h = tb.shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, p.scaling, plan)
        assert not got.isnan().any() and not h.isnan().any(), name
        assert_close(got, want, atol=2e-5, rtol=2e-5, name=name)
        assert_close(h, _exact_shrink(p, kept), atol=1e-5, rtol=1e-5, name=f"h, {name}")


def _poison(p):
    """A NaN in lora_a of adapter 0, a NaN and an Inf in lora_b of adapters 2 and 3 (in place)."""
    p.lora_a[0, 1, 5] = float("nan")
    p.lora_b[2, 3, 1] = float("nan")
    p.lora_b[3, 0, 0] = float("inf")


def _assert_isolated(got, exact, lowp, dtype):
    """Non-finite exactly where the exact answer is (the tokens routed to a poisoned adapter), and within the
    dtype's tolerance everywhere else. `lowp` is plain PyTorch on the unpoisoned inputs (the error yardstick)."""
    finite = exact.isfinite()
    assert torch.equal(got.isfinite(), finite), f"{int((got.isfinite() != finite).sum())} elements differ in finiteness"
    rows = finite.all(dim=1)
    assert 0 < int(rows.sum()) < rows.numel()
    assert_parity(got[rows], exact[rows], lowp[rows], dtype, name="tokens not routed to a poisoned adapter")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float32, torch.float16), cuda_only=(torch.bfloat16,)))
def test_non_finite_adapter_reaches_only_its_tokens(path, dtype, dev):
    """A NaN or Inf in one adapter's weights affects the tokens routed to it and no other: the dot expand
    multiplies lora_b[e] by h = 0 in the tile's other rows, and 0 * NaN is NaN (it turned every token of the
    16-token tile non-finite). 70 tokens: several tiles, mixed adapters in each. bf16 runs on GPU only
    (DESIGN.md section 6)."""
    p = make_problem(70, 2, 5, 8, 40, 24, dtype, empty_frac=0.1, duplicate_frac=0.2, device=dev)
    lowp = naive_lowp(p)
    _poison(p)
    _assert_isolated(_run(p, path), p.exact(), lowp, dtype)
    base = torch.randn(70, 24, device=dev).to(dtype)
    out = base.clone()
    _run(p, path, out=out)
    _assert_isolated(out, p.exact() + base.double(), lowp + base, dtype)


@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float16,), cuda_only=(torch.bfloat16,)))
def test_non_finite_adapter_in_half_hi_lo_dot_expand(dev, dtype):
    """The GPU form of the tensor-core expand (half-precision hi + lo halves of h), run directly: the same
    isolation."""
    from molora_ops.kernels import routed_lora as kernels

    p = make_problem(70, 2, 5, 16, 64, 48, dtype, empty_frac=0.1, duplicate_frac=0.2, device=dev)
    h = _exact_shrink(p).float()
    lowp = reference.lora_expand(h, p.lora_b, p.topk_ids)
    _poison(p)
    exact = reference.lora_expand(h.double(), p.lora_b.double(), p.topk_ids)
    out = torch.full((70, 48), float("nan"), dtype=dtype, device=dev)
    cfg = configs.expand_dot_config(70, 16, 48)
    kernels.launch_expand_dot(h, p.lora_b, p.topk_ids, out, cfg=cfg, accumulate=False, upcast=False)
    _assert_isolated(out, exact, lowp, dtype)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("split_k", (1, 3))
def test_non_finite_weight_in_empty_slot_adds_nothing(path, split_k, dev):
    """An empty slot adds nothing, whatever its weight holds (NaN, Inf): in h, in the split-K reduction and in
    every routed_lora path."""
    p = make_problem(70, 3, 5, 8, 300, 24, torch.float32, empty_frac=0.3, device=dev)
    p.topk_ids[0] = -1
    exact, lowp = p.exact(), naive_lowp(p)
    want_h = _exact_shrink(p)
    empty = p.topk_ids < 0
    p.topk_weights[empty] = float("nan")
    p.topk_weights[empty & (torch.rand(empty.shape, device=dev) < 0.5)] = float("inf")
    h = _shrink(p, split_k=split_k)
    assert bool((h[empty] == 0).all())
    assert_close(h, want_h, atol=1e-5, rtol=1e-5, name="h")
    assert_parity(_run(p, path, split_k=split_k), exact, lowp, torch.float32)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_every_output_element_is_written(path, dev):
    """accumulate=False must overwrite out completely, including tokens whose slots are all empty."""
    p = make_problem(19, 2, 3, 8, 32, 37, torch.float16, empty_frac=0.5, device=dev)
    p.topk_ids[:4] = -1
    plan = mo.build_plan(p.topk_ids, 3)
    out = torch.full((19, 37), float("nan"), dtype=torch.float16, device=dev)
    with tb.override(**path):
        tb.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling.float(), plan, out, False)
    assert not out.isnan().any()
    assert bool((out[:4] == 0).all())
    assert_parity(out, p.exact(), naive_lowp(p), torch.float16)

    h = torch.full((19, 2, 8), float("nan"), device=dev)
    h[p.topk_ids >= 0] = 0.5  # NaN rows sit exactly in the empty slots: they must never be read
    out.fill_(float("nan"))
    with tb.override(**path):
        tb.expand(h, p.lora_b, p.topk_ids, plan, out, False)
    assert not out.isnan().any() and bool((out[:4] == 0).all())


@pytest.mark.parametrize("dev", DEVICES)
def test_zero_tokens_launch_nothing_and_leave_out_alone(dev):
    p = make_problem(0, 2, 3, 8, 32, 16, torch.float32, device=dev)
    plan = mo.build_plan(p.topk_ids, 3)
    assert tb.shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, p.scaling, plan).shape == (0, 2, 8)
    out = torch.empty(0, 16, device=dev)
    for path in PATHS:
        with tb.override(**path.values[0]):
            tb.routed_lora(p.x, p.lora_a, p.lora_b, p.topk_ids, p.topk_weights, p.scaling, plan, out, True)
            tb.expand(torch.empty(0, 2, 8, device=dev), p.lora_b, p.topk_ids, plan, out, False)


# -------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(
    "path,split_k",
    [(dict(fused=True), None), (dict(fused=False, expand="gather"), 1), (dict(fused=False, expand="dot"), 4),
     (dict(fused=False, expand="grouped"), 2)],
    ids=["fused", "unfused-gather", "unfused-dot-splitk4", "unfused-grouped-splitk2"],
)
@pytest.mark.parametrize("dev", DEVICES)
def test_bitwise_deterministic(path, split_k, dev):
    p = make_problem(21, 3, 5, 16, 260, 40, torch.bfloat16, pattern="skewed", empty_frac=0.1, duplicate_frac=0.3,
                     device=dev)
    first = _run(p, path, split_k=split_k)
    second = _run(p, path, split_k=split_k)
    assert torch.equal(first, second)
    h1, h2 = _shrink(p, split_k=split_k), _shrink(p, split_k=split_k)
    assert torch.equal(h1, h2)


# -------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("dev", DEVICES)
def test_many_tiles_per_segment(dev):
    """A hot adapter whose segment spans dozens of BLOCK_M tiles, and tokens spanning many expand tiles."""
    p = make_problem(611, 2, 3, 8, 40, 48, torch.float16, pattern="skewed", empty_frac=0.05, duplicate_frac=0.1,
                     device=dev)
    cfg = configs.shrink_config(611 * 2, 3, 8, 40)
    assert configs.cdiv(611 * 2, cfg.BLOCK_M) >= 20
    assert configs.cdiv(611, configs.expand_config(611, 8, 48).BLOCK_M) >= 20
    for expand in ("gather", "dot", "grouped"):
        got = _run(p, dict(fused=False, expand=expand))
        assert_parity(got, p.exact(), naive_lowp(p), torch.float16, name=expand)


@pytest.mark.parametrize("dev", DEVICES)
def test_rank_spanning_several_tiles(dev):
    """R = 70 > BLOCK_R: several rank tiles in shrink, several R steps in expand, and a fused tile of 128."""
    p = make_problem(11, 2, 3, 70, 48, 33, torch.float32, empty_frac=0.2, device=dev)
    assert configs.shrink_config(22, 3, 70, 48).BLOCK_R < 70
    for path in PATHS:
        assert_parity(_run(p, path.values[0]), p.exact(), naive_lowp(p), torch.float32, name=path.id)


# --------------------------------------------------------------------------------------------- strides
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_and_strided_operands(path, dev):
    p = make_problem(21, 2, 4, 8, 64, 40, torch.float32, empty_frac=0.15, duplicate_frac=0.2, device=dev)
    x = torch.empty(64, 21, device=dev).t()  # column-major
    x.copy_(p.x)
    a = torch.empty(4, 64, 8, device=dev).transpose(1, 2)  # H_in fastest stride is not 1
    a.copy_(p.lora_a)
    b = torch.empty(4, 40, 16, device=dev)[:, :, ::2]  # stride 2 along R
    b.copy_(p.lora_b)
    ids = torch.empty(2, 21, dtype=torch.int32, device=dev).t()
    ids.copy_(p.topk_ids)
    w = p.topk_weights.double().t().contiguous().t()  # float64 weights, column-major
    assert not any(t.is_contiguous() for t in (x, a, b, ids, w))
    base = torch.randn(40, 21, device=dev).t()  # out is column-major too
    out = base.clone()
    with tb.override(**path):
        mo.routed_lora(x, a, b, ids, w, scaling=p.scaling, out=out, backend="triton")
    assert_parity(out, base.double() + p.exact(), base + naive_lowp(p), torch.float32)

    h = _shrink(p, split_k=2)
    h_nc = torch.empty(8, 2, 21, device=dev).permute(2, 1, 0)
    h_nc.copy_(h)
    with tb.override(**path):
        y = mo.lora_expand(h_nc, b, ids, backend="triton")
    assert_close(y, mo.lora_expand(h, p.lora_b, p.topk_ids, backend="torch"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float16,), cuda_only=(torch.bfloat16,)))
def test_dot_expand_hi_lo_split_on_half_weights(dev, dtype):
    """The GPU form of the tensor-core expand (h fed to half-precision dots as hi + lo halves), run directly.
    bf16 on GPU only: the interpreter's bf16 tl.dot is wrong (DESIGN.md section 6)."""
    from molora_ops.kernels import routed_lora as kernels

    p = make_problem(70, 2, 4, 16, 64, 48, dtype, empty_frac=0.1, duplicate_frac=0.2, device=dev)
    h = _exact_shrink(p).float()
    exact = reference.lora_expand(h.double(), p.lora_b.double(), p.topk_ids)
    out = torch.full((70, 48), float("nan"), dtype=dtype, device=dev)
    cfg = configs.expand_dot_config(70, 16, 48)
    kernels.launch_expand_dot(h, p.lora_b, p.topk_ids, out, cfg=cfg, accumulate=False, upcast=False)
    assert_parity(out, exact, reference.lora_expand(h, p.lora_b, p.topk_ids), dtype)


@pytest.mark.parametrize("dev", DEVICES)
def test_dot_expand_fp16_hi_lo_split_with_h_beyond_fp16_range(dev):
    """h is float32 and may exceed fp16's range (65504): the hi half is clamped to it and the lo half carries
    the rest, so the fp16 dots stay finite (an unclamped hi half was inf, and inf + (-inf) gave NaN)."""
    from molora_ops.kernels import routed_lora as kernels

    from _utils import TOLERANCE

    ids = torch.randint(0, 4, (70, 2))
    ids[::5, 1] = ids[::5, 0]  # duplicate slots: their h rows are summed before the split
    ids[3::11, 1] = -1
    lora_b = (torch.randn(4, 48, 16) * 0.01).half()
    h = torch.randn(70, 2, 16) * 1e3
    h[::7, 0, ::3] = 1.0e5  # beyond 65504, below 2 * 65504 even with the duplicate slot added
    h[1::9, 0, 1::4] = -8.0e4
    exact = reference.lora_expand(h.double(), lora_b.double(), ids)
    assert exact.abs().max() < 6e4, "the answer itself fits in fp16"
    ids, lora_b, h = ids.to(dev), lora_b.to(dev), h.to(dev)
    out = torch.full((70, 48), float("nan"), dtype=torch.float16, device=dev)
    cfg = configs.expand_dot_config(70, 16, 48)
    kernels.launch_expand_dot(h, lora_b, ids, out, cfg=cfg, accumulate=False, upcast=False)
    assert bool(out.isfinite().all())
    assert_close(out, exact, **TOLERANCE[torch.float16], name="out (|h| > 65504)")


@pytest.mark.parametrize("dev", DEVICES)
def test_flat_segment_tiles_with_many_adapters(dev):
    """The shrink numbers the tiles of all segments back to back and scans the plan's offsets in chunks of
    SCAN_BLOCK adapters: N = 300 spans two chunks, with a hot adapter spanning several tiles, adapters on
    both sides of the chunk boundary, and most adapters empty."""
    assert configs.scan_block(300) < 300
    p = make_problem(45, 2, 300, 8, 24, 16, torch.float32, device=dev)
    hot = torch.tensor([0, 255, 256, 299, 7], device=dev)
    p.topk_ids = hot[torch.randint(0, 5, (45, 2), device=dev)]
    p.topk_ids[torch.rand(45, device=dev) < 0.5, 0] = 0
    p.topk_ids[3, 1] = -1
    for split_k in (1, 2):
        h = _shrink(p, split_k=split_k)
        assert_close(h, _exact_shrink(p), atol=1e-5, rtol=1e-5, name=f"h split_k={split_k}")
    assert_parity(_run(p, dict(fused=False, expand="gather")), p.exact(), naive_lowp(p), torch.float32)


def test_device_params_skip_the_interpreter_cases_when_it_is_off():
    """What a CUDA machine collects (its conftest leaves TRITON_INTERPRET unset): the interpreter cases skip
    with a reason and the cuda cases carry the gpu mark; here (no CUDA) the interpreter cases run."""
    for interpreting in (False, True):
        cpu, cuda = device_params(interpreting)
        (skipif,) = cpu.marks
        assert skipif.name == "skipif" and skipif.args == (not interpreting,)
        assert "TRITON_INTERPRET" in skipif.kwargs["reason"]
        assert [m.name for m in cuda.marks] == ["gpu"] and cuda.values == ("cuda",)
    assert DEVICES[0].marks[0].args == (not tb.interpreting(),)
    cases = device_dtypes((torch.float16,), cuda_only=(torch.bfloat16,))
    assert [c.id for c in cases] == ["interp-float16", "cuda-float16", "cuda-bfloat16"]
    assert all(m.name == "gpu" for c in cases[1:] for m in c.marks)


# ------------------------------------------------------------------------------------- grouped expand
GROUPED_TOKENS = (0, 1, 3, 7, 64, 133)


def _grouped_problem(num_tokens, dtype, dev):
    """N = 9 adapters of which only 0, 2, 5 and 8 get tokens (the rest have none), -1 slots, duplicate ids
    in a token's top-k, odd R, H_out not a multiple of any tile."""
    p = make_problem(num_tokens, 3, 9, 7, 40, 300, dtype, empty_frac=0.2, duplicate_frac=0.3, device=dev)
    used = torch.tensor([0, 2, 5, 8], dtype=p.topk_ids.dtype, device=dev)
    p.topk_ids = torch.where(p.topk_ids >= 0, used[p.topk_ids.clamp(min=0) % 4], p.topk_ids)
    return p


@pytest.mark.parametrize("num_tokens", GROUPED_TOKENS)
@pytest.mark.parametrize("dev,dtype", device_dtypes((torch.float32, torch.float16), cuda_only=(torch.bfloat16,)))
def test_grouped_expand_matches_reference(num_tokens, dev, dtype, monkeypatch):
    """The adapter-grouped expand, forced, over column chunks (the partial workspace bound lowered so that
    H_out = 300 takes three chunks, the last one ragged): out poisoned with NaN before the kernels write,
    overwritten (accumulate=False) and added into (accumulate=True); and routed_lora through it."""
    from molora_ops.kernels import routed_lora as kernels

    monkeypatch.setattr(configs, "GROUPED_EXPAND_PARTIAL_BYTES", 1)  # one BLOCK_N per chunk
    p = _grouped_problem(num_tokens, dtype, dev)
    if num_tokens >= 3:
        p.topk_ids[2] = -1  # a token with every slot empty
    plan = mo.build_plan(p.topk_ids, 9)
    h = _exact_shrink(p).float()
    exact = reference.lora_expand(h.double(), p.lora_b.double(), p.topk_ids)
    lowp = reference.lora_expand(h, p.lora_b, p.topk_ids)
    cfg = configs.expand_grouped_config(num_tokens * 3, 7, 300)
    assert cfg.CHUNK_N < 300
    upcasts = (True,) if dev == "cpu" and dtype == torch.bfloat16 else (True, False)
    for upcast in upcasts if dtype != torch.float32 else (True,):
        out = torch.full((num_tokens, 300), float("nan"), dtype=dtype, device=dev)
        if num_tokens:
            kernels.launch_expand_grouped(h, p.lora_b, p.topk_ids, plan.sorted_pairs, plan.seg_offsets, out, cfg=cfg,
                                          accumulate=False, upcast=upcast)
        assert_parity(out, exact, lowp, dtype, name=f"grouped expand, upcast={upcast}")
        if num_tokens >= 3:
            assert bool((out[2] == 0).all())
    base = torch.randn(num_tokens, 300, device=dev).to(dtype)
    out = base.clone()
    with tb.override(expand="grouped"):
        tb.expand(h, p.lora_b, p.topk_ids, plan, out, True)
        assert_parity(out, exact + base.double(), lowp + base, dtype, name="grouped expand, accumulate")
        assert_parity(_run(p, dict(fused=False)), p.exact(), naive_lowp(p), dtype, name="routed_lora, grouped")


@pytest.mark.parametrize("dev", DEVICES)
def test_grouped_expand_launches_depend_on_shapes_only(dev, monkeypatch):
    """Kernels, grids and chunk count of the grouped expand are the same for one active token, all tokens
    active and nothing routed (no routing value sizes a grid), and each result equals the reference."""
    from molora_ops.kernels import routed_lora as kernels

    monkeypatch.setattr(configs, "GROUPED_EXPAND_PARTIAL_BYTES", 1)  # one BLOCK_N per chunk
    launches = []
    for name in ("_expand_grouped_kernel", "_expand_reduce_kernel"):
        kernel = getattr(kernels, name)

        class Rec:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                launches.append((_name, tuple(grid)))
                return _kernel[grid]

        monkeypatch.setattr(kernels, name, Rec())
    p = _grouped_problem(19, torch.float16, dev)
    seen = []
    for active in (1, 19, 0):
        ids = p.topk_ids.clone()
        ids[active:] = -1
        plan = mo.build_plan(ids, 9)
        h = _exact_shrink(p, ids).float()
        out = torch.full((19, 300), float("nan"), dtype=torch.float16, device=dev)
        launches.clear()
        with tb.override(expand="grouped"):
            tb.expand(h, p.lora_b, ids, plan, out, False)
        seen.append(list(launches))
        assert_close(out, reference.lora_expand(h.double(), p.lora_b.double(), ids), atol=2e-3, rtol=2e-3)
    assert len(seen[0]) >= 4, "several column chunks, two launches each"
    assert seen[0] == seen[1] == seen[2]


def test_grouped_expand_config_bounds_the_workspace():
    """CHUNK_N is a multiple of BLOCK_N, covers at most H_out rounded up, and keeps the [P, CHUNK_N] float32
    workspace within GROUPED_EXPAND_PARTIAL_BYTES unless one BLOCK_N alone exceeds it."""
    for num_pairs in (1, 130, 8192, 65536):
        for h_out in (1, 77, 4096, 14336):
            for rank in (1, 16, 64, 128):
                cfg = configs.expand_grouped_config(num_pairs, rank, h_out)
                assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_R) >= 16, "tl.dot needs tiles >= 16"
                assert cfg.CHUNK_N % cfg.BLOCK_N == 0
                assert cfg.CHUNK_N < h_out + cfg.BLOCK_N
                ws = 4 * num_pairs * cfg.CHUNK_N
                assert ws <= configs.GROUPED_EXPAND_PARTIAL_BYTES or cfg.CHUNK_N == cfg.BLOCK_N


def test_fused_pipeline_depth_config():
    """fused_config's num_stages: FUSED_NUM_STAGES by default, a forced depth kept while the H_in loop has that
    many steps (clamped to the step count, never below 1), and a clear error for a depth below 1."""
    assert configs.fused_config(1, 16, 4096, 4096).num_stages == configs.FUSED_NUM_STAGES
    cfg = configs.fused_config(1, 16, 4096, 4096, num_stages=3)
    assert cfg.num_stages == 3 and cfg.BLOCK_K * 3 <= 4096
    assert configs.fused_config(1, 16, 16, 64, num_stages=4).num_stages == 1  # one H_in step
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        configs.fused_config(1, 16, 64, 64, num_stages=0)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("num_tokens", (1, 8))
def test_pipelined_fused_matches_split_k_and_reference(dev, num_tokens):
    """The decode comparison the GPU check times: the pipelined fused launch against the two-launch split-K path
    at T = 1 and 8, both against the exact answer (several H_in steps, so the pipeline has work in flight)."""
    torch.manual_seed(23)
    p = make_problem(num_tokens, 2, 5, 16, 300, 40, torch.float32, pattern="zipf", empty_frac=0.2).to(dev)
    pipelined = _run(p, dict(fused=True, fused_stages=3))
    split = _run(p, dict(fused=False, expand="gather"), split_k=4)
    assert_parity(pipelined, p.exact(), naive_lowp(p), torch.float32, name="fused pipelined")
    assert_parity(split, p.exact(), naive_lowp(p), torch.float32, name="split-K")

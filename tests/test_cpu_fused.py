"""The C++ CPU kernels of the runtime's fused strategy (csrc/cpu/routed_lora_cpu.cpp, molora_ops/impl/cpu_fused.py)
against molora_ops.reference: prefill-sized routings at odd sizes, several thread counts, mixed ranks with NaN in
the padding, sibling rank slices, inference mode, poisoned outputs, determinism, and clear errors for bad indices.
The small-shape grid of tests/test_runtime.py runs the same strategy through RoutedBatch("grouped")."""

import os

import pytest
import torch

from molora_ops import reference, runtime
from molora_ops.impl import cpu_fused
from molora_ops.runtime import RoutedBatch

from _utils import TOLERANCE, assert_close, assert_parity, make_problem, naive_lowp

REQUIRED = "cpu_fused" in os.environ.get("MOLORA_REQUIRE_BACKENDS", "").split(",")
pytestmark = pytest.mark.skipif(not (cpu_fused.available() or REQUIRED),
                                reason=f"C++ CPU kernels not available: {cpu_fused.status()[1]}")
# (T, K, N, R, H_in, H_out): prefill sizes with odd widths, a K of 3, T not a multiple of the expand block.
SHAPES = ((1000, 2, 8, 16, 67, 45), (513, 3, 5, 7, 130, 257), (300, 1, 4, 5, 33, 1), (1, 2, 3, 4, 9, 5),
          (0, 2, 3, 4, 9, 5))


def test_loaded():
    """CI names cpu_fused in MOLORA_REQUIRE_BACKENDS, so a build that stopped producing the library fails here."""
    assert cpu_fused.available(), cpu_fused.status()[1]


@pytest.fixture(params=(1, 2, 3), ids=lambda n: f"threads{n}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _problem(shape, dtype):
    """make_problem with empty slots, duplicate adapters in a token's slots and an adapter (N - 1) with no tokens."""
    p = make_problem(*shape, dtype, empty_frac=0.2, duplicate_frac=0.3)
    p.topk_ids[p.topk_ids == shape[2] - 1] = shape[2] - 2
    return p


def _fused_batch(p) -> RoutedBatch:
    batch = RoutedBatch.build(p.topk_ids, p.topk_weights, p.lora_a.shape[0], backend="torch")._with_strategy("grouped")
    cd = torch.float64 if p.x.dtype == torch.float64 else torch.float32
    assert isinstance(batch._strategy(cd), cpu_fused.FusedPairs), "per-token routing without runs must take the kernels"
    return batch


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}K{}N{}R{}_{}x{}".format(*s))
def test_add_and_split_match_reference(shape, dtype, threads):
    p = _problem(shape, dtype)
    base = torch.randn(shape[0], shape[5]).to(dtype)
    batch = _fused_batch(p)
    with torch.no_grad():
        got = batch.add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling)
        split = batch.expand_(batch.shrink(p.x, p.lora_a), p.lora_b, base.clone(), scale=p.scaling)
    exact = base.double() + p.exact()
    if dtype == torch.float64:
        assert_close(got, exact, atol=1e-12, rtol=1e-12)
        assert_close(split, exact, atol=1e-12, rtol=1e-12)
    else:
        assert_parity(got, exact, base + naive_lowp(p), dtype)
        assert_parity(split, exact, base + naive_lowp(p), dtype, name="shrink + expand_")


def test_sibling_rank_slices_and_mixed_ranks(threads):
    """One shrink over [A | A2] (A2 zero beyond each adapter's rank, as patching stores it); member 2 expands columns
    [R, R + 6) with ranks 6/0/3/6 inside its slice, its B holding NaN beyond each adapter's rank (never read)."""
    p = _problem((700, 2, 4, 8, 37, 29), torch.float32)
    n = 4
    ranks2 = torch.tensor([6, 0, 3, 6], dtype=torch.int32)
    a2, b2 = torch.randn(n, 6, 37) / 6, torch.randn(n, 19, 6) / 3
    for e, r in enumerate(ranks2.tolist()):
        a2[e, r:], b2[e, :, r:] = float("nan"), float("nan")
    scale2 = torch.rand(n) + 0.5
    batch = _fused_batch(p)
    out2 = torch.randn(700, 19)
    with torch.no_grad():
        h = batch.shrink(p.x, torch.cat([p.lora_a, torch.nan_to_num(a2, nan=0.0)], dim=1))
        got1 = batch.expand_(h, p.lora_b, torch.zeros(700, 29), rank_slice=slice(0, 8), scale=p.scaling)
        got2 = batch.expand_(h, b2, out2.clone(), rank_slice=(8, 14), scale=scale2, ranks=ranks2)
    assert_close(got1, p.exact(), **TOLERANCE[torch.float32], name="member 1")
    a2_zero, b2_zero = torch.nan_to_num(a2, nan=0.0).double(), torch.nan_to_num(b2, nan=0.0).double()
    want2 = reference.routed_lora(p.x.double(), a2_zero, b2_zero,
                                  p.topk_ids, p.topk_weights.double(), scaling=scale2.double(), ranks=ranks2)
    assert_close(got2, out2.double() + want2, **TOLERANCE[torch.float32], name="member 2")


def test_bounded_add_reads_no_padding():
    """add_ with ranks: A and B hold NaN beyond each adapter's rank (a zero-rank adapter is routed to)."""
    p = _problem((400, 2, 5, 8, 23, 17), torch.float32)
    ranks = torch.tensor([8, 1, 0, 5, 3], dtype=torch.int32)
    a, b = p.lora_a.clone(), p.lora_b.clone()
    for e, r in enumerate(ranks.tolist()):
        a[e, r:], b[e, :, r:] = float("nan"), float("nan")
    base = torch.randn(400, 17)
    with torch.no_grad():
        got = _fused_batch(p).add_(p.x, a, b, base.clone(), scale=p.scaling, ranks=ranks)
    want = reference.routed_lora(p.x.double(), p.lora_a.double(), p.lora_b.double(), p.topk_ids,
                                 p.topk_weights.double(), scaling=p.scaling.double(), ranks=ranks)
    assert_close(got, base.double() + want, **TOLERANCE[torch.float32])


def test_inference_mode_and_poisoned_u(monkeypatch):
    """Worker threads do not inherit inference mode: the kernels must not touch inference tensors there. With
    MOLORA_POISON_OUTPUTS=1 the shrink's u starts as NaN, so an element it failed to write would show."""
    monkeypatch.setenv("MOLORA_POISON_OUTPUTS", "1")
    p = _problem((600, 2, 6, 8, 41, 27), torch.float32)
    base = torch.randn(600, 27)
    with torch.inference_mode():
        got = _fused_batch(p).add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling)
    assert_close(got, base.double() + p.exact(), **TOLERANCE[torch.float32])


def test_non_finite_values_stay_with_their_tokens():
    """NaN in the x row of a token whose slots are all empty, in an empty slot's weight, and in the A and B of an
    adapter only some tokens use: every token that does not route to that adapter is exact."""
    p = _problem((500, 2, 5, 4, 19, 23), torch.float32)
    p.topk_ids[7] = -1
    p.x[7] = float("nan")
    p.topk_ids[9, 1] = -1
    p.topk_weights[9, 1] = float("nan")
    p.lora_a[1, 2, 3], p.lora_b[1, 4, 0] = float("nan"), float("inf")
    uses = (p.topk_ids == 1).any(1)
    base = torch.randn(500, 23)
    with torch.no_grad():
        got = _fused_batch(p).add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling)
    clean = p.lora_a.clone(), p.lora_b.clone()
    clean[0][1], clean[1][1] = 0, 0
    want = reference.routed_lora(p.x.nan_to_num(0.0), clean[0], clean[1], p.topk_ids, p.topk_weights.nan_to_num(0.0),
                                 scaling=p.scaling, out=base.clone())
    assert torch.isfinite(got[~uses]).all()
    assert_close(got[~uses], want[~uses], **TOLERANCE[torch.float32])


def test_deterministic_run_to_run():
    p = _problem((1000, 2, 8, 16, 64, 48), torch.float32)
    batch = _fused_batch(p)
    base = torch.randn(1000, 48)
    with torch.no_grad():
        first = batch.add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling)
        assert all(torch.equal(first, batch.add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling))
                   for _ in range(3))


def test_expand_blocks_rule():
    """Two work items per thread at least, between 32 and 256 tokens each."""
    assert cpu_fused._expand_block(1024, 2) == 256 and cpu_fused._expand_block(1024, 8) == 64
    assert cpu_fused._expand_block(40, 2) == 32 and cpu_fused._expand_block(100000, 1) == 256


def _op_args(num_tokens=6, pairs=5):
    x = torch.randn(num_tokens, 8)
    a = torch.randn(3, 4, 8)
    tokens = torch.tensor([0, 2, 5, 1, 3], dtype=torch.long)[:pairs]
    offsets = torch.tensor([0, 2, 2, pairs], dtype=torch.long)
    return x, a, tokens, offsets, torch.rand(pairs)


@pytest.mark.parametrize("bad, message", (
    ("token", "tokens\\[2\\] = 6 is outside \\[0, 6\\)"),
    ("offsets", "offsets must be non-decreasing"),
    ("offsets_end", "offsets must run from 0 to at most 5"),
    ("dtype", "lora_a must be Float"),
    ("coef", "coef must be \\[5\\]"),
    ("ranks", "ranks\\[1\\] = 5 is outside \\[0, 4\\]"),
))
def test_shrink_rejects_bad_arguments(bad, message):
    x, a, tokens, offsets, coef = _op_args()
    ranks = None
    if bad == "token":
        tokens[2] = 6
    elif bad == "offsets":
        offsets[1] = 3
    elif bad == "offsets_end":
        offsets[3] = 6
    elif bad == "dtype":
        a = a.double()
    elif bad == "coef":
        coef = coef[:4]
    elif bad == "ranks":
        ranks = torch.tensor([4, 5, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.molora_cpu.shrink(x, a, tokens, offsets, coef, ranks)


@pytest.mark.parametrize("bad, message", (
    ("order", "order\\[1\\] = 9 is outside \\[0, 5\\)"),
    ("token", "tokens\\[4\\] = -1 is outside \\[0, 6\\)"),
    ("slice", "rank_start 2 \\+ R_i 4 exceeds u's 4 columns"),
    ("blocks", "block_offsets must be \\[blocks \\* 3 \\+ 1\\]"),
    ("out", "out must be \\[T, H_out\\] with unit stride"),
))
def test_expand_rejects_bad_arguments(bad, message):
    x, a, tokens, offsets, coef = _op_args()
    u = torch.ops.molora_cpu.shrink(x, a, tokens, offsets, coef, None)
    b, out = torch.randn(3, 7, 4), torch.zeros(6, 7)
    order, etok, boff, start = torch.arange(5), tokens.clone(), offsets.clone(), 0
    if bad == "order":
        order[1] = 9
    elif bad == "token":
        etok[4] = -1
    elif bad == "slice":
        start = 2
    elif bad == "blocks":
        boff = torch.tensor([0, 2, 5], dtype=torch.long)
    elif bad == "out":
        out = torch.zeros(7, 6).t()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.molora_cpu.expand_(out, u, start, b, order, etok, boff, None, None)


def test_runtime_falls_back_without_the_kernels(monkeypatch):
    """With the kernels off (a build without them), grouped takes its pure-PyTorch layouts and agrees."""
    p = _problem((300, 2, 6, 8, 21, 13), torch.float32)
    base = torch.randn(300, 13)
    monkeypatch.setattr(runtime, "_FUSED", False)
    batch = RoutedBatch.build(p.topk_ids, p.topk_weights, 6, backend="torch")._with_strategy("grouped")
    assert not isinstance(batch._strategy(torch.float32), cpu_fused.FusedPairs)
    with torch.no_grad():
        got = batch.add_(p.x, p.lora_a, p.lora_b, base.clone(), scale=p.scaling)
    assert_close(got, base.double() + p.exact(), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("min_run", (1, 3, 10**9))
@pytest.mark.parametrize("case", ("per_token", "per_sequence", "empty_and_bad_ids", "no_tokens"))
def test_prepare_matches_the_python_plan(case, min_run):
    """prepare's plan order, expand order and token_runs against the pure-PyTorch construction (build_plan, then
    (adapter, slot, token) order and runs of consecutive tokens); ids outside [0, N) count as empty slots; the
    arrays have T * K entries whatever the routing, zero beyond the routed pairs."""
    n, k = 6, 2
    if case == "per_token":
        ids = torch.randint(0, n, (301, k))
    elif case == "per_sequence":  # runs of consecutive tokens, one adapter pair per sequence of 50
        ids = torch.randint(0, n, (6, 1, k)).expand(6, 50, k).reshape(300, k).clone()
    elif case == "empty_and_bad_ids":
        ids = torch.randint(-1, n + 2, (77, k)).int()
    else:
        ids = torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(ids.shape, dtype=torch.float64)
    fused = cpu_fused.prepare(ids, w, n, 2)
    runs = cpu_fused.token_runs(fused, min_run)
    valid = (ids >= 0) & (ids < n)
    plan_ids = torch.where(valid, ids.long(), -1)
    offsets = [0] + torch.bincount(plan_ids[valid], minlength=n).cumsum(0).tolist()
    num_pairs, slots = offsets[-1], ids.numel()
    pairs = runtime._slot_major(RoutedBatch.build(plan_ids, w, n, backend="torch").plan.sorted_pairs[:num_pairs].long(),
                                plan_ids, k)
    for name in ("tokens", "coef", "order", "etokens"):
        t = getattr(fused, name)
        assert t.shape == (slots,) and not t[num_pairs:].any(), name
    assert fused.offsets.tolist() == offsets
    assert torch.equal(fused.tokens[:num_pairs], pairs // k)
    assert torch.equal(fused.coef[:num_pairs], w.reshape(-1)[pairs])
    assert runs == runtime._token_runs(pairs // k, offsets, min_run)
    block = cpu_fused._expand_block(ids.shape[0], 2)
    adapter = torch.repeat_interleave(torch.arange(n), torch.tensor(offsets).diff())
    key = (pairs // k // block) * n + adapter
    assert torch.equal(fused.order[:num_pairs], torch.argsort(key, stable=True))
    assert torch.equal(fused.etokens[:num_pairs], (pairs // k)[fused.order[:num_pairs]])
    blocks = max(1, -(-ids.shape[0] // block))
    assert fused.block_offsets.tolist() == [0] + torch.bincount(key, minlength=blocks * n).cumsum(0).tolist()


def _reference_autograd(leaves, topk_ids, grad_out, dtype):
    """(y, dx, dA, dB, dw, ds) of the reference routed_lora by autograd in `dtype` on copies of leaves (x, lora_a,
    lora_b, topk_weights, scale)."""
    ref = [t.detach().to(dtype).requires_grad_() for t in leaves]
    y = reference.routed_lora(*ref[:3], topk_ids, ref[3], scaling=ref[4])
    return (y,) + torch.autograd.grad(y, ref, grad_out.to(dtype))


def _assert_like_reference(got, leaves, topk_ids, grad_out, dtype):
    """got = (y, dx, dA, dB, dw, ds) against float64 autograd of the reference: to 1e-10 for float64 (dw excepted:
    topk_weights stays float32, so its gradient does), else by the flash-attention rule against the same computed
    by plain float32 autograd."""
    exact = _reference_autograd(leaves, topk_ids, grad_out, torch.float64)
    lowp = _reference_autograd(leaves, topk_ids, grad_out, torch.float32)
    for g, w, low, name in zip(got, exact, lowp, ("y", "x", "lora_a", "lora_b", "topk_weights", "scale")):
        if dtype == torch.float64 and name != "topk_weights":
            assert_close(g, w, atol=1e-10, rtol=1e-10, name=name)
        else:
            assert_parity(g, w, low, torch.float32, name=name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_training_forward_and_backward_at_prefill_sizes(dtype, threads):
    """routed_lora_train and its backward through the kernels (impl/cpu_train.py) where adapters hold several
    shrink chunks of rows (> 128) and the weight gradients several column chunks (> 256), against float64 autograd
    of the reference; empty slots, a duplicate adapter and an unused adapter included."""
    from molora_ops.impl import cpu_train

    assert cpu_train.usable(torch.zeros(1))
    p = _problem((700, 2, 4, 8, 300, 513), dtype)
    p.topk_ids[0, 1] = p.topk_ids[0, 0]
    scale = p.scaling.to(dtype if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, scale)]
    out, u = torch.ops.molora.routed_lora_train(*leaves[:3], p.topk_ids, leaves[3], leaves[4], None, None, "torch",
                                                None)
    grad_out = torch.randn(700, 513, dtype=dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    ones = torch.ones_like(p.topk_weights).double()
    want_u = reference.lora_shrink(p.x.double(), p.lora_a.double(), p.topk_ids, ones)
    _assert_like_reference((out,) + got, leaves, p.topk_ids, grad_out, dtype)
    assert_close(u, want_u, **(dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else TOLERANCE[torch.float32]),
                 name="u")
    assert bool((got[1][-1] == 0).all() and (got[2][-1] == 0).all()), "the unused adapter gets zero gradients"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_split_shrink_and_expand_ops_at_prefill_sizes(dtype, threads):
    """The shrink and expand ops (a patched model's sibling groups under autograd) and their backwards through the
    kernels at sizes with several row and column chunks, against float64 autograd of the reference."""
    p = _problem((600, 2, 4, 8, 300, 290), dtype)
    scale = p.scaling.to(dtype if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b, p.topk_weights, scale)]
    h = torch.ops.molora.shrink(leaves[0], leaves[1], p.topk_ids, leaves[3], leaves[4], None, None, "torch", None)
    y = torch.ops.molora.expand(h, leaves[2], p.topk_ids, None, None, "torch", None, None)
    grad_out = torch.randn(600, 290, dtype=dtype)
    _assert_like_reference((y,) + torch.autograd.grad(y, leaves, grad_out), leaves, p.topk_ids, grad_out, dtype)


def test_status_without_the_library(monkeypatch):
    """A build without the extension (MOLORA_SKIP_CPU_BUILD=1, no compiler): status says why, and the runtime and
    the torch backend take their pure-PyTorch code (their tests run that code with the kernels switched off)."""
    saved = dict(cpu_fused._state)
    try:
        cpu_fused._state.clear()
        monkeypatch.setattr(cpu_fused, "library_path", lambda: None)
        monkeypatch.setenv("MOLORA_SKIP_CPU_BUILD", "1")
        assert cpu_fused.status() == (False, "not built: MOLORA_SKIP_CPU_BUILD=1")
        assert not runtime._kernels_on()
        cpu_fused._state.clear()
        monkeypatch.setenv("MOLORA_DISABLE_CPU_KERNELS", "1")
        assert cpu_fused.status() == (False, "disabled by MOLORA_DISABLE_CPU_KERNELS")
    finally:
        cpu_fused._state.clear()
        cpu_fused._state.update(saved)
    assert cpu_fused.available()

"""Heterogeneous ranks (issue 11 item 4): the optional `ranks` [N] int32 of the op contract.

Adapters are stored zero-padded to R; adapter e's rows/columns r >= ranks[e] must be neither read nor computed.
The key check fills that padding with NaN (and, for the expand, h beyond each adapter's rank too): a path that
reads any of it returns NaN for the tokens routed there. Every backend runs it: torch, Triton (interpreter on
CPU, compiled on CUDA with the gpu mark), CUDA on a GPU (gpu mark; on CPU the kernels run the same check in the
host emulation, tests/test_cuda_backend.py::test_kernels_under_host_emulation, mixed-rank cases).
"""

import pytest
import torch

import molora_ops as mo
from molora_ops import reference
from molora_ops.impl import triton_backend as tb
from molora_ops.runtime import RoutedBatch

from _utils import assert_close, assert_parity

RANKS = (1, 8, 16, 64, 0)  # R = 64; adapter 4 has rank 0 and is routed to
R = 64
TRITON_PATHS = [
    pytest.param(dict(fused=True), id="fused"),
    pytest.param(dict(fused=True, fused_stages=2), id="fused-pipelined"),
    pytest.param(dict(fused=False, expand="gather"), id="gather"),
    pytest.param(dict(fused=False, expand="dot"), id="dot"),
    pytest.param(dict(fused=False, expand="grouped"), id="grouped"),
    pytest.param(dict(fused=False, expand="gather", split_k=3), id="splitk"),
    pytest.param(dict(fused=False, expand="gather", split_k=2, atomic_split_k=True), id="splitk-atomic"),
]


def _ranked(num_tokens, top_k=3, h_in=40, h_out=24, ranks=RANKS, rank=R, dtype=torch.float32, device="cpu",
            seed=0, padding=float("nan")):
    """A routed problem with per-adapter ranks: (args dict with NaN (or `padding`) in the weights' padding,
    the same weights with zero padding, ranks tensor). Ids include -1 slots, a duplicate within a token and the
    zero-rank adapter (routed to); adapter 2 gets no tokens."""
    g = torch.Generator().manual_seed(seed)
    n = len(ranks)
    a = torch.randn(n, rank, h_in, generator=g) / h_in**0.5
    b = torch.randn(n, h_out, rank, generator=g) / rank**0.5
    for e, r in enumerate(ranks):
        a[e, r:] = 0
        b[e, :, r:] = 0
    ids = torch.randint(-1, n, (num_tokens, top_k), generator=g)
    if num_tokens:
        ids[0, 0] = n - 1  # the zero-rank adapter is routed to
        if top_k > 1:
            ids[0, 1] = ids[0, 0]  # a duplicate within a token
        ids[ids == 2] = 3  # adapter 2 has no tokens
    w = torch.rand(num_tokens, top_k, generator=g)
    x = torch.randn(num_tokens, h_in, generator=g)
    scaling = torch.rand(n, generator=g) + 0.5
    zero = dict(x=x, lora_a=a, lora_b=b, topk_ids=ids, topk_weights=w, scaling=scaling)
    zero = {k: (v.to(dtype) if v.is_floating_point() and k in ("x", "lora_a", "lora_b") else v).to(device)
            for k, v in zero.items()}
    poisoned = dict(zero)
    pa, pb = zero["lora_a"].clone(), zero["lora_b"].clone()
    for e, r in enumerate(ranks):
        pa[e, r:] = padding
        pb[e, :, r:] = padding
    poisoned.update(lora_a=pa, lora_b=pb)
    return poisoned, zero, torch.tensor(ranks, dtype=torch.int32, device=device)


def _routed(p, ranks, **kw):
    return mo.routed_lora(p["x"], p["lora_a"], p["lora_b"], p["topk_ids"], p["topk_weights"], scaling=p["scaling"],
                          ranks=ranks, **kw)


def _exact(zero, ranks=None):
    """float64 answer on the zero-padded weights (the padded computation)."""
    d = {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in zero.items()}
    return reference.routed_lora(d["x"], d["lora_a"], d["lora_b"], d["topk_ids"], d["topk_weights"],
                                 scaling=d["scaling"], ranks=None if ranks is None else ranks.cpu())


def _lowp(zero):
    return reference.routed_lora(zero["x"], zero["lora_a"], zero["lora_b"], zero["topk_ids"], zero["topk_weights"],
                                 scaling=zero["scaling"])


def _nan_poisoned_h(h, ids, ranks):
    """h with NaN in every element the bounded expand must not read (r >= ranks[e] of routed slots)."""
    ids = ids.long()
    valid = ids >= 0
    bound = torch.where(valid, ranks.long()[torch.where(valid, ids, 0)], h.shape[2])
    pad = torch.arange(h.shape[2], device=h.device) >= bound.unsqueeze(2)
    return h.masked_fill(pad, float("nan"))


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("num_tokens", (0, 1, 7))
def test_reference_with_ranks_equals_padded_computation(num_tokens):
    poisoned, zero, ranks = _ranked(num_tokens)
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in zero.items()}
    padded = reference.routed_lora(d["x"], d["lora_a"], d["lora_b"], d["topk_ids"], d["topk_weights"],
                                   scaling=d["scaling"])
    assert_close(_exact(zero, ranks), padded, atol=1e-12, rtol=0, name="ranked vs padded")
    # the oracle never reads the padding: NaN there changes nothing
    got = reference.routed_lora(poisoned["x"], poisoned["lora_a"], poisoned["lora_b"], poisoned["topk_ids"],
                                poisoned["topk_weights"], scaling=poisoned["scaling"], ranks=ranks)
    assert torch.equal(got, reference.routed_lora(zero["x"], zero["lora_a"], zero["lora_b"], zero["topk_ids"],
                                                  zero["topk_weights"], scaling=zero["scaling"], ranks=ranks))
    h = reference.lora_shrink(zero["x"], zero["lora_a"], zero["topk_ids"], zero["topk_weights"], ranks=ranks)
    for t in range(num_tokens):
        for k in range(zero["topk_ids"].shape[1]):
            e = int(zero["topk_ids"][t, k])
            if e >= 0:
                assert (h[t, k, RANKS[e]:] == 0).all()


# ----------------------------------------------------------------------------------------- backends (CPU)
def _backend_params():
    interp = tb.interpreting()
    skip = pytest.mark.skipif(not interp, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
    return [pytest.param("torch", None, id="torch")] + [
        pytest.param("triton", p.values[0], id=f"triton-{p.id}", marks=skip) for p in TRITON_PATHS
    ]


@pytest.mark.parametrize("backend,path", _backend_params())
@pytest.mark.parametrize("num_tokens", (0, 1, 7))
def test_nan_padding_is_never_read(backend, path, num_tokens):
    """The key test: NaN in every padding element (A rows, B columns, and h beyond the rank for the expand) must
    leave routed_lora, lora_shrink and lora_expand equal to the zero-padded answer."""
    poisoned, zero, ranks = _ranked(num_tokens)
    exact = _exact(zero)
    with tb.override(**(path or {})):
        out = _routed(poisoned, ranks, backend=backend)
        assert_parity(out, exact, _lowp(zero), torch.float32, name=f"{backend} routed_lora")
        h = mo.lora_shrink(poisoned["x"], poisoned["lora_a"], poisoned["topk_ids"], poisoned["topk_weights"],
                           scaling=poisoned["scaling"], ranks=ranks, backend=backend)
        h_ref = reference.lora_shrink(zero["x"].double(), zero["lora_a"].double(), zero["topk_ids"],
                                      zero["topk_weights"].double(), scaling=zero["scaling"].double(), ranks=ranks)
        assert_close(h, h_ref, atol=2e-5, rtol=2e-5, name=f"{backend} h")
        y = mo.lora_expand(_nan_poisoned_h(h, zero["topk_ids"], ranks), poisoned["lora_b"], zero["topk_ids"],
                           ranks=ranks, backend=backend)
        assert_parity(y, exact, _lowp(zero), torch.float32, name=f"{backend} expand")


@pytest.mark.parametrize("backend,path", _backend_params())
def test_out_accumulates_and_ranks_none_is_unbounded(backend, path):
    _, zero, ranks = _ranked(5, top_k=2, seed=3)
    base = torch.randn(5, 24)
    with tb.override(**(path or {})):
        out = _routed(zero, ranks, out=base.clone(), backend=backend)
        padded = _routed(zero, None, backend=backend)
    assert_close(out, base + padded, atol=3e-5, rtol=3e-5, name="accumulate")


def test_half_precision_torch_backend():
    for dtype in (torch.float16, torch.bfloat16):
        poisoned, zero, ranks = _ranked(6, dtype=dtype, seed=5)
        out = _routed(poisoned, ranks, backend="torch")
        assert_parity(out, _exact(zero), _lowp(zero), dtype, name=str(dtype))


def test_rank_bound_really_bounds_torch_flops(monkeypatch):
    """The torch backend multiplies only [M, r_e] slices: count the inner dimensions of its matmuls."""
    from molora_ops.impl import torch_grouped

    _, zero, ranks = _ranked(9, seed=7)
    widths = []
    real_shrink = torch_grouped._shrink_segment

    def spy(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r):
        widths.append((e, r))
        return real_shrink(x, lora_a, topk_weights, scale, e, pairs, tokens, cd, r)

    monkeypatch.setattr(torch_grouped, "_shrink_segment", spy)
    _routed(zero, ranks, backend="torch")
    assert widths and all(r == RANKS[e] and r > 0 for e, r in widths), widths


def test_float64_gradcheck_with_ranks():
    _, zero, ranks = _ranked(4, top_k=2, h_in=6, h_out=5, ranks=(1, 3, 4, 0), rank=4, seed=11)
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in zero.items()}
    # non-zero padding: the bounded forward ignores it, so its gradient must be zero
    a, b = d["lora_a"].clone(), d["lora_b"].clone()
    a[1, 3:] = 0.7
    b[0, :, 1:] = -0.3
    leaves = [t.clone().requires_grad_() for t in (d["x"], a, b, d["topk_weights"], d["scaling"])]

    def routed(x, la, lb, w, s):
        return mo.routed_lora(x, la, lb, d["topk_ids"], w, scaling=s, ranks=ranks, backend="torch")

    def shrink(x, la, w, s):
        return mo.lora_shrink(x, la, d["topk_ids"], w, scaling=s, ranks=ranks, backend="torch")

    def expand(h, lb):
        return mo.lora_expand(h, lb, d["topk_ids"], ranks=ranks, backend="torch")

    assert torch.autograd.gradcheck(routed, leaves)
    assert torch.autograd.gradcheck(shrink, [leaves[0], leaves[1], leaves[3], leaves[4]])
    h = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(expand, [h, leaves[2]])


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", (mo.routed_lora, reference.routed_lora), ids=("ops", "reference"))
@pytest.mark.parametrize("bad,exc,message", [
    (torch.tensor([1, 8, 16, 64, 0]), TypeError, r"ranks must be an int32 tensor, got torch.int64"),
    ([1, 8, 16, 64, 0], TypeError, r"ranks must be None or an int32 \[N\] tensor"),
    (torch.tensor([1, 8, 16, 64], dtype=torch.int32), ValueError, r"ranks must have shape \[N\] = \(5,\)"),
    (torch.tensor([1, 8, 16, 65, 0], dtype=torch.int32), ValueError, r"ranks must lie in \[0, R\] = \[0, 64\]"),
    (torch.tensor([1, -1, 16, 64, 0], dtype=torch.int32), ValueError, r"ranks must lie in \[0, R\]"),
    (torch.tensor([[1, 8, 16, 64, 0]], dtype=torch.int32), ValueError, r"ranks must have shape \[N\]"),
])
def test_bad_ranks_name_the_argument(fn, bad, exc, message):
    _, zero, _ = _ranked(3)
    with pytest.raises(exc, match=message):
        fn(zero["x"], zero["lora_a"], zero["lora_b"], zero["topk_ids"], zero["topk_weights"], ranks=bad)


def test_bad_ranks_in_shrink_and_expand():
    _, zero, ranks = _ranked(3)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, R\]"):
        mo.lora_shrink(zero["x"], zero["lora_a"], zero["topk_ids"], zero["topk_weights"], ranks=ranks + 100)
    h = torch.zeros(3, 3, R)
    with pytest.raises(TypeError, match=r"ranks must be an int32"):
        mo.lora_expand(h, zero["lora_b"], zero["topk_ids"], ranks=ranks.float())
    # validate=False skips the value check (a host sync on GPU), never the metadata checks
    mo.lora_expand(h, zero["lora_b"], zero["topk_ids"], ranks=ranks, validate=False)


# ----------------------------------------------------------------------------------------------- runtime
@pytest.mark.parametrize("strategy", ("per_adapter", "grouped", "dense", "ops"))
def test_runtime_strategies_with_ranks(strategy):
    _, zero, ranks = _ranked(7 if strategy != "per_adapter" else 1, top_k=2, seed=13)
    batch = RoutedBatch.build(zero["topk_ids"], zero["topk_weights"], len(RANKS), backend="torch")
    batch = batch._with_strategy(strategy)
    out = torch.zeros(zero["x"].shape[0], 24)
    batch.add_(zero["x"], zero["lora_a"], zero["lora_b"], out, scale=zero["scaling"], ranks=ranks)
    assert_parity(out, _exact(zero), _lowp(zero), torch.float32, name=f"add_ {strategy}")
    out2 = torch.zeros_like(out)
    h = batch.shrink(zero["x"], zero["lora_a"], ranks=ranks)
    batch.expand_(h, zero["lora_b"], out2, scale=zero["scaling"], ranks=ranks)
    assert_parity(out2, _exact(zero), _lowp(zero), torch.float32, name=f"shrink/expand_ {strategy}")


def test_runtime_bounded_strategies_skip_padding():
    """per_adapter and grouped cut each adapter's views to its rank: NaN padding stays out."""
    for num_tokens, strategy in ((1, "per_adapter"), (9, "grouped")):
        poisoned, zero, ranks = _ranked(num_tokens, top_k=2, seed=17)
        batch = RoutedBatch.build(zero["topk_ids"], zero["topk_weights"], len(RANKS), backend="torch")
        batch = batch._with_strategy(strategy)
        out = torch.zeros(num_tokens, 24)
        batch.add_(poisoned["x"], poisoned["lora_a"], poisoned["lora_b"], out, scale=zero["scaling"], ranks=ranks)
        assert_parity(out, _exact(zero), _lowp(zero), torch.float32, name=strategy)


# ------------------------------------------------------------------------------------------- patched model
@torch.no_grad()
def test_patched_model_with_mixed_peft_ranks_matches_peft(tmp_path_factory, monkeypatch):
    """PEFT adapters of ranks 4, 8 (2 by rank_pattern) and 6 (and 0 where an adapter skips a module): the
    patch passes each module's ranks and the result equals PEFT's mixed batch."""
    from _hf import assert_logits_close, shared_setup

    setup = shared_setup("llama", tmp_path_factory)
    seen = []
    real_add = RoutedBatch.add_

    def spy(self, *args, ranks=None, **kw):
        seen.append(None if ranks is None else ranks.tolist())
        return real_add(self, *args, ranks=ranks, **kw)

    monkeypatch.setattr(RoutedBatch, "add_", spy)
    names = ["code", "math", "qa"]
    ref = setup.pm(setup.ids, adapter_names=names).logits
    model = setup.patched()
    with mo.routing(model, adapter_names=names):
        out = model(setup.ids).logits
    assert_logits_close(out, ref)
    assert any(s is not None and len(set(s)) > 1 for s in seen), seen
    bounds = {n: m._buffers["molora_ranks"] for n, m in model.named_modules() if "molora_ranks" in m._buffers}
    assert bounds and all(b.dtype == torch.int32 and len(set(b.tolist())) > 1 for b in bounds.values()), bounds
    assert "molora_ranks" not in model.state_dict() and not any(k.endswith("molora_ranks") for k in model.state_dict())
    mo.unpatch(model)
    assert not any("molora_ranks" in m._buffers for m in model.modules())


# ----------------------------------------------------------------------------------------------- on a GPU
def _gpu_backends():
    return [pytest.param("cuda", None, id="cuda"), pytest.param("torch", None, id="torch")] + [
        pytest.param("triton", p.values[0], id=f"triton-{p.id}") for p in TRITON_PATHS
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend,path", _gpu_backends())
@pytest.mark.parametrize("num_tokens", (1, 8, 133))
def test_gpu_nan_padding_is_never_read(backend, path, num_tokens, dtype):
    compiled, available, reason = mo.impl._status(backend) if backend != "torch" else (True, True, "")
    if not available:
        pytest.skip(reason)
    poisoned, zero, ranks = _ranked(num_tokens, h_in=136, h_out=72, dtype=dtype, device="cuda", seed=19)
    with tb.override(**(path or {})):
        out = _routed(poisoned, ranks, backend=backend)
    assert_parity(out, _exact(zero), _lowp(zero), dtype, name=f"{backend} {dtype}")

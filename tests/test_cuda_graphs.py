"""CUDA-graph readiness: capture once, write new routing into the static buffers, replay, compare.

GPU (marker ``gpu``; skipped without CUDA):
  * ops: routed_lora (out= and functional) and lora_shrink + lora_expand, backends triton and cuda, fp16 and
    bf16, each kernel path, with a RoutingPlan.empty refilled by update_ (captured in the graph, or called
    before each replay). Replays route differently from the capture: -1 slots, duplicate ids in a token's
    top-k, an adapter without tokens, NaN weights in padded rows, and a different number of active rows:
    captured with one active row and replayed with all of them, and the reverse (SGLang #28371).
  * RoutedBatch built inside the capture from static top-k buffers: a sibling group's shared shrink with
    per-member rank slices and scales (expand_), and add_.
  * a patched tiny Llama with StaticCache: one decode step captured under ``mo.routing(model,
    adapter_weights=W)`` replays after ``W.copy_(W2)`` like the eager step under W2 and like PEFT (forward
    hooks); an eager decode step makes no host sync from molora_ops code; our kernel launches per layer are
    counted with torch.profiler.
CPU (runs everywhere; the triton backend under TRITON_INTERPRET=1): what a captured graph relies on. The
launch code of the triton backend, the cuda backend's Python launchers and a RoutedBatch read no tensor value
on the host (the CPU stand-in for a sync: under capture it would raise), and issue the same kernels with the
same grids and scalar arguments for any routing of one shape, which is why a replay with new routing runs the
right work. And the patched model's decode step compiled with fullgraph=True (torch backend) follows
W.copy_(W2) without a recompile, the analogue of the captured step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import re
import traceback
import warnings

import pytest
import torch

import molora_ops as mo
from molora_ops import reference
from molora_ops.impl import cuda_backend
from molora_ops.impl import triton_backend as tb
from molora_ops.runtime import RoutedBatch

from _utils import assert_close, assert_parity

GPU = torch.device("cuda")
HALF = (torch.float16, torch.bfloat16)
BACKENDS = ("triton", "cuda")
# Forced kernel paths per backend (None: the shape heuristic). Triton: settings overrides; cuda: MOLORA_CUDA_PATH.
PATHS = {
    "triton": {
        "auto": None,
        "fused": dict(fused=True),
        "gather_splitk": dict(fused=False, expand="gather", split_k=4),
        "dot": dict(fused=False, expand="dot"),
        "grouped": dict(fused=False, expand="grouped"),
    },
    "cuda": {"auto": None, "per_pair": "per_pair", "segmented": "segmented", "fused": "fused"},
}


@dataclasses.dataclass(frozen=True)
class Case:
    """T is the captured maximum batch; odd hidden sizes (and one multiple of 8 for the CUDA vector loads)."""

    T: int
    K: int
    N: int
    R: int
    H_in: int
    H_out: int
    id_dtype: torch.dtype


CASES = {
    "decode": Case(T=7, K=2, N=5, R=16, H_in=2049, H_out=123, id_dtype=torch.int32),  # split-K shrink at T=7
    "prefill": Case(T=133, K=3, N=6, R=8, H_in=256, H_out=2049, id_dtype=torch.int64),
}


# ------------------------------------------------------------------------------------------------- routing
def new_routing(case: Case, active: int, device, *, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K] (case.id_dtype) and weights [T, K] float32 with `active` routed rows. Routed rows: random ids
    that never use one adapter (chosen at random), about a quarter of slots empty (-1), a duplicate id in
    about a third of the tokens, weights in [0.05, 1.05). Rows from `active` on are padding: all -1 with NaN
    weights (an empty slot adds nothing, whatever its weight holds)."""
    T, K, N = case.T, case.K, case.N
    unused = int(torch.randint(0, N, (), generator=generator))
    ids = torch.randint(0, N - 1, (T, K), generator=generator)
    ids = ids + (ids >= unused).long()
    if K > 1:
        dup = torch.rand(T, generator=generator) < 0.35
        ids[dup, 1] = ids[dup, 0]
    ids[torch.rand(T, K, generator=generator) < 0.25] = -1
    weights = torch.rand(T, K, generator=generator) + 0.05
    ids[active:] = -1
    weights[active:] = float("nan")
    return ids.to(case.id_dtype).to(device), weights.to(device)


def replay_schedule(case: Case, capture_with: str) -> tuple[int, list[int]]:
    """(active rows at capture, active rows of each replay): few -> many or many -> few, then the rest."""
    few, many, mid = 1, case.T, case.T // 2 + 1
    if capture_with == "few":
        return few, [many, 0, mid, few, many]
    return many, [few, 0, mid, many, few]


# ---------------------------------------------------------------------------------------------- capturing
def capture(step, warmup: int = 2):
    """Warm `step` up on a side stream (Triton JIT-compiles on first call), then capture it in a CUDAGraph.
    Returns (graph, what step returned during capture: tensors in the graph's pool, refreshed by replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def _sync() -> None:
    torch.cuda.synchronize()


@contextlib.contextmanager
def forced_path(backend: str, path: str, monkeypatch):
    """Force one kernel path of `backend` while Python decides the launches (warm-up and capture)."""
    forced = PATHS[backend][path]
    if backend == "triton":
        with tb.override(**(forced or {})):
            yield
        return
    with monkeypatch.context() as m:
        if forced is None:
            m.delenv("MOLORA_CUDA_PATH", raising=False)
        else:
            m.setenv("MOLORA_CUDA_PATH", forced)
        yield


def _require(backend: str) -> None:
    status = mo.backends()[backend]
    if not status["available"]:
        pytest.skip(f"backend {backend!r} is not available: {status['reason']}")


def _exact_and_lowp(x, a, b, ids, w, scale, base):
    """(float64 answer, the same computed by the reference in the inputs' precision), both plus `base`."""
    d = torch.float64
    exact = base.to(d) + reference.routed_lora(x.to(d), a.to(d), b.to(d), ids, w.to(d), scaling=scale.to(d))
    lowp = base + reference.routed_lora(x, a, b, ids, w, scaling=scale)
    return exact, lowp


# ------------------------------------------------------------------------------------------ 1. ops level
@pytest.mark.gpu
@pytest.mark.parametrize("capture_with", ("few", "many"))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend,path", [(b, p) for b in BACKENDS for p in PATHS[b]])
def test_ops_replay_with_new_routing(backend, path, dtype, case, capture_with, monkeypatch):
    """routed_lora (out= and functional) and lora_shrink + lora_expand in one graph. Captured with few active
    rows, update_ is part of the graph; captured with many, update_ runs before each replay."""
    _require(backend)
    c, dev = CASES[case], GPU
    plan_in_graph = capture_with == "few"
    x = torch.randn(c.T, c.H_in, device=dev).to(dtype)
    a = (torch.randn(c.N, c.R, c.H_in, device=dev) / c.H_in**0.5).to(dtype)
    b = (torch.randn(c.N, c.H_out, c.R, device=dev) / c.R**0.5).to(dtype)
    scale = torch.rand(c.N, device=dev) + 0.5
    base = torch.randn(c.T, c.H_out, device=dev).to(dtype)
    out, out2 = torch.empty_like(base), torch.empty_like(base)
    at_capture, replays = replay_schedule(c, capture_with)
    ids, w = new_routing(c, at_capture, dev)
    plan = mo.RoutingPlan.empty(c.T, c.K, c.N, device=dev)
    if not plan_in_graph:
        plan.update_(ids)
    common = dict(backend=backend, plan=plan, validate=False)

    def step():
        if plan_in_graph:
            plan.update_(ids)
        out.copy_(base)
        mo.routed_lora(x, a, b, ids, w, scaling=scale, out=out, **common)
        y = mo.routed_lora(x, a, b, ids, w, scaling=scale, **common)
        h = mo.lora_shrink(x, a, ids, w, scaling=scale, **common)
        out2.copy_(base)
        mo.lora_expand(h, b, ids, out=out2, **common)
        return y, h

    with forced_path(backend, path, monkeypatch):
        graph, (y, h) = capture(step)

    zero = torch.zeros_like(base)
    for active in replays:
        new_ids, new_w = new_routing(c, active, dev)
        ids.copy_(new_ids)
        w.copy_(new_w)
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        out.fill_(float("nan"))
        out2.fill_(float("nan"))
        if not plan_in_graph:
            plan.update_(ids)
        graph.replay()
        _sync()
        exact, lowp = _exact_and_lowp(x, a, b, ids, w, scale, base)
        tag = f"{backend}/{path} replay with {active} of {c.T} rows active"
        assert_parity(out, exact, lowp, dtype, name=f"out= ({tag})")
        assert_parity(out2, exact, lowp, dtype, name=f"shrink + expand ({tag})")
        exact0, lowp0 = _exact_and_lowp(x, a, b, ids, w, scale, zero)
        assert_parity(y, exact0, lowp0, dtype, name=f"functional ({tag})")
        d = torch.float64
        want_h = reference.lora_shrink(x.to(d), a.to(d), ids, w.to(d), scaling=scale.to(d))
        assert_close(h, want_h, atol=2e-5, rtol=1e-5, name=f"h ({tag})")


# ------------------------------------------------------------------------------------- 2. RoutedBatch level
@pytest.mark.gpu
@pytest.mark.parametrize("capture_with", ("few", "many"))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_batch_built_in_capture(backend, dtype, case, capture_with):
    """A RoutedBatch built inside the capture (plan, slot tables and all) from static top-k buffers; a sibling
    group (one shrink over the concatenated A, each member expands its own rank slice with its own B and
    scale) and a single projection (add_). Replays with new routing equal the reference."""
    _require(backend)
    c, dev = CASES[case], GPU
    ranks, h_outs = (4, 8, 6), (c.H_out, 48, 17)
    bounds = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
    slices = [(bounds[i], bounds[i + 1]) for i in range(len(ranks))]
    x = torch.randn(c.T, c.H_in, device=dev).to(dtype)
    a_cat = (torch.randn(c.N, bounds[-1], c.H_in, device=dev) / c.H_in**0.5).to(dtype)
    bs = [(torch.randn(c.N, h, r, device=dev) / r**0.5).to(dtype) for h, r in zip(h_outs, ranks)]
    scales = [torch.rand(c.N, device=dev) + 0.5 for _ in ranks]
    a_o = (torch.randn(c.N, c.R, c.H_in, device=dev) / c.H_in**0.5).to(dtype)
    b_o = (torch.randn(c.N, c.H_out, c.R, device=dev) / c.R**0.5).to(dtype)
    scale_o = torch.rand(c.N, device=dev) + 0.5
    bases = [torch.randn(c.T, h, device=dev).to(dtype) for h in h_outs]
    base_o = torch.randn(c.T, c.H_out, device=dev).to(dtype)
    outs, out_o = [torch.empty_like(t) for t in bases], torch.empty_like(base_o)
    at_capture, replays = replay_schedule(c, capture_with)
    ids, w = new_routing(c, at_capture, dev)

    def step():
        batch = RoutedBatch.build(ids, w, c.N, backend=backend, validate=False)
        assert batch.strategy == "backend", batch
        h = batch.shrink(x, a_cat)
        for out, base, b, s, sl in zip(outs, bases, bs, scales, slices):
            out.copy_(base)
            batch.expand_(h, b, out, rank_slice=sl, scale=s)
        out_o.copy_(base_o)
        batch.add_(x, a_o, b_o, out_o, scale=scale_o)

    with torch.no_grad():
        graph, _ = capture(step)
    for active in replays:
        new_ids, new_w = new_routing(c, active, dev)
        ids.copy_(new_ids)
        w.copy_(new_w)
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        _sync()
        tag = f"{backend} replay with {active} of {c.T} rows active"
        for i, (out, base, b, s, (lo, hi)) in enumerate(zip(outs, bases, bs, scales, slices)):
            exact, lowp = _exact_and_lowp(x, a_cat[:, lo:hi], b, ids, w, s, base)
            assert_parity(out, exact, lowp, dtype, name=f"sibling {i} expand_ ({tag})")
        exact, lowp = _exact_and_lowp(x, a_o, b_o, ids, w, scale_o, base_o)
        assert_parity(out_o, exact, lowp, dtype, name=f"add_ ({tag})")


# ---------------------------------------------------------------------------------------- 3. patched model
PREFILL, BATCH = 5, 3
# Our kernels by name: the Triton kernels of molora_ops/kernels/routed_lora.py and the CUDA kernels of csrc/
# (namespace molora).
OUR_KERNEL = re.compile(r"molora::|\b_(shrink|shrink_reduce|expand|expand_dot|expand_grouped|expand_reduce|fused)_kernel\b")
# Per-sequence blends [B, N] for the 3 adapters of tests/_hf.py: "few" has at most one adapter per sequence
# (and a base sequence), "many" every adapter in one sequence, "none" routes nothing.
BLENDS = {
    "few": [[1.0, 0.0, 0.0], [0.0, 0.0, 0.7], [0.0, 0.0, 0.0]],
    "many": [[0.2, 0.5, 0.3], [0.0, 0.0, 0.0], [0.6, 0.0, 0.9]],
    "none": [[0.0, 0.0, 0.0]] * BATCH,
}


def _cache_keyword(model) -> str:
    """transformers >= 5.24 takes the cache as `cache=`, older 5.x as `past_key_values=`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _rewind(cache, tokens: int) -> None:
    """Forget the last `tokens` positions of a StaticCache in place (its length is a device tensor that every
    forward, eager or replayed, advances with add_); the next forward overwrites them."""
    for layer in cache.layers:
        layer.cumulative_length.sub_(tokens)


def _per_token(blend: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, PREFILL + 1, N]: the blend at every position a prefill and one decode step use."""
    return blend[:, None, :].expand(blend.shape[0], PREFILL + 1, blend.shape[1]).contiguous()


@dataclasses.dataclass
class Decoding:
    """A patched model on CUDA with a prefilled StaticCache, a static one-token decode input and the PEFT model
    and prompt it is checked against."""

    model: torch.nn.Module
    base: torch.nn.Module
    pm: torch.nn.Module
    names: list
    cache: object
    prompt: torch.Tensor  # [B, PREFILL]
    step_ids: torch.Tensor  # [B, 1]

    def step(self, model=None):
        """One decode step at position PREFILL (logits [B, 1, vocab]); the cache is left as it was (the rewind is
        device work too, so a captured step replays it as well)."""
        model = self.model if model is None else model
        logits = model(input_ids=self.step_ids, use_cache=True, **{_cache_keyword(self.model): self.cache}).logits
        _rewind(self.cache, 1)
        return logits

    def peft_logits(self, prefill_w: torch.Tensor, step_w: torch.Tensor) -> torch.Tensor:
        """PEFT with per-token blend hooks over the whole sequence: prefill_w [B, PREFILL, N] for the prompt,
        step_w [B, N] for the decoded token; the last position's logits [B, vocab]."""
        from _hf import hook_reference_logits

        full = torch.cat([self.prompt, self.step_ids], dim=1)
        weights = torch.cat([prefill_w, step_w[:, None, :]], dim=1)
        return hook_reference_logits(self.pm, full, weights, self.names)[:, -1]


def _decoding(tmp_path, backend: str, dtype: torch.dtype, routing_w: torch.Tensor, device=None) -> Decoding:
    """Tiny random Llama + three PEFT adapters (tests/_hf.py), patched with `backend`, cast to `dtype` on `device`
    (default: the GPU); the prompt is prefilled eagerly under `routing_w`."""
    from transformers import StaticCache

    from _hf import VOCAB, adapter_configs, make_model, peft_model_with, save_adapters

    torch.manual_seed(0)
    base, targets = make_model("llama")
    dirs = save_adapters(base, adapter_configs("llama", targets), tmp_path)
    device = GPU if device is None else device
    pm = peft_model_with(base, dirs).to(device)
    plain = copy.deepcopy(base).to(device, dtype)
    model = mo.patch(copy.deepcopy(base).to(device, dtype), adapters=dirs, backend=backend)
    cache = StaticCache(config=model.config, max_cache_len=PREFILL + 2)
    prompt = torch.randint(1, VOCAB, (BATCH, PREFILL), device=device)
    step_ids = torch.randint(1, VOCAB, (BATCH, 1), device=device)
    with torch.no_grad(), mo.routing(model, adapter_weights=routing_w):
        model(input_ids=prompt, use_cache=True, **{_cache_keyword(model): cache})
    return Decoding(model, plain, pm, list(dirs), cache, prompt, step_ids)


def _logit_bound(dec: Decoding, dtype: torch.dtype, exact: torch.Tensor, prefill_w, step_w) -> float:
    """float32: 1e-4 of the logits' scale (a one-token step and PEFT's full forward use different GEMM and
    attention kernels); bf16: twice PEFT's own bf16 error + 1e-3 (test_patch_lowp's rule)."""
    scale = max(1.0, float(exact.abs().max()))
    if dtype == torch.float32:
        return 1e-4 * scale
    pm_low = dec.pm
    try:
        dec.pm = copy.deepcopy(pm_low).to(dtype)
        low = dec.peft_logits(prefill_w.to(dtype), step_w.to(dtype))
    finally:
        dec.pm = pm_low
    return 2.0 * float((low.float() - exact).abs().max()) + 1e-3


def _base_step_capturable(dec: Decoding) -> None:
    """Skip unless this transformers can capture and replay the unpatched model's decode step at all."""
    import transformers

    def step():
        return dec.step(dec.base)

    try:
        with torch.no_grad():
            graph, logits = capture(step)
            graph.replay()
            _sync()
            want = step()
    except Exception as exc:  # an HF limitation, not ours: nothing below could be attributed
        pytest.skip(f"transformers {transformers.__version__} cannot capture a plain decode step: {exc}")
    if not torch.equal(logits, want):
        pytest.skip(f"transformers {transformers.__version__}: a replayed plain decode step differs from eager")


def _warm_traced_shapes(dec: Decoding, shape) -> None:
    """An eager step under weights with every adapter non-zero: eager routing then has K = N slots, the count a
    traced (captured) forward derives from W, so the kernels the capture launches are compiled here and not
    inside the capture."""
    full = torch.full((BATCH, len(dec.names)), 0.5, device=dec.step_ids.device)
    with mo.routing(dec.model, adapter_weights=shape(full)):
        dec.step()


def _schedule(form: str, capture_with: str, device):
    """(shape: [B, N] -> the form's W, the blends on `device`, blend names: the first routes the prefill and
    the capture, the rest the replays)."""
    shape = _per_token if form == "per_token" else (lambda t: t)
    blends = {k: torch.tensor(v, device=device) for k, v in BLENDS.items()}
    order = ["few", "many", "none", "few"] if capture_with == "few" else ["many", "few", "none", "many"]
    return shape, blends, order


def _check_follows_w(dec: Decoding, W, shape, blends, order, dtype, run) -> None:
    """For each blend after the first: W.copy_(blend), then `run()` (a replay, or a compiled call; logits
    [B, 1, vocab]) must equal the eager step under that blend and PEFT's answer."""
    prefill_w = _per_token(blends[order[0]])[:, :PREFILL]
    for name in order[1:]:
        W.copy_(shape(blends[name]))
        got = run()[:, -1].float()
        with mo.routing(dec.model, adapter_weights=shape(blends[name]).clone()):
            eager = dec.step()[:, -1].float()
        exact = dec.peft_logits(prefill_w, blends[name])
        bound = _logit_bound(dec, dtype, exact, prefill_w, blends[name])
        tol = 1e-5 * max(1.0, float(eager.abs().max())) if dtype == torch.float32 else bound
        assert_close(got, eager, atol=tol, rtol=0, name=f"step vs eager under W = {name}")
        assert_close(got, exact, atol=bound, rtol=0, name=f"step vs PEFT under W = {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("capture_with", ("few", "many"))
@pytest.mark.parametrize("form", ("per_sequence", "per_token"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_decode_step_replays_new_adapter_weights(backend, dtype, form, capture_with, tmp_path):
    """W [B, N] (or [B, PREFILL + 1, N]) on the model's device routes a captured decode step by reference: after
    W.copy_(W2) a replay equals the eager step under W2 and PEFT's blend, for every W2 in the schedule
    (captured with at most one adapter per sequence and replayed with all, or the reverse; and with none)."""
    _require(backend)
    shape, blends, order = _schedule(form, capture_with, GPU)
    W = shape(blends[order[0]]).clone()
    dec = _decoding(tmp_path, backend, dtype, W)
    _base_step_capturable(dec)
    with torch.no_grad():
        _warm_traced_shapes(dec, shape)
    with torch.no_grad(), mo.routing(dec.model, adapter_weights=W):
        graph, logits = capture(dec.step)

        def replay():
            graph.replay()
            _sync()
            return logits

        _check_follows_w(dec, W, shape, blends, order, dtype, replay)


@torch.no_grad()
@pytest.mark.parametrize("capture_with", ("few", "many"))
@pytest.mark.parametrize("form", ("per_sequence", "per_token"))
def test_compiled_decode_step_follows_adapter_weights_cpu(form, capture_with, tmp_path):
    """The CPU analogue of the captured step: a decode step of the patched model (torch backend) compiled with
    fullgraph=True (dynamo's eager backend) follows W.copy_(W2) like the eager step and PEFT, with no graph break
    and no recompile across the schedule."""
    from torch._dynamo.utils import counters

    cpu = torch.device("cpu")
    shape, blends, order = _schedule(form, capture_with, cpu)
    W = shape(blends[order[0]]).clone()
    dec = _decoding(tmp_path, "torch", torch.float32, W, device=cpu)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(dec.model, fullgraph=True, backend="eager")
        with mo.routing(dec.model, adapter_weights=W):
            dec.step(compiled)
            graphs = counters["stats"]["unique_graphs"]
            _check_follows_w(dec, W, shape, blends, order, torch.float32, lambda: dec.step(compiled))
        assert counters["stats"]["unique_graphs"] == graphs, "a new W recompiled the decode step"
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


# Where our Python code lives: the package, and kernels/ (installed as molora_ops.kernels from another folder).
PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (mo, __import__("molora_ops.kernels").kernels)
)


class _SyncLog:
    """While active, every synchronizing CUDA call (torch.cuda.set_sync_debug_mode("warn")) is recorded with
    the Python stack that made it."""

    def __enter__(self):
        self.stacks = []
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self.stacks.append(traceback.extract_stack()[:-1])
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def ours(self) -> list[str]:
        """The syncs made from molora_ops code, each as its innermost molora_ops frame."""
        found = []
        for stack in self.stacks:
            frames = [f for f in stack if os.path.abspath(f.filename).startswith(PACKAGE_DIRS)]
            if frames:
                found.append(f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}")
        return found


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_decode_step_has_no_host_sync(backend, tmp_path):
    """An eager patched decode step under a tensor W makes no host sync from molora_ops code, and no more
    syncs than the unpatched model's step; when the unpatched step has none, the patched step also runs under
    set_sync_debug_mode("error")."""
    _require(backend)
    W = torch.tensor(BLENDS["many"], device=GPU)
    dec = _decoding(tmp_path, backend, torch.bfloat16, W)
    with torch.no_grad(), mo.routing(dec.model, adapter_weights=W):
        dec.step()  # warm-up: kernels compiled, caches filled
        dec.step(dec.base)
        _sync()
        with _SyncLog() as base_syncs:
            dec.step(dec.base)
        with _SyncLog() as ours:
            dec.step()
        assert not ours.ours(), f"host syncs in molora_ops during an eager decode step: {ours.ours()}"
        assert len(ours.stacks) <= len(base_syncs.stacks), (len(ours.stacks), len(base_syncs.stacks))
        if not base_syncs.stacks:
            torch.cuda.set_sync_debug_mode("error")
            try:
                dec.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")


def _kernel_names(run) -> list[str]:
    """Names of the device activities (kernels, memcpy, memset) that `run()` caused."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        _sync()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_decode_launches_per_layer(backend, tmp_path):
    """Issue 10: at most 2 of our kernels per patched projection's LoRA work (shrink + expand, or one fused)
    in an eager decode step, and no host<->device copies beyond the unpatched model's. Prints the breakdown
    (ours per layer, per sibling group, everything else the patch adds) for the issue note."""
    _require(backend)
    W = torch.tensor(BLENDS["many"], device=GPU)
    dec = _decoding(tmp_path, backend, torch.bfloat16, W)
    layers = dec.model.config.num_hidden_layers
    projections = sum(1 for _, m in dec.model.model.layers[0].named_modules() if hasattr(m, "molora_lora_a"))
    with torch.no_grad(), mo.routing(dec.model, adapter_weights=W):
        dec.step()  # warm-up
        dec.step(dec.base)
        base = _kernel_names(lambda: dec.step(dec.base))
        patched = _kernel_names(dec.step)
    ours = [n for n in patched if OUR_KERNEL.search(n)]
    copies = [n for n in patched if n.startswith("Memcpy") and ("HtoD" in n or "DtoH" in n)]
    base_copies = [n for n in base if n.startswith("Memcpy") and ("HtoD" in n or "DtoH" in n)]
    print(f"\n{backend}: {len(ours) / layers:.1f} of our kernels per layer ({projections} patched projections, "
          f"groups q/k/v, o, gate/up, down); {(len(patched) - len(base) - len(ours)) / layers:.1f} other added "
          f"kernels per layer; ours: {sorted(set(ours))}")
    assert ours, f"no kernel of ours ran: {sorted(set(patched))}"
    assert len(ours) <= 2 * projections * layers, (len(ours), projections, layers, ours)
    assert len(copies) <= len(base_copies), f"host<->device copies added by the patch: {copies} vs {base_copies}"


# ------------------------------------------------------------------------------- CPU: what replay relies on
class HostReads:
    """While active, records every read of a tensor's value into Python (item, tolist, bool, int, float, index,
    nonzero, numpy), with the stack that made it: on a GPU each is a host sync, under stream capture an error.
    The Tensor methods themselves are wrapped, so reads inside registered custom ops are seen too."""

    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")

    def __enter__(self):
        self.reads, self._saved = [], {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._wrap(name, method))
        return self

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)

    def _wrap(self, name, method):
        def read(*args, **kwargs):
            self.reads.append(f"Tensor.{name} at\n" + "".join(traceback.format_stack(limit=5)[:-1]))
            return method(*args, **kwargs)

        return read


def _signature(value):
    """What a captured launch bakes in: tensors by dtype, shape and strides; everything else by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride())
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value


class _Recorder:
    """Stands in for a @triton.jit kernel: logs (name, grid, signature of args) and launches the real one."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, tuple(grid), _signature(args), _signature(sorted(kwargs.items()))))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def triton_launches(monkeypatch):
    """The list every Triton kernel launch of molora_ops.kernels.routed_lora is appended to."""
    if not mo.backends()["triton"]["available"]:
        pytest.skip(mo.backends()["triton"]["reason"])
    from molora_ops.kernels import routed_lora as kernels

    log = []
    for name in ("_shrink_kernel", "_shrink_reduce_kernel", "_expand_kernel", "_expand_dot_kernel",
                 "_expand_grouped_kernel", "_expand_reduce_kernel", "_fused_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(name, getattr(kernels, name), log))
    return log


CPU_CASES = {
    "decode": Case(T=3, K=2, N=4, R=8, H_in=80, H_out=24, id_dtype=torch.int32),
    "prefill": Case(T=19, K=3, N=5, R=4, H_in=40, H_out=33, id_dtype=torch.int64),
}


def _cpu_problem(c: Case, dtype):
    x = torch.randn(c.T, c.H_in).to(dtype)
    a = (torch.randn(c.N, c.R, c.H_in) / c.H_in**0.5).to(dtype)
    b = (torch.randn(c.N, c.H_out, c.R) / c.R**0.5).to(dtype)
    return x, a, b, torch.rand(c.N) + 0.5


@pytest.mark.parametrize("path", list(PATHS["triton"]))
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_triton_launches_depend_on_shapes_only(case, path, triton_launches):
    """The triton backend's routed_lora, lora_shrink and lora_expand with a static plan: no host read of any
    tensor, and the same launches (kernels, grids, scalar arguments, tensor shapes) for a routing with one
    active row, all rows active, and nothing routed; each result equals the reference."""
    c, dtype = CPU_CASES[case], torch.float16
    x, a, b, scale = _cpu_problem(c, dtype)
    ids = torch.full((c.T, c.K), -1, dtype=c.id_dtype)
    w = torch.zeros(c.T, c.K)
    plan = mo.RoutingPlan.empty(c.T, c.K, c.N)
    common = dict(backend="triton", plan=plan, validate=False)
    seen = []
    for active in (1, c.T, 0):
        new_ids, new_w = new_routing(c, active, "cpu")
        ids.copy_(new_ids)
        w.copy_(new_w)
        triton_launches.clear()
        with tb.override(**(PATHS["triton"][path] or {})), HostReads() as reads:
            plan.update_(ids)
            y = mo.routed_lora(x, a, b, ids, w, scaling=scale, **common)
            h = mo.lora_shrink(x, a, ids, w, scaling=scale, **common)
            y2 = mo.lora_expand(h, b, ids, **common)
        assert not reads.reads, "host reads:\n" + "\n".join(reads.reads)
        seen.append(list(triton_launches))
        exact, lowp = _exact_and_lowp(x, a, b, ids, w, scale, torch.zeros(c.T, c.H_out, dtype=dtype))
        assert_parity(y, exact, lowp, dtype, name=f"routed_lora, {active} active")
        assert_parity(y2, exact, lowp, dtype, name=f"shrink + expand, {active} active")
    assert seen[0], "no Triton launch was recorded"
    assert seen[0] == seen[1] == seen[2], "launches differ between routings of one shape:\n" + "\n".join(
        f"{i}: {[(n, g) for n, g, *_ in s]}" for i, s in enumerate(seen))


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_routed_batch_launches_depend_on_shapes_only(case, triton_launches):
    """RoutedBatch.build + shrink + expand_ (rank slices, scale) + add_ on the triton backend: no host read of
    a tensor, the same launches for every routing of one shape, results equal to the reference."""
    c, dtype = CPU_CASES[case], torch.float16
    x, a, b, scale = _cpu_problem(c, dtype)
    b2 = (torch.randn(c.N, 7, c.R - 2) / c.R**0.5).to(dtype)
    seen = []
    for active in (1, c.T, 0):
        ids, w = new_routing(c, active, "cpu")
        out, out2, out3 = (torch.randn(c.T, n).to(dtype) for n in (c.H_out, c.H_out, 7))
        base, base2, base3 = out.clone(), out2.clone(), out3.clone()
        triton_launches.clear()
        with torch.no_grad(), HostReads() as reads:
            batch = RoutedBatch.build(ids, w, c.N, backend="triton", validate=False)
            h = batch.shrink(x, a)
            batch.expand_(h, b, out, scale=scale)
            batch.expand_(h, b2, out3, rank_slice=(2, c.R), scale=scale)
            batch.add_(x, a, b, out2, scale=scale)
        assert batch.strategy == "backend", batch
        assert not reads.reads, "host reads:\n" + "\n".join(reads.reads)
        seen.append(list(triton_launches))
        exact, lowp = _exact_and_lowp(x, a, b, ids, w, scale, base)
        assert_parity(out, exact, lowp, dtype, name=f"expand_, {active} active")
        exact2, lowp2 = _exact_and_lowp(x, a, b, ids, w, scale, base2)
        assert_parity(out2, exact2, lowp2, dtype, name=f"add_, {active} active")
        exact3, lowp3 = _exact_and_lowp(x, a[:, 2:], b2, ids, w, scale, base3)
        assert_parity(out3, exact3, lowp3, dtype, name=f"expand_ rank_slice, {active} active")
    assert seen[0] and seen[0] == seen[1] == seen[2], [[(n, g) for n, g, *_ in s] for s in seen]


@pytest.mark.parametrize("path", list(PATHS["cuda"]))
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cuda_backend_launches_depend_on_shapes_only(case, path, monkeypatch):
    """The cuda backend's Python launchers (CPU tensors, the molora::cuda_* ops replaced by recorders): no host
    read of a tensor and the same op calls (path included) for every routing of one shape."""
    c = CPU_CASES[case]
    log = []

    def recorder(op):
        def record(*args):
            log.append((op, _signature(args)))

        return record

    for op in ("cuda_shrink", "cuda_expand", "cuda_routed_lora_fused"):
        monkeypatch.setattr(torch.ops.molora, op, recorder(op))
    if PATHS["cuda"][path]:
        monkeypatch.setenv("MOLORA_CUDA_PATH", PATHS["cuda"][path])
    else:
        monkeypatch.delenv("MOLORA_CUDA_PATH", raising=False)
    x, a, b, scale = _cpu_problem(c, torch.float16)
    out = torch.zeros(c.T, c.H_out, dtype=torch.float16)
    strided = torch.zeros(c.T, 2 * c.H_out, dtype=torch.float16)
    seen = []
    for active in (1, c.T, 0):
        ids, w = new_routing(c, active, "cpu")
        plan = mo.build_plan(ids, c.N)
        log.clear()
        with HostReads() as reads:
            cuda_backend.routed_lora(x, a, b, ids, w, scale, plan, out, True)
            h = cuda_backend.shrink(x, a, ids, w, scale, plan)
            cuda_backend.expand(h, b, ids, plan, strided[:, ::2], True)  # a strided out takes the copy-back path
        assert not reads.reads, "host reads:\n" + "\n".join(reads.reads)
        seen.append(list(log))
    assert seen[0] and seen[0] == seen[1] == seen[2], seen

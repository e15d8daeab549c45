"""The `cuda` backend (csrc/, built by setup.py).

Without a GPU (CI): the extension must have compiled, loaded and registered its CUDA kernels, its ops must
exist with working fake implementations, and the status line must say why it cannot run. Skipped only when
the build was switched off (MOLORA_SKIP_CUDA_BUILD=1) or there is no nvcc.

With a GPU (marker `gpu`): every kernel path (per-pair shrink, segmented shrink, fused decode, and the shape
heuristic) against the float64 reference over dtypes, token counts, K, odd sizes, traffic patterns, empty
slots and duplicate ids; in-place and strided outputs; and CUDA-graph capture/replay with changing routing.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import molora_ops as mo
from molora_ops import reference
from molora_ops.impl import cuda_backend

from _utils import TRAFFIC_PATTERNS, assert_parity, make_problem, naive_lowp

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = ("per_pair", "segmented", "fused", "auto")
OPS = ("cuda_shrink", "cuda_expand", "cuda_routed_lora_fused")


def _build_skipped() -> str | None:
    if os.environ.get("MOLORA_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return "MOLORA_SKIP_CUDA_BUILD is set: the CUDA extension was not built"
    nvcc = [os.environ.get("CUDACXX"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
            shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if not any(p and os.path.isfile(p) for p in nvcc):
        return "no nvcc here: the CUDA extension was not built"
    return None


# ------------------------------------------------------------------------------------------ no GPU needed
def test_extension_compiled_and_registered():
    why = _build_skipped()
    if why:
        pytest.skip(why)
    status = mo.backends()["cuda"]
    assert status["compiled"], f"the CUDA extension did not load: {status['reason']}"
    assert cuda_backend.library_path() is not None
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{op}", "CUDA"), op
    assert "sm_" in status["reason"], status["reason"]
    if not torch.cuda.is_available():
        assert not status["available"]


def test_status_is_a_sentence():
    compiled, available, reason = cuda_backend.status()
    assert isinstance(reason, str) and reason
    assert available == (compiled and torch.cuda.is_available() and torch.version.cuda is not None)


def test_op_schemas_exist_with_fake_impls():
    """The schemas are defined in Python, so the ops (and their meta kernels) exist even without the build."""
    T, K, N, R, H = 3, 2, 4, 8, 16
    meta = dict(device="meta")
    x = torch.empty(T, H, **meta)
    a, b = torch.empty(N, R, H, **meta), torch.empty(N, H, R, **meta)
    ids = torch.empty(T, K, dtype=torch.int32, **meta)
    w, s = torch.empty(T, K, **meta), torch.empty(N, **meta)
    sp, so = torch.empty(T * K, dtype=torch.int32, **meta), torch.empty(N + 1, dtype=torch.int32, **meta)
    h, out = torch.empty(T, K, R, **meta), torch.empty(T, H, **meta)
    assert torch.ops.molora.cuda_shrink(x, a, ids, w, s, sp, so, h, 1) is None
    assert torch.ops.molora.cuda_expand(h, b, ids, out, True) is None
    assert torch.ops.molora.cuda_routed_lora_fused(x, a, b, ids, w, s, out, False) is None


def _cuda_include_dir():
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for nvcc in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if nvcc:
            roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


def test_kernels_under_host_emulation(tmp_path):
    """The real kernel sources, compiled as C++ and run on CPU fibers (csrc/host_emulation): every path in
    overwrite and accumulate mode against a float64 reference, with empty, out-of-range and duplicate ids,
    unaligned rows, padded strides, stale plans and non-finite adapters (a NaN or Inf must reach only the
    tokens routed to it). Catches indexing, bounds, tiling and barrier mistakes without a GPU;
    it says nothing about speed or the memory model (the gpu tests and compute-sanitizer cover those)."""
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    root = os.path.join(os.path.dirname(__file__), "..", "csrc")
    emu = os.path.join(root, "host_emulation")
    flags = ["-std=c++20", "-O1", f"-I{emu}", f"-I{root}", f"-I{include}"]

    def sh(*cmd):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    objects = []
    for name in ("shrink", "expand"):
        objects.append(str(tmp_path / f"{name}.o"))
        sh(cxx, *flags, "-DMOLORA_HOST_LAUNCH", "-x", "c++", "-c", os.path.join(root, f"{name}.cu"), "-o", objects[-1])
    exe = str(tmp_path / "emulated_kernels")
    sh(cxx, *flags, os.path.join(emu, "harness.cpp"), *objects, "-o", exe)
    assert "all ok" in sh(exe)


def test_path_choice_is_shape_only(monkeypatch):
    monkeypatch.delenv("MOLORA_CUDA_PATH", raising=False)
    assert cuda_backend.choose_paths(1, 2, 16, 4096) == {"shrink": cuda_backend.PATH_PER_PAIR, "fused": True}
    assert cuda_backend.choose_paths(4096, 2, 16, 4096) == {"shrink": cuda_backend.PATH_SEGMENTED, "fused": False}
    # per-pair up to ~2k pairs (the CUDA-core segmented shrink loses below that), whatever T and K make them
    assert cuda_backend.SEGMENTED_MIN_PAIRS == 2048
    assert cuda_backend.choose_paths(256, 2, 16, 4096)["shrink"] == cuda_backend.PATH_PER_PAIR
    assert cuda_backend.choose_paths(1023, 2, 16, 4096)["shrink"] == cuda_backend.PATH_PER_PAIR
    assert cuda_backend.choose_paths(1024, 2, 16, 4096)["shrink"] == cuda_backend.PATH_SEGMENTED
    assert cuda_backend.choose_paths(512, 4, 16, 4096)["shrink"] == cuda_backend.PATH_SEGMENTED
    assert cuda_backend.choose_paths(1, 8, 512, 64)["fused"] is False  # K * R too large for shared memory
    assert cuda_backend.choose_paths(1, 4, 64, 4096)["fused"] is False  # too much shrink work per block
    monkeypatch.setenv("MOLORA_CUDA_PATH", "segmented")
    assert cuda_backend.choose_paths(1, 2, 16, 64) == {"shrink": cuda_backend.PATH_SEGMENTED, "fused": False}
    monkeypatch.setenv("MOLORA_CUDA_PATH", "fused")
    assert cuda_backend.choose_paths(1, 4, 64, 4096)["fused"] is True  # forced, within the kernel's limits
    monkeypatch.setenv("MOLORA_CUDA_PATH", "bogus")
    with pytest.raises(ValueError, match="MOLORA_CUDA_PATH"):
        cuda_backend.choose_paths(1, 2, 16, 64)


# ----------------------------------------------------------------------------------------------- GPU only
def _use_path(monkeypatch, path):
    if path == "auto":
        monkeypatch.delenv("MOLORA_CUDA_PATH", raising=False)
    else:
        monkeypatch.setenv("MOLORA_CUDA_PATH", path)


def _routed(problem, out=None):
    return mo.routed_lora(
        problem.x, problem.lora_a, problem.lora_b, problem.topk_ids, problem.topk_weights,
        scaling=problem.scaling, out=out, backend="cuda",
    )


# (T, K, N, R, H_in, H_out): T over {0, 1, 3, 7, 64, 133}, K 1..4, odd hidden sizes (123, 2049) and ranks
# that are neither a vector width nor a power of two, so both the 16-byte and the scalar loads run.
SHAPES_FULL = (
    (0, 2, 3, 8, 64, 64),
    (1, 1, 4, 16, 2049, 123),
    (1, 2, 8, 16, 4096, 4096),
    (3, 2, 5, 7, 123, 77),
    (7, 3, 6, 16, 64, 2049),
    (7, 4, 3, 1, 123, 123),
    (64, 4, 8, 8, 2049, 96),
    (64, 2, 16, 64, 256, 512),
    (133, 2, 9, 16, 123, 2049),
    (133, 3, 4, 33, 2049, 123),
    (133, 1, 2, 128, 512, 256),
    (1024, 2, 32, 16, 1024, 1024),
)


def _shape_id(shape):
    return "T{}K{}N{}R{}_{}x{}".format(*shape)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_FULL, ids=_shape_id)
def test_routed_lora_parity(monkeypatch, path, dtype, shape):
    _use_path(monkeypatch, path)
    problem = make_problem(*shape, dtype, empty_frac=0.2, duplicate_frac=0.3, device="cuda")
    got = _routed(problem)
    assert got.dtype == dtype and got.shape == (shape[0], shape[5])
    assert_parity(got, problem.exact(), naive_lowp(problem), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ("per_pair", "segmented"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_FULL[:10], ids=_shape_id)
def test_shrink_and_expand_parity(monkeypatch, path, dtype, shape):
    _use_path(monkeypatch, path)
    p = make_problem(*shape, dtype, empty_frac=0.25, duplicate_frac=0.3, id_dtype=torch.int32, device="cuda")
    h = mo.lora_shrink(p.x, p.lora_a, p.topk_ids, p.topk_weights, scaling=p.scaling, backend="cuda")
    d = torch.float64
    h_exact = reference.lora_shrink(p.x.to(d), p.lora_a.to(d), p.topk_ids, p.topk_weights.to(d), scaling=p.scaling.to(d))
    assert h.dtype == torch.float32
    assert_parity(h, h_exact, h_exact.float(), torch.float32, name="h")
    empty = (p.topk_ids < 0).cpu()
    assert (h.cpu()[empty] == 0).all(), "empty slots must give h = 0"
    got = mo.lora_expand(h_exact.float(), p.lora_b, p.topk_ids, backend="cuda")
    want = reference.lora_expand(h_exact, p.lora_b.to(d), p.topk_ids)
    lowp = reference.lora_expand(h_exact.float(), p.lora_b, p.topk_ids)
    assert_parity(got, want, lowp, dtype, name="expand")


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pattern", TRAFFIC_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_traffic_patterns(monkeypatch, path, pattern, dtype):
    _use_path(monkeypatch, path)
    problem = make_problem(96, 2, 8, 16, 2049, 123, dtype, pattern=pattern, empty_frac=0.1, duplicate_frac=0.2,
                           device="cuda")
    assert_parity(_routed(problem), problem.exact(), naive_lowp(problem), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_slots_empty_and_adapters_without_tokens(monkeypatch, path, dtype):
    _use_path(monkeypatch, path)
    problem = make_problem(9, 3, 12, 16, 123, 130, dtype, device="cuda")
    problem.topk_ids[::2] = -1  # every other token has no adapter at all; most of the 12 adapters get none
    got = _routed(problem)
    assert (got[::2] == 0).all(), "overwrite mode must write zeros for tokens with all slots empty"
    assert_parity(got, problem.exact(), naive_lowp(problem), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ("uniform", "skewed"))
@pytest.mark.parametrize(
    "shape", ((20, 1, 300, 8, 64, 32), (7, 2, 512, 16, 128, 64), (2048, 2, 3, 16, 256, 64), (4096, 4, 64, 64, 128, 32)),
    ids=_shape_id,
)
def test_segmented_flat_tile_axis(monkeypatch, shape, pattern):
    """The segmented shrink's one tile axis (P / 32 + N + 1 blocks per rank tile): N much larger than P (most
    segments empty), and P large (many tiles per segment), against the reference."""
    _use_path(monkeypatch, "segmented")
    problem = make_problem(*shape, torch.float16, pattern=pattern, empty_frac=0.2, device="cuda")
    assert_parity(_routed(problem), problem.exact(), naive_lowp(problem), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_out_and_strided_out(monkeypatch, path, dtype):
    _use_path(monkeypatch, path)
    problem = make_problem(33, 2, 5, 16, 128, 96, dtype, empty_frac=0.2, device="cuda")
    base = torch.randn(33, 96, device="cuda").to(dtype)
    exact = problem.exact() + base.double()
    out = base.clone()
    ret = _routed(problem, out=out)
    assert ret is out
    assert_parity(out, exact, naive_lowp(problem) + base, dtype)
    # A transposed view has no unit inner stride: the backend must still add into the caller's tensor.
    out_t = base.t().contiguous().t()
    ret = _routed(problem, out=out_t)
    assert ret is out_t
    assert_parity(out_t, exact, naive_lowp(problem) + base, dtype)


@pytest.mark.gpu
def test_misaligned_and_strided_inputs_use_the_scalar_path():
    """Offset views break 16-byte alignment; the launchers must fall back to scalar loads, not fault."""
    dtype = torch.float16
    p = make_problem(17, 2, 4, 16, 136, 72, dtype, empty_frac=0.2, device="cuda")
    x = torch.empty(17, 137, dtype=dtype, device="cuda")[:, 1:]
    x.copy_(p.x)
    a = torch.empty(4, 16, 137, dtype=dtype, device="cuda")[:, :, 1:]
    a.copy_(p.lora_a)
    b = torch.empty(4, 72, 17, dtype=dtype, device="cuda")[:, :, 1:]
    b.copy_(p.lora_b)
    got = mo.routed_lora(x, a, b, p.topk_ids, p.topk_weights, scaling=p.scaling, backend="cuda")
    assert_parity(got, p.exact(), naive_lowp(p), dtype)


@pytest.mark.gpu
def test_deterministic():
    p = make_problem(200, 4, 6, 16, 512, 384, torch.bfloat16, pattern="skewed", duplicate_frac=0.3, device="cuda")
    first = _routed(p)
    for _ in range(3):
        assert torch.equal(_routed(p), first)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_adapter_and_empty_slot_weights_stay_isolated(monkeypatch, path, dtype):
    """NaN / Inf in some adapters' weights reach only the tokens routed to them; NaN / Inf weights in empty
    slots add nothing."""
    _use_path(monkeypatch, path)
    p = make_problem(70, 2, 5, 8, 40, 24, dtype, empty_frac=0.1, duplicate_frac=0.2, device="cuda")
    lowp = naive_lowp(p)  # before poisoning: the rounding yardstick for the healthy tokens
    p.topk_weights[p.topk_ids < 0] = float("nan")
    p.lora_a[0, 1, 5] = float("nan")
    p.lora_b[2, 3, 1] = float("nan")
    p.lora_b[3, 0, 0] = float("inf")
    exact = p.exact()
    got = _routed(p)
    assert torch.equal(got.isfinite(), exact.isfinite())
    rows = exact.isfinite().all(dim=1)
    assert 0 < int(rows.sum()) < 70
    assert_parity(got[rows], exact[rows], lowp[rows], dtype)


@pytest.mark.gpu
def test_out_of_range_ids_are_never_dereferenced(monkeypatch):
    """validate=False lets ids >= N through; the kernels must treat them as empty slots (compute-sanitizer
    would flag any read; here the result must equal the -1 version)."""
    p = make_problem(20, 3, 4, 8, 64, 48, torch.float32, device="cuda")
    ids_bad = p.topk_ids.clone()
    ids_bad[::3, 1] = 1 << 30
    ids_empty = torch.where(ids_bad >= 4, torch.full_like(ids_bad, -1), ids_bad)
    for path in ("per_pair", "segmented", "fused"):
        _use_path(monkeypatch, path)
        got = mo.routed_lora(p.x, p.lora_a, p.lora_b, ids_bad, p.topk_weights, scaling=p.scaling,
                             backend="cuda", validate=False)
        want = mo.routed_lora(p.x, p.lora_a, p.lora_b, ids_empty, p.topk_weights, scaling=p.scaling, backend="cuda")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_cuda_graph_replay_with_changing_routing(monkeypatch, path):
    """Capture once at the maximum batch with a preallocated plan; replay with new routing (including rows
    padded with -1) and compare every replay with the reference."""
    _use_path(monkeypatch, path)
    dtype, T, K, N, R, H_in, H_out = torch.float16, 48, 2, 6, 16, 256, 192
    p = make_problem(T, K, N, R, H_in, H_out, dtype, device="cuda")
    ids = torch.zeros(T, K, dtype=torch.int32, device="cuda")
    weights = torch.zeros(T, K, device="cuda")
    out = torch.zeros(T, H_out, dtype=dtype, device="cuda")
    plan = mo.RoutingPlan.empty(T, K, N, device="cuda")

    def step():
        plan.update_(ids)
        out.zero_()
        mo.routed_lora(p.x, p.lora_a, p.lora_b, ids, weights, scaling=p.scaling, out=out, backend="cuda",
                       plan=plan, validate=False)

    def new_routing(active_tokens):
        fresh = torch.randint(0, N, (T, K), device="cuda", dtype=torch.int32)
        fresh[active_tokens:] = -1
        fresh[torch.rand(T, K, device="cuda") < 0.15] = -1
        ids.copy_(fresh)
        weights.copy_(torch.rand(T, K, device="cuda"))

    new_routing(T)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for active in (T, 1, 17, 0, T):
        new_routing(active)
        graph.replay()
        torch.cuda.synchronize()
        d = torch.float64
        exact = reference.routed_lora(p.x.to(d), p.lora_a.to(d), p.lora_b.to(d), ids, weights.to(d),
                                      scaling=p.scaling.to(d))
        lowp = reference.routed_lora(p.x, p.lora_a, p.lora_b, ids, weights, scaling=p.scaling)
        assert_parity(out, exact, lowp, dtype, name=f"replay with {active} active tokens")

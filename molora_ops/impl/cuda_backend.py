"""The `cuda` backend: hand-written CUDA kernels from csrc/, compiled into molora_ops/_C*.so by setup.py.

The op schemas below are defined here, in Python, before the library is loaded (torchao's pattern), so the
ops and their fake implementations exist whether or not the extension was built; the library only adds
kernels for the CUDA dispatch key. Importing this module never raises: `status()` says whether the library
loaded and registered its kernels, and why not.

Ops (namespace ``molora``; all write into preallocated outputs and return nothing; `ranks` is None or the int32
[N] real ranks, which bound every rank loop so the padding is never read):
    cuda_shrink(x, lora_a, topk_ids, topk_weights, scale, sorted_pairs, seg_offsets, h!, path, ranks?)
        h [T, K, R] float32: lora_shrink's semantics (molora_ops/reference.py).
        path 1: one block per (pair, rank tile), BGMV-style, for decode sizes;
        path 2: segmented by adapter with the routing plan (SGMV-style), for prefill sizes.
    cuda_expand(h, lora_b, topk_ids, out!, accumulate, ranks?)
        lora_expand's semantics; reduced over k inside one thread (deterministic).
    cuda_routed_lora_fused(x, lora_a, lora_b, topk_ids, topk_weights, scale, out!, accumulate, ranks?)
        shrink and expand in one launch (decode sizes, K * R small).

The path is chosen from shapes only (never from routing values), so a captured CUDA graph replays the same
kernels for any routing, and the grids are sized to the maxima. float64 inputs (which the kernels do not
implement) fall back to the torch backend.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ..plan import RoutingPlan

name = "cuda"

_OPS = {
    "cuda_shrink": (
        "cuda_shrink(Tensor x, Tensor lora_a, Tensor topk_ids, Tensor topk_weights, Tensor scale, "
        "Tensor sorted_pairs, Tensor seg_offsets, Tensor(a!) h, int path, Tensor? ranks=None) -> ()"
    ),
    "cuda_expand": (
        "cuda_expand(Tensor h, Tensor lora_b, Tensor topk_ids, Tensor(a!) out, bool accumulate, "
        "Tensor? ranks=None) -> ()"
    ),
    "cuda_routed_lora_fused": (
        "cuda_routed_lora_fused(Tensor x, Tensor lora_a, Tensor lora_b, Tensor topk_ids, Tensor topk_weights, "
        "Tensor scale, Tensor(a!) out, bool accumulate, Tensor? ranks=None) -> ()"
    ),
}

PATH_PER_PAIR = 1
PATH_SEGMENTED = 2
# Shape heuristics (see choose_paths). Tuned on paper, not yet on hardware.
# The segmented shrink stages through float32 shared memory on CUDA cores without double buffering (predicted
# at ~4% of HBM bandwidth at T = 256), so until a tensor-core segmented kernel exists the per-pair shrink (one
# block per pair, A rows from L2) is kept up to ~2k pairs; prefill beyond that is better sent to the Triton
# backend when it is available (backend="triton").
SEGMENTED_MIN_PAIRS = 2048
FUSED_MAX_TOKENS = 8
FUSED_MAX_RANK_SLOTS = 1024  # K * R; the kernel itself accepts up to 2048
FUSED_MAX_SLOTS = 64
# Every fused block recomputes its token's whole shrink (K * R * H_in multiply-adds, A read from L2), so the fused
# launch only pays off while that is small next to the cost of a second launch.
FUSED_MAX_SHRINK_ELEMENTS = 1 << 17

_lib = torch.library.Library("molora", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's lifetime


def _define_ops() -> None:
    for op, schema in _OPS.items():
        try:
            getattr(torch.ops.molora, op)
            continue  # already defined (module reloaded)
        except (AttributeError, RuntimeError):
            pass
        _lib.define(schema)
        torch.library.register_fake(f"molora::{op}", lib=_lib)(_fake_noop)


def _fake_noop(*args, **kwargs):
    return None


_define_ops()

_state: dict = {}


def library_path() -> Path | None:
    """The built extension inside the package (molora_ops/_C*.so), or None."""
    pkg = Path(__file__).resolve().parent.parent
    found = sorted(pkg.glob("_C*.so"))
    return found[0] if found else None


def _registered() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"molora::{op}", "CUDA") for op in _OPS)


def _load() -> dict:
    if _state:
        return _state
    path = library_path()
    if path is None:
        if os.environ.get("MOLORA_SKIP_CUDA_BUILD", "") not in ("", "0"):
            why = "extension not built: MOLORA_SKIP_CUDA_BUILD=1"
        else:
            why = "extension not built (reinstall with nvcc on PATH: pip install --no-build-isolation -e .)"
        _state.update(compiled=False, reason=why, archs="")
        return _state
    try:
        torch.ops.load_library(str(path))
        lib = ctypes.CDLL(str(path))
        lib.molora_cuda_archs.restype = ctypes.c_char_p
        archs = lib.molora_cuda_archs().decode()
        runtime = int(lib.molora_cuda_runtime_version())
    except Exception as exc:  # an unloadable library must not break `import molora_ops`
        _state.update(compiled=False, reason=f"load failed: {type(exc).__name__}: {exc}", archs="")
        return _state
    if not _registered():
        _state.update(compiled=False, reason=f"{path.name} loaded but registered no CUDA kernels", archs=archs)
        return _state
    _state.update(compiled=True, reason="", archs=archs, runtime=runtime, lib=lib)
    return _state


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _driver_problem(st: dict) -> str | None:
    """Why the installed driver cannot run this library's statically linked CUDA runtime, or None."""
    try:
        driver = int(st["lib"].molora_cuda_driver_version())
    except Exception as exc:
        return f"cannot query the CUDA driver: {exc}"
    if driver == 0:
        return "no CUDA driver found"
    if driver // 1000 < st["runtime"] // 1000:
        return (
            f"built with the CUDA {_version(st['runtime'])} runtime, but the driver supports CUDA {_version(driver)}; "
            f"rebuild with a CUDA {driver // 1000}.x toolkit or update the driver"
        )
    return None


def status() -> tuple[bool, bool, str]:
    """(compiled, available, reason): compiled = the library loaded and registered its CUDA kernels;
    available = compiled and a CUDA device is present."""
    st = _load()
    if not st["compiled"]:
        return False, False, st["reason"]
    if torch.version.cuda is None:
        return True, False, f"built for {st['archs']}, but this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return True, False, f"built for {st['archs']}, but no CUDA device"
    if "driver_problem" not in st:
        st["driver_problem"] = _driver_problem(st)
    if st["driver_problem"]:
        return True, False, st["driver_problem"]
    return True, True, f"hand-written CUDA kernels built for {st['archs']} (CUDA {_version(st['runtime'])} runtime)"


# ---------------------------------------------------------------------------------------------- helpers
def choose_paths(num_tokens: int, top_k: int, rank: int, hidden_in: int) -> dict:
    """Kernel choice from shapes alone: {"shrink": 1 | 2, "fused": bool}. The shrink is per-pair below
    SEGMENTED_MIN_PAIRS routed pairs (T * K) and segmented from there; fused at decode sizes. MOLORA_CUDA_PATH
    overrides it (per_pair | segmented | fused) for tests and benchmarks."""
    forced = os.environ.get("MOLORA_CUDA_PATH", "")
    if forced:
        if forced not in ("per_pair", "segmented", "fused"):
            raise ValueError(f"MOLORA_CUDA_PATH must be per_pair, segmented or fused, got {forced!r}")
        fused_ok = top_k * rank <= 2048 and top_k <= FUSED_MAX_SLOTS
        return {
            "shrink": PATH_SEGMENTED if forced == "segmented" else PATH_PER_PAIR,
            "fused": forced == "fused" and fused_ok,
        }
    pairs = num_tokens * top_k
    return {
        "shrink": PATH_SEGMENTED if pairs >= SEGMENTED_MIN_PAIRS else PATH_PER_PAIR,
        "fused": num_tokens <= FUSED_MAX_TOKENS
        and top_k * rank <= FUSED_MAX_RANK_SLOTS
        and top_k <= FUSED_MAX_SLOTS
        and top_k * rank * hidden_in <= FUSED_MAX_SHRINK_ELEMENTS,
    }


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() == 0 or t.stride(-1) == 1 else t.contiguous()


def _float64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def _routing(topk_ids, topk_weights=None):
    ids = topk_ids.contiguous()
    return ids if topk_weights is None else (ids, topk_weights.contiguous())


def _with_writable_out(out: torch.Tensor, accumulate: bool, run) -> None:
    """Run `run(target)` on `out` directly when its rows have unit inner stride, else on a contiguous copy."""
    if out.numel() == 0 or out.stride(-1) == 1:
        run(out)
        return
    tmp = out.contiguous() if accumulate else torch.empty_like(out, memory_format=torch.contiguous_format)
    run(tmp)
    out.copy_(tmp)


def _torch_backend():
    from . import torch_grouped

    return torch_grouped


# ---------------------------------------------------------------------------------------------- backend
def _ranks(ranks):
    return None if ranks is None else ranks.contiguous()


def shrink(x, lora_a, topk_ids, topk_weights, scale, plan: RoutingPlan, ranks=None) -> torch.Tensor:
    """h[t, k, r] = w[t, k] * scale[e] * lora_a[e, r] @ x[t] for r < ranks[e]; returns [T, K, R] float32 (zeros
    in empty slots and beyond each adapter's rank)."""
    if _float64(x, scale):
        return _torch_backend().shrink(x, lora_a, topk_ids, topk_weights, scale, plan, ranks)
    num_tokens, top_k, rank = x.shape[0], topk_ids.shape[1], lora_a.shape[1]
    h = torch.empty((num_tokens, top_k, rank), dtype=torch.float32, device=x.device)
    ids, w = _routing(topk_ids, topk_weights)
    path = choose_paths(num_tokens, top_k, rank, x.shape[1])["shrink"]
    torch.ops.molora.cuda_shrink(
        _unit_inner(x), _unit_inner(lora_a), ids, w, scale.float().contiguous(),
        plan.sorted_pairs.contiguous(), plan.seg_offsets.contiguous(), h, path, _ranks(ranks),
    )
    return h


def expand(h, lora_b, topk_ids, plan: RoutingPlan, out: torch.Tensor, accumulate: bool, ranks=None) -> None:
    """lora_expand into `out` (see molora_ops/reference.py), formed in float32, rounded once into out."""
    if _float64(h, lora_b):
        return _torch_backend().expand(h, lora_b, topk_ids, plan, out, accumulate, ranks)
    h = h.float().contiguous()
    lora_b = _unit_inner(lora_b)
    ids, ranks = _routing(topk_ids), _ranks(ranks)
    _with_writable_out(out, accumulate, lambda o: torch.ops.molora.cuda_expand(h, lora_b, ids, o, accumulate, ranks))


def routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, scale, plan: RoutingPlan, out, accumulate: bool, ranks=None
) -> None:
    """routed_lora into `out` (see molora_ops/reference.py): one fused launch at decode sizes, else a
    shrink into a float32 [T, K, R] workspace followed by expand; rank loops bounded by `ranks` when given."""
    if _float64(x, scale):
        return _torch_backend().routed_lora(
            x, lora_a, lora_b, topk_ids, topk_weights, scale, plan, out, accumulate, ranks
        )
    num_tokens, top_k, rank = x.shape[0], topk_ids.shape[1], lora_a.shape[1]
    paths = choose_paths(num_tokens, top_k, rank, x.shape[1])
    x, lora_a, lora_b = _unit_inner(x), _unit_inner(lora_a), _unit_inner(lora_b)
    ids, w = _routing(topk_ids, topk_weights)
    scale, ranks = scale.float().contiguous(), _ranks(ranks)
    if paths["fused"]:
        _with_writable_out(
            out, accumulate,
            lambda o: torch.ops.molora.cuda_routed_lora_fused(x, lora_a, lora_b, ids, w, scale, o, accumulate, ranks),
        )
        return
    h = torch.empty((num_tokens, top_k, rank), dtype=torch.float32, device=x.device)
    torch.ops.molora.cuda_shrink(
        x, lora_a, ids, w, scale, plan.sorted_pairs.contiguous(), plan.seg_offsets.contiguous(), h, paths["shrink"],
        ranks,
    )
    _with_writable_out(out, accumulate, lambda o: torch.ops.molora.cuda_expand(h, lora_b, ids, o, accumulate, ranks))

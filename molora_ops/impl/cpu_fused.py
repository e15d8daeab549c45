"""The CPU runtime's ``fused`` strategy: the routed pairs' shrink and expand in C++ (csrc/cpu/routed_lora_cpu.cpp,
built by setup.py into molora_ops/_cpu*.so), without the [pairs, H] gathered x, padded batch or expand output that
the pure-PyTorch strategies materialise, in parallel over torch's intra-op threads.

    shrink:   u [P, R] in plan order, u[i] = coef[i] * A[e] @ x[token i] (one GEMM per chunk of an adapter's rows,
              x rows gathered into a per-thread buffer)
    expand_:  out[token i] += alpha[e] * B[e] @ u[i, rank columns] (tokens in blocks; per block and adapter, one
              GEMM into a per-thread buffer, then the rows added into out; each out row has one writer, adding
              its pairs in a fixed order (adapter, then plan row): deterministic run to run; the block size
              follows the thread count, so another thread count may round the GEMMs differently)

Semantics are routed_lora's (molora_ops/reference.py); only routed pairs are read, so an empty slot, an adapter
nobody routes to and a token without routed slots add nothing, whatever they hold.

Measured faster than every pure-PyTorch CPU strategy at every size (choose_strategy's docstring in
molora_ops/runtime.py; the expand block size: _expand_block below), it serves per-token top-k routing in the eager
runtime (grouped), under torch.compile (traced_fused) and in the torch backend's ops (impl/cpu_train.py). Importing this module never raises: :func:`status` says whether the
library loaded, and the runtime falls back to the pure-PyTorch strategies when it did not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

Tensor = torch.Tensor

_state: dict = {}


def library_path() -> Optional[Path]:
    """The built library inside the package (molora_ops/_cpu*.so), or None."""
    found = sorted(Path(__file__).resolve().parent.parent.glob("_cpu*.so"))
    return found[0] if found else None


def status() -> tuple[bool, str]:
    """(available, reason): whether the C++ CPU kernels are loaded (reason says why not)."""
    if not _state:
        _state.update(_load())
    return _state["available"], _state["reason"]


def available() -> bool:
    return status()[0]


def _register_fakes() -> None:
    """Shapes for torch.compile (the ops are opaque to it; these say what they return without running them)."""

    @torch.library.register_fake("molora_cpu::prepare")
    def _prepare_fake(topk_ids, topk_weights, num_adapters, block):
        num_tokens, top_k = topk_ids.shape
        slots, blocks = num_tokens * top_k, torch.sym_max(1, (num_tokens + block - 1) // block)
        index = topk_ids.new_empty(slots, dtype=torch.long)
        return [index, topk_weights.new_empty(slots), topk_ids.new_empty(num_adapters + 1, dtype=torch.long),
                index.new_empty(slots), index.new_empty(slots), index.new_empty(blocks * num_adapters + 1),
                index.new_empty(slots), index.new_empty(slots)]

    @torch.library.register_fake("molora_cpu::shrink")
    def _shrink_fake(x, lora_a, tokens, offsets, coef, ranks=None):
        return x.new_empty(tokens.shape[0], lora_a.shape[1])

    @torch.library.register_fake("molora_cpu::outer")
    def _outer_fake(left, src, tokens, offsets):
        return src.new_empty(offsets.shape[0] - 1, left.shape[1], src.shape[1])

    @torch.library.register_fake("molora_cpu::expand_")
    def _expand_fake(out, u, rank_start, lora_b, order, tokens, block_offsets, alpha=None, ranks=None):
        return None


def _load() -> dict:
    if os.environ.get("MOLORA_DISABLE_CPU_KERNELS", "") not in ("", "0"):
        return {"available": False, "reason": "disabled by MOLORA_DISABLE_CPU_KERNELS"}
    path = library_path()
    if path is None:
        why = ("not built: MOLORA_SKIP_CPU_BUILD=1" if os.environ.get("MOLORA_SKIP_CPU_BUILD", "") not in ("", "0")
               else "not built (reinstall: pip install --no-build-isolation -e .)")
        return {"available": False, "reason": why}
    try:
        torch.ops.load_library(str(path))
        torch.ops.molora_cpu.shrink  # noqa: B018 - raises if the library registered nothing
        _register_fakes()
    except Exception as exc:  # an unloadable library must not break `import molora_ops`
        return {"available": False, "reason": f"{path.name} failed to load: {type(exc).__name__}: {exc}"}
    return {"available": True, "reason": f"C++ CPU kernels ({path.name})"}


def prepare(topk_ids: Tensor, topk_weights: Tensor, num_adapters: int, threads: int) -> "FusedPairs":
    """The FusedPairs of a routing: topk_ids [T, K] int (ids outside [0, N) are empty slots), topk_weights [T, K]
    in the compute dtype. One C++ call (two counting sorts on the host) instead of the ~25 tensor ops of a plan and
    its orders; static shapes, so it traces under torch.compile."""
    block = _expand_block(topk_ids.shape[0], threads)
    return FusedPairs(*torch.ops.molora_cpu.prepare(topk_ids, topk_weights, num_adapters, block))


def token_runs(pairs: "FusedPairs", min_run: float) -> Optional[list]:
    """[(e, lo, hi, t)]: the maximal ranges of plan rows lo..hi-1 of adapter e whose tokens are t..t+hi-lo-1 (the
    plan order is adapter, slot, token, so a sequence that routes one adapter from one slot is one run), or None
    when they average fewer than min_run pairs. Eager only (the number of runs depends on the routing)."""
    runs = torch.ops.molora_cpu.token_runs(pairs.tokens, pairs.offsets, int(min(max(min_run, 1), 2**62)))
    return [tuple(r) for r in runs.tolist()] if runs.shape[0] else None


def _expand_block(num_tokens: int, threads: int) -> int:
    """Tokens per expand work item: at least two items per thread, at most 256 tokens (larger blocks make the
    per-adapter GEMMs longer, but their [m, H_out] outputs must stay in cache), at least 32.

    Measured per projection (T 1024, top-2 of 8, R 16, float32; 2-core AMD EPYC, torch 2.13; ms per add_ at 128
    / 256 tokens per block): 2 threads H 512->1376 1.20 / 1.20, 1376->512 1.32 / 1.21, 512->512 0.73 / 0.66;
    1 thread 2.66 / 2.58, 2.54 / 2.41, 1.32 / 1.29; 32 tokens per block cost 1.3-1.5x more."""
    return max(32, min(256, num_tokens // (2 * max(1, threads))))


class FusedPairs:
    """The routed pairs of one forward for the C++ kernels, in static shapes (S = T * K entries, of which the first
    P = offsets[N] are the routed pairs; the rest is padding no kernel reads): plan-order tokens [S] int64, coef [S]
    (the routing weight of each pair, compute dtype), offsets [N + 1] int64 (adapter e's rows [offsets[e],
    offsets[e + 1])), and the expand order: order [S] (plan rows grouped by token block, then adapter), etokens [S]
    (their tokens), block_offsets [blocks * N + 1], slots [S] (t * K + k of each plan row) and adapters [S] (its
    adapter). Built once per forward (RoutedBatch); every patched layer
    reuses it."""

    bounded = True  # its methods take `ranks` and bound each adapter's GEMMs by them
    sliced = True  # expand_ takes the rank slice itself (no column-sliced copy of u)

    def __init__(self, tokens: Tensor, coef: Tensor, offsets: Tensor, order: Tensor, etokens: Tensor,
                 block_offsets: Tensor, slots: Tensor, adapters: Tensor):
        self.tokens, self.coef, self.offsets = tokens, coef, offsets
        self.order, self.etokens, self.block_offsets = order, etokens, block_offsets
        self.slots, self.adapters = slots, adapters  # [S] each: t * K + k and the adapter of each plan row

    def shrink(self, x: Tensor, a: Tensor, ranks: Optional[Tensor] = None) -> Tensor:
        """u [S, R] (compute dtype): coef * A[e] @ x[token] per plan row; columns >= ranks[e] and rows >= P are 0."""
        return torch.ops.molora_cpu.shrink(x.contiguous(), a, self.tokens, self.offsets, self.coef, ranks)

    def expand_(self, u: Tensor, b: Tensor, acc: Tensor, scale: Optional[Tensor], ranks: Optional[Tensor] = None,
                rank_slice: Optional[slice] = None) -> None:
        """acc[token] += scale[e] * B[e] @ u[row, rank_slice] for every plan row (b [N, H_out, R_i], R_i the
        slice's length; ranks bound each adapter within it)."""
        start = 0 if rank_slice is None else (rank_slice.start or 0)
        alpha = None if scale is None else scale.to(acc.dtype)
        dst = acc if acc.stride(-1) == 1 else torch.zeros(acc.shape, dtype=acc.dtype)
        torch.ops.molora_cpu.expand_(dst, u, start, b, self.order, self.etokens, self.block_offsets, alpha, ranks)
        if dst is not acc:
            acc.add_(dst)

    def add_(self, x, a, b, acc, scale, ranks=None) -> None:
        self.expand_(self.shrink(x, a, ranks), b, acc, scale, ranks)

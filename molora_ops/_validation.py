"""Input checks shared by the public ops, the reference and the backends.

Every error names the argument and says what was expected. Shape, dtype and device checks read only
metadata. The id-range check reads the ids' values; on a GPU that is a host sync, so the hot path (the
patched model, which validates its routing once per forward) turns it off with ``check_ids=False``.
The kernels never dereference an id outside [0, N) whether or not it ran.

An ``out`` is refused when it shares a byte of memory with any input, or when two of its own elements share
one (an ``expand()`` view): the kernels read the inputs while they write out, and write each element once.
Both checks are exact (views into disjoint parts of one buffer pass) and read only metadata; they are skipped
while torch.compile traces (fake tensors have no addresses) and on the meta device.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32 (float64: reference and torch backend only), got {t.dtype}"
        )


def _check_same_device(**tensors: torch.Tensor) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must share one device"
            )


def can_read_ids(validate: bool, tensor) -> bool:
    """Whether id values may be checked: reading them is a host sync on a GPU and impossible while torch.compile
    traces or a CUDA graph is captured, so it is skipped there (and when `validate` is off)."""
    if not validate or torch.compiler.is_compiling():
        return False
    on_cuda = isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda"
    return not (on_cuda and torch.cuda.is_current_stream_capturing())


def check_autograd_out(out: torch.Tensor, instead: str) -> None:
    """ValueError for an `out` that autograd cannot add into in place (a leaf that requires grad); `instead` says
    what the caller can do."""
    if out.requires_grad and out.is_leaf:
        raise ValueError(
            f"out is a leaf tensor that requires grad, and autograd cannot record an in-place add into it; {instead}"
        )


def check_routing(topk_ids, topk_weights, num_tokens: int, num_adapters: int, check_ids: bool) -> None:
    _check_tensor("topk_ids", topk_ids, 2)
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must have {num_tokens} rows (one per token), got shape {tuple(topk_ids.shape)}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have K >= 1 slots per token, got shape {tuple(topk_ids.shape)}")
    if topk_weights is not None:
        _check_tensor("topk_weights", topk_weights, 2)
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
            )
    if check_ids and topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"topk_ids must lie in [-1, {num_adapters}) (N = {num_adapters} adapters, -1 = empty slot), "
                f"got values in [{lo}, {hi}]"
            )


def check_scaling(scaling, num_adapters: int, device: torch.device) -> None:
    if scaling is None or isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        return
    if not isinstance(scaling, torch.Tensor):
        raise TypeError(f"scaling must be None, a float or a [N] tensor, got {type(scaling).__name__}")
    if not scaling.is_floating_point():
        raise TypeError(f"scaling must be a floating tensor, got {scaling.dtype}")
    if tuple(scaling.shape) != (num_adapters,):
        raise ValueError(f"scaling must have shape [N] = ({num_adapters},), got {tuple(scaling.shape)}")
    if scaling.device != device:
        raise ValueError(f"scaling is on {scaling.device} but the inputs are on {device}")


def check_ranks(ranks, num_adapters: int, rank: int, device: torch.device, check_values: bool) -> None:
    """`ranks`: None, or an int32 [N] tensor on the inputs' device with values in [0, R] (R the padded rank).
    The range is checked only when `check_values` (reading the values is a host sync on a GPU)."""
    if ranks is None:
        return
    if not isinstance(ranks, torch.Tensor):
        raise TypeError(f"ranks must be None or an int32 [N] tensor of per-adapter ranks, got {type(ranks).__name__}")
    if ranks.dtype != torch.int32:
        raise TypeError(f"ranks must be an int32 tensor, got {ranks.dtype}")
    if tuple(ranks.shape) != (num_adapters,):
        raise ValueError(f"ranks must have shape [N] = ({num_adapters},), got {tuple(ranks.shape)}")
    if ranks.device != device:
        raise ValueError(f"ranks is on {ranks.device} but the inputs are on {device}")
    if check_values and num_adapters > 0:
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or hi > rank:
            raise ValueError(
                f"ranks must lie in [0, R] = [0, {rank}] (R = the padded rank of the stacked weights), "
                f"got values in [{lo}, {hi}]"
            )


def scaling_vector(scaling, num_adapters: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """The per-adapter scale as a contiguous [N] tensor of `dtype` (float32; float64 for exact checks)."""
    if scaling is None:
        return torch.ones(num_adapters, dtype=dtype, device=device)
    if isinstance(scaling, torch.Tensor):
        return scaling.to(dtype).contiguous()
    return torch.full((num_adapters,), float(scaling), dtype=dtype, device=device)


def check_shrink(x, lora_a, topk_ids, topk_weights, scaling, *, ranks=None, check_ids: bool = True) -> None:
    _check_tensor("x", x, 2)
    _check_tensor("lora_a", lora_a, 3)
    _check_float("x", x)
    if lora_a.dtype != x.dtype:
        raise TypeError(f"lora_a must have x's dtype {x.dtype}, got {lora_a.dtype}")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"lora_a must be [N, R, H_in] with H_in = x.shape[1] = {x.shape[1]}, got {tuple(lora_a.shape)}"
        )
    if lora_a.shape[0] < 1 or lora_a.shape[1] < 1:
        raise ValueError(f"lora_a must have N >= 1 adapters and rank R >= 1, got {tuple(lora_a.shape)}")
    if topk_weights is None:
        raise TypeError("topk_weights must be a [T, K] floating tensor of router probabilities, got None")
    _check_same_device(x=x, lora_a=lora_a, topk_ids=topk_ids, topk_weights=topk_weights)
    check_routing(topk_ids, topk_weights, x.shape[0], lora_a.shape[0], check_ids)
    check_scaling(scaling, lora_a.shape[0], x.device)
    check_ranks(ranks, lora_a.shape[0], lora_a.shape[1], x.device, check_ids)


def check_expand(h, lora_b, topk_ids, out, *, ranks=None, check_ids: bool = True) -> None:
    _check_tensor("h", h, 3)
    _check_tensor("lora_b", lora_b, 3)
    _check_float("lora_b", lora_b)
    if h.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"h must be float32 (the output of lora_shrink), got {h.dtype}")
    if h.shape[2] != lora_b.shape[2]:
        raise ValueError(f"lora_b must be [N, H_out, R] with R = h.shape[2] = {h.shape[2]}, got {tuple(lora_b.shape)}")
    if lora_b.shape[0] < 1 or lora_b.shape[2] < 1:
        raise ValueError(f"lora_b must have N >= 1 adapters and rank R >= 1, got {tuple(lora_b.shape)}")
    _check_same_device(h=h, lora_b=lora_b, topk_ids=topk_ids, out=out)
    check_routing(topk_ids, None, h.shape[0], lora_b.shape[0], check_ids)
    if tuple(topk_ids.shape) != tuple(h.shape[:2]):
        raise ValueError(f"topk_ids must be [T, K] = {tuple(h.shape[:2])} to match h, got {tuple(topk_ids.shape)}")
    check_ranks(ranks, lora_b.shape[0], lora_b.shape[2], h.device, check_ids)
    _check_out(out, h.shape[0], lora_b.shape[1], lora_b.dtype)
    _check_out_memory(out, h=h, lora_b=lora_b, topk_ids=topk_ids, ranks=ranks)


def _check_out(out, num_tokens: int, h_out: int, dtype: torch.dtype) -> None:
    if out is None:
        return
    _check_tensor("out", out, 2)
    if tuple(out.shape) != (num_tokens, h_out):
        raise ValueError(f"out must have shape [T, H_out] = ({num_tokens}, {h_out}), got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")


def check_routed_lora(
    x, lora_a, lora_b, topk_ids, topk_weights, scaling, out, *, ranks=None, check_ids: bool = True
) -> None:
    check_shrink(x, lora_a, topk_ids, topk_weights, scaling, ranks=ranks, check_ids=check_ids)
    _check_tensor("lora_b", lora_b, 3)
    if lora_b.dtype != x.dtype:
        raise TypeError(f"lora_b must have x's dtype {x.dtype}, got {lora_b.dtype}")
    if lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(
            f"lora_b must be [N, H_out, R] = [{lora_a.shape[0]}, H_out, {lora_a.shape[1]}] to match lora_a, "
            f"got {tuple(lora_b.shape)}"
        )
    _check_same_device(x=x, lora_b=lora_b, out=out)
    _check_out(out, x.shape[0], lora_b.shape[1], x.dtype)
    _check_out_memory(
        out, x=x, lora_a=lora_a, lora_b=lora_b, topk_ids=topk_ids, topk_weights=topk_weights, scaling=scaling,
        ranks=ranks,
    )


def _check_out_memory(out, **inputs) -> None:
    """Raise ValueError naming `out` if it has internal overlap or shares memory with any tensor in `inputs`."""
    if out is None or out.device.type == "meta" or torch.compiler.is_compiling():
        return
    if not out.is_contiguous() and _has_internal_overlap(out):
        raise ValueError(
            f"out has internal overlap (shape {tuple(out.shape)}, strides {out.stride()}: several elements share "
            "one memory location, e.g. an expand() view): pass a tensor whose elements are distinct"
        )
    lo, hi = _allocation(out)
    view = None
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            continue
        t_lo, t_hi = _allocation(t)
        if t_hi <= lo or hi <= t_lo:
            continue  # disjoint allocations (the usual case): no need to look at strides
        view = _memory_view(out) if view is None else view
        if _intersect(view, _memory_view(t)):
            raise ValueError(f"out must not share memory with {name}: the kernels read {name} while they write out")


def _allocation(t: torch.Tensor) -> tuple[int, int]:
    """The byte range of t's storage, which holds every byte t can address."""
    storage = t.untyped_storage()
    start = storage.data_ptr()
    return start, start + storage.nbytes()


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of the 2-D tensor t share an address (exact): i*s0 + j*s1 = i'*s0 + j'*s1 for two
    distinct in-range index pairs; the smallest nonzero solution is (di, dj) = (s1, s0) / gcd(s0, s1)."""
    dims = [(n, s) for n, s in zip(t.shape, t.stride()) if n > 1]
    if any(s == 0 for _, s in dims):
        return True
    if len(dims) < 2:
        return False
    (n0, s0), (n1, s1) = dims
    g = math.gcd(s0, s1)
    return s1 // g < n0 and s0 // g < n1


def _memory_view(t: torch.Tensor) -> tuple:
    """The bytes t's elements occupy, as (first address, ((count, byte stride), ...) outermost first, block):
    element i of the strided grid covers [first + sum(i_d * stride_d), + block). Size-1 and stride-0 dims add
    no address; inner dims whose stride is at most the block covered so far are merged into one block."""
    if t.numel() == 0:
        return t.data_ptr(), (), 0
    item = t.element_size()
    dims = sorted(((n, s * item) for n, s in zip(t.shape, t.stride()) if n > 1 and s != 0), key=lambda d: d[1])
    block, merged = item, 0
    for n, s in dims:
        if s > block:
            break
        block, merged = (n - 1) * s + block, merged + 1
    return t.data_ptr(), tuple(reversed(dims[merged:])), block


def _span(dims: tuple, block: int) -> int:
    return sum((n - 1) * s for n, s in dims) + block


def _intersect(a: tuple, b: tuple) -> bool:
    """Whether two memory views (see _memory_view) share a byte. Exact: it recurses into the rows of the view
    with the coarser outermost stride, visiting only rows whose extent meets the other view's; two views with
    the same outermost stride only meet through the offset q = j - i of their rows, at most a few values."""
    (a0, ad, ab), (b0, bd, bb) = a, b
    if ab == 0 or bb == 0 or a0 + _span(ad, ab) <= b0 or b0 + _span(bd, bb) <= a0:
        return False
    if not ad and not bd:
        return True
    if not ad or (bd and bd[0][1] > ad[0][1]):
        (a0, ad, ab), (b0, bd, bb) = b, a
    (n, s), rest = ad[0], ad[1:]
    inner = _span(rest, ab)
    if bd and bd[0][1] == s:
        (m, _), b_rest = bd[0], bd[1:]
        b_inner, d = _span(b_rest, bb), b0 - a0
        # rows meet where -b_inner < d + q * s < inner, q = j - i in [-(n - 1), m - 1]
        q_lo = max(-(n - 1), (-b_inner - d) // s + 1)
        q_hi = min(m - 1, -((d - inner) // s) - 1)
        return any(_intersect((a0, rest, ab), (b0 + q * s, b_rest, bb)) for q in range(q_lo, q_hi + 1))
    b_end = b0 + _span(bd, bb)
    # row i of a meets b's extent where b0 - inner < a0 + i * s < b_end
    i_lo = max(0, (b0 - inner - a0) // s + 1)
    i_hi = min(n - 1, -((a0 - b_end) // s) - 1)
    return any(_intersect((a0 + i * s, rest, ab), (b0, bd, bb)) for i in range(i_lo, i_hi + 1))

"""Heuristic launch configurations for the routed-LoRA Triton kernels, keyed by shape.

Pure Python (no triton import), so the choice of path and tiles can be tested and inspected without a GPU.
There is deliberately no ``triton.autotune`` on the runtime path: autotuning benchmarks on first call,
which stalls a serving step, breaks CUDA-graph capture and makes results depend on timing noise. A tuned
table can be layered on top later by replacing these functions' outputs for known shapes.

Semantics of the knobs:
    BLOCK_M    rows (routed pairs for shrink, tokens for expand/fused) per program
    BLOCK_R    rank columns per program (shrink: one r-tile per program along grid axis 2;
               expand: the R loop step; fused: the whole padded rank)
    BLOCK_K    H_in step of the shrink reduction
    BLOCK_N    H_out columns per program (expand, fused)
    CHUNK_N    H_out columns per launch pair of the grouped expand (bounds its float32 partial workspace)
    REDUCE_M   tokens per program of the grouped expand's slot reduction
    SPLIT_K    number of programs that share one shrink reduction over H_in (partials reduced in fixed order)
    num_warps  warps per program
    num_stages software-pipeline stages of the fused kernel's H_in loop (tl.range(..., num_stages=)); 1 is the
               plain sequential loop
"""

from __future__ import annotations

from dataclasses import dataclass

# Element budgets for the [rows, cols, R] broadcast-multiply-reduce tiles of the gather kernels (4 warps).
# Each element also carries a 64-bit address, so the budget is set by registers, not by the fp32 values:
# compiled for sm_90 without a device (ptxas resource usage), an 8192-element expand tile spilled (255 regs +
# 232 B stack), 4096 fit in 168 registers; the fused kernel holds two such tiles and fits at 2048 (126 regs).
_GATHER_TILE_ELEMS = 4096
_FUSED_TILE_ELEMS = 2048

# The fused shrink+expand path is taken at decode sizes: few tokens and a small rank-space (R * K), where
# two launches cost more than recomputing the tiny shrink in every H_out tile.
FUSED_MAX_TOKENS = 16
FUSED_MAX_RANK_SLOTS = 128  # next_pow2(R) * K
FUSED_MAX_RANK = 64
FUSED_MAX_REDUNDANT_A_BYTES = 16 << 20  # lora_a bytes re-read across H_out tiles (L2 traffic)
# Pipeline depth of the fused kernel's H_in loop (issue 11 item 3, "decode"): the x and lora_a loads of the next
# steps are in flight while the current step is reduced. 1 keeps the sequential loop until the GPU forced-path
# table (triton:fused-pipelined against triton:fused and split-K at T = 1 / 8) says a deeper pipeline pays.
FUSED_NUM_STAGES = 1

# Split-K on shrink: the H_in reduction is split until the grid has at least SPLIT_K_TARGET_CTAS programs
# (2 per SM of an H200, 132 SMs: one wave resident while the next loads), see split_k_for.
SM_COUNT = 132
SPLIT_K_TARGET_CTAS = 2 * SM_COUNT
SPLIT_K_MAX = 16
SPLIT_K_MIN_STEPS = 4  # each split does at least this many BLOCK_K steps
# Bytes of x and lora_a operand tiles per H_in step of the shrink; larger steps spilled on sm_80/sm_90.
SHRINK_STEP_BYTES = 12288


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


@dataclass(frozen=True)
class ShrinkConfig:
    BLOCK_M: int
    BLOCK_R: int
    BLOCK_K: int
    SPLIT_K: int
    num_warps: int

    def k_per_split(self, h_in: int) -> int:
        """H_in columns per split, a multiple of BLOCK_K (the last split may be shorter)."""
        steps = cdiv(max(h_in, 1), self.BLOCK_K)
        return cdiv(steps, self.SPLIT_K) * self.BLOCK_K

    def with_split(self, split_k: int, h_in: int) -> "ShrinkConfig":
        """This config with SPLIT_K = split_k, reduced so that no split is empty."""
        steps = cdiv(max(h_in, 1), self.BLOCK_K)
        split_k = _clamp(int(split_k), 1, steps)
        per = cdiv(steps, split_k)
        return ShrinkConfig(self.BLOCK_M, self.BLOCK_R, self.BLOCK_K, cdiv(steps, per), self.num_warps)


@dataclass(frozen=True)
class GroupedExpandConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_R: int
    CHUNK_N: int
    REDUCE_M: int
    num_warps: int


@dataclass(frozen=True)
class GatherConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_R: int
    BLOCK_K: int  # fused only (H_in step); 0 for expand
    num_warps: int
    num_stages: int = 1  # fused only: software-pipeline stages of the H_in loop (1: sequential)


def shrink_config(num_pairs: int, num_adapters: int, rank: int, h_in: int, elem_bytes: int = 2) -> ShrinkConfig:
    """Tiles for the adapter-segmented shrink. tl.dot needs every tile dimension >= 16.

    elem_bytes is the input element size: float32 operands (and the float32 upcast) take twice the registers
    and shared memory of fp16/bf16, so their H_in step is halved (sm_80 compile checks spilled otherwise).
    """
    del num_adapters  # segments can be as long as num_pairs, so tiles are sized from it
    if num_pairs <= 128:
        block_m = 16
    elif num_pairs <= 2048:
        block_m = 32
    else:
        block_m = 64
    block_r = _clamp(next_pow2(rank), 16, 64)
    # Operand bytes per H_in step bounded (x rows are gathered, so each element also holds a 64-bit address).
    block_k = 128
    while block_k > 16 and (block_m + block_r) * block_k * elem_bytes > SHRINK_STEP_BYTES:
        block_k //= 2
    block_k = _clamp(block_k, 16, max(16, next_pow2(h_in)))
    num_warps = 8 if block_m * block_r >= 64 * 64 else 4
    cfg = ShrinkConfig(block_m, block_r, block_k, 1, num_warps)
    return cfg.with_split(split_k_for(num_pairs, rank, h_in, block_m, block_r, block_k), h_in)


def split_k_for(num_pairs: int, rank: int, h_in: int, block_m: int, block_r: int, block_k: int) -> int:
    """SPLIT_K from shapes alone. Rule: the shrink has at least cdiv(P, BLOCK_M) x cdiv(R, BLOCK_R) tile
    programs (the segment tiles of any routing number at least cdiv(P, BLOCK_M)); split the H_in reduction
    into the fewest parts that lift that to SPLIT_K_TARGET_CTAS, capped at SPLIT_K_MAX and so that every
    split keeps SPLIT_K_MIN_STEPS BLOCK_K steps. Example, h 4096, r 16, bf16: P = 512 (16 tiles, 32 H_in steps)
    -> split 8 (128 programs, capped by 32 // 4 steps); P = 8192 (128 tiles) -> 3; P = 65536 -> 1."""
    tiles = cdiv(max(num_pairs, 1), block_m) * cdiv(max(rank, 1), block_r)
    steps = cdiv(max(h_in, 1), block_k)
    return _clamp(cdiv(SPLIT_K_TARGET_CTAS, tiles), 1, min(SPLIT_K_MAX, max(1, steps // SPLIT_K_MIN_STEPS)))


def _gather_block_n(rows: int, block_r: int, h_out: int, budget: int = _GATHER_TILE_ELEMS) -> int:
    # rows and block_r are powers of two, so the quotient is one too.
    block_n = budget // max(1, rows * block_r)
    return _clamp(block_n, 16, min(256, max(16, next_pow2(h_out))))


def expand_config(num_tokens: int, rank: int, h_out: int) -> GatherConfig:
    """Tiles for the token-major expand (each program owns BLOCK_M tokens x BLOCK_N output columns)."""
    block_m = _clamp(next_pow2(num_tokens), 1, 8)
    block_r = _clamp(next_pow2(rank), 1, 16)  # R is looped over; wider R steps spilled on sm_90
    block_n = min(128, _gather_block_n(block_m, block_r, h_out))
    return GatherConfig(block_m, block_n, block_r, 0, 4)


def use_fused(num_tokens: int, top_k: int, rank: int, h_in: int, h_out: int) -> bool:
    """One launch (shrink recomputed per H_out tile) at decode sizes; two launches otherwise.

    Every H_out tile of the fused kernel re-reads its tokens' lora_a rows (from L2), so the path is also
    bounded by that redundant traffic, T * K * R * H_in * 2 bytes per H_out tile. At LLM sizes this leaves
    the fused path to one or two tokens. The bound is an estimate, not a measurement (no GPU timing went
    into it yet).
    """
    r_pad = next_pow2(rank)
    if not (num_tokens <= FUSED_MAX_TOKENS and r_pad <= FUSED_MAX_RANK and r_pad * top_k <= FUSED_MAX_RANK_SLOTS):
        return False
    n_tiles = cdiv(h_out, fused_config(num_tokens, rank, h_in, h_out).BLOCK_N)
    return num_tokens * r_pad * top_k * h_in * 2 * n_tiles <= FUSED_MAX_REDUNDANT_A_BYTES


def fused_config(num_tokens: int, rank: int, h_in: int, h_out: int, num_stages: int | None = None) -> GatherConfig:
    """Tiles for the fused kernel: the whole padded rank lives in one tile. num_stages: the H_in loop's pipeline
    depth, FUSED_NUM_STAGES by default, at most the number of H_in steps (a deeper pipeline than the loop only
    costs shared memory)."""
    block_m = _clamp(next_pow2(num_tokens), 1, 4)
    block_r = next_pow2(rank)
    block_k = _clamp(_FUSED_TILE_ELEMS // (block_m * block_r), 16, min(256, max(16, next_pow2(h_in))))
    block_n = _gather_block_n(block_m, block_r, h_out, _FUSED_TILE_ELEMS)
    stages = FUSED_NUM_STAGES if num_stages is None else int(num_stages)
    if stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    stages = min(stages, max(1, cdiv(max(h_in, 1), block_k)))
    return GatherConfig(block_m, block_n, block_r, block_k, 4, stages)


def scan_block(num_adapters: int) -> int:
    """Adapters per step of the shrink's tile-to-segment scan."""
    return _clamp(next_pow2(num_adapters), 16, 256)


def reduce_config(rank: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_R) for the split-K partial reduction."""
    block_r = _clamp(next_pow2(rank), 1, 64)
    return max(1, 1024 // block_r), block_r


# The tensor-core expand does one dot per distinct adapter in a token tile; it pays when that count is small
# compared with the K per-row gathers of the CUDA-core expand, and only for half-precision weights (a float32
# dot must run in ieee precision, off the tensor cores).
# Rank bound from compile_check (bf16/fp16, no device): with 4 warps R = 32 spilled at BLOCK_M = 32 on sm_80
# and sm_90, R = 64 everywhere and R = 128 by 0.6-1.6 KB. 8 warps (expand_dot_config) make R = 32 spill-free
# on both, but R = 64 still spilled 64 B on sm_90 at BLOCK_M = 32 and R = 128 0.6 KB, so larger ranks take
# the gather expand.
DOT_EXPAND_MIN_TOKENS = 64
DOT_EXPAND_MAX_RANK = 32
DOT_EXPAND_ADAPTERS_PER_SLOT = 8
# N bounds the distinct adapters a token tile can meet, and each one is a pass of K h loads and two dots, so
# the per-slot allowance must not grow with K without limit: at most this many adapters, whatever K is.
DOT_EXPAND_MAX_ADAPTERS = 16


def expand_variant(num_tokens: int, top_k: int, num_adapters: int, rank: int, half_precision: bool) -> str:
    """"dot" (tensor cores over the distinct adapters of a token tile), "grouped" (tensor cores over adapter
    segments, float32 partials reduced over k) or "gather" (per-row CUDA-core FMA).

    Rule (shapes only; a prediction until the GPU forced-path table sets it): decode sizes and float32 weights
    take "gather". Half-precision prefill takes "dot" while few adapters can meet in a token tile and the rank
    fits its single tile; otherwise "grouped", which reads each B[e] tile once per segment tile, where the
    gather re-reads B for every (token, slot) and the dot kernel pays one masked dot per distinct adapter."""
    if not half_precision or num_tokens < min(DOT_EXPAND_MIN_TOKENS, GROUPED_EXPAND_MIN_TOKENS):
        return "gather"
    if (
        num_tokens >= DOT_EXPAND_MIN_TOKENS
        and rank <= DOT_EXPAND_MAX_RANK
        and num_adapters <= min(DOT_EXPAND_ADAPTERS_PER_SLOT * top_k, DOT_EXPAND_MAX_ADAPTERS)
    ):
        return "dot"
    return "grouped"


def expand_dot_config(num_tokens: int, rank: int, h_out: int) -> GatherConfig:
    """Tiles for the tensor-core expand (tl.dot needs every dimension >= 16; the whole rank in one tile)."""
    block_m = 16 if num_tokens <= 128 else 32
    block_r = max(16, next_pow2(rank))
    block_n = _clamp(128 if block_r <= 32 else 64, 16, max(16, next_pow2(h_out)))
    num_warps = 8 if block_r >= 32 else 4  # 4 warps spilled at BLOCK_R = 32 (see DOT_EXPAND_MAX_RANK)
    return GatherConfig(block_m, block_n, block_r, 0, num_warps)


# The adapter-grouped expand (prefill): B[e] read once per segment tile, at the price of float32 per-pair partials
# reduced over k in a second kernel (see routed_lora.launch_expand_grouped). The workspace per column chunk is
# bounded so that it stays resident in L2 (60 MB on an H200, 40-50 MB on A100/L40) while it is written and read.
GROUPED_EXPAND_MIN_TOKENS = 64
GROUPED_EXPAND_PARTIAL_BYTES = 16 << 20


def expand_grouped_config(num_pairs: int, rank: int, h_out: int) -> GroupedExpandConfig:
    """Tiles for the adapter-grouped expand: segment tiles as in the shrink, R looped in BLOCK_R steps (so any
    rank stays on tensor cores), and CHUNK_N the widest multiple of BLOCK_N whose [P, CHUNK_N] float32
    workspace fits GROUPED_EXPAND_PARTIAL_BYTES (at least one BLOCK_N)."""
    block_m = 16 if num_pairs <= 128 else (32 if num_pairs <= 2048 else 64)
    block_r = _clamp(next_pow2(rank), 16, 32)
    block_n = _clamp(64 if block_m == 64 else 128, 16, max(16, next_pow2(h_out)))
    fit = GROUPED_EXPAND_PARTIAL_BYTES // (4 * max(num_pairs, 1) * block_n)
    chunk_n = block_n * _clamp(fit, 1, cdiv(max(h_out, 1), block_n))
    num_warps = 8 if block_m * block_n >= 64 * 64 else 4
    return GroupedExpandConfig(block_m, block_n, block_r, chunk_n, 16, num_warps)

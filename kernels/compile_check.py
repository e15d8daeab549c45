"""Compile every Triton kernel for NVIDIA targets without a GPU and report ptxas resource usage.

    python -m molora_ops.kernels.compile_check [--arch 80 90] [--dtype bf16 fp16 fp32] [--jobs N] [--strict]

For each representative shape (decode, prefill, odd sizes) it takes every launch the backend can make there,
the one its shape heuristic picks and every forced path (split-K 1/4/16 and atomics, the gather, dot and
adapter-grouped expands with their reduce, the fused kernel plain and pipelined, and with per-adapter ranks),
with the configs of molora_ops.kernels.configs; compiles each to a cubin with the ptxas bundled in the triton
wheel, and prints registers and stack (spill) bytes per thread. Exit status 1 when a kernel fails to compile,
when a heuristic launch spills (a forced-only one spilling is a warning, an error with --strict), or when a
kernel of routed_lora has no job at all, so CI catches an uncompilable or spilling tile with no GPU.

It proves the kernels compile and fit; it does not run them (numerics are tested under TRITON_INTERPRET=1,
speed only on a GPU). It uses triton's ASTSource / GPUTarget compile entry points, which are not a stable
API; it is a developer tool, not used at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# (T, K, N, R, H_in, H_out)
SHAPES = (
    (1, 2, 32, 16, 4096, 4096),
    (8, 4, 8, 64, 4096, 4096),
    (3, 2, 5, 7, 123, 77),
    (133, 2, 9, 16, 2049, 2049),
    (4096, 2, 8, 16, 4096, 4096),
    (4096, 2, 64, 64, 4096, 11008),
    # prefill with few adapters at larger ranks: the tensor-core expand's register limit (DOT_EXPAND_MAX_RANK)
    (4096, 2, 4, 32, 4096, 4096),
    (4096, 2, 4, 64, 4096, 4096),
    (4096, 2, 4, 128, 4096, 4096),
)
_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
FORCED_STAGES = 3  # the pipelined fused path's depth compiled here (configs.fused_config(num_stages=))


# Element type of every pointer argument, by name, per input dtype `dt` (weights and activations in dt).
_POINTER_TYPES = {
    "x_ptr": None, "a_ptr": None, "b_ptr": None, "ids_ptr": "i64", "w_ptr": "fp32", "scale_ptr": "fp32",
    "sorted_pairs_ptr": "i32", "seg_offsets_ptr": "i32", "ranks_ptr": "i32", "h_ptr": "fp32", "part_ptr": "fp32",
}
# Meta-parameters a job may leave out, with the value the backend passes by default.
_DEFAULT_META = {"HAS_RANKS": False, "NUM_STAGES": 1}


def _signature(fn, out_type: str, dt: str, constexprs: dict) -> dict:
    """Triton's signature for `fn`: pointers typed by _POINTER_TYPES (out_ptr: out_type; None: dt), other
    non-constexpr arguments i32. A pointer or meta-parameter this tool does not know is an error naming it."""
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            if arg != "out_ptr" and arg not in _POINTER_TYPES:
                raise KeyError(f"compile_check does not know the element type of {fn.__name__}'s {arg}: add it to _POINTER_TYPES")
            sig[arg] = "*" + (out_type if arg == "out_ptr" else (_POINTER_TYPES[arg] or dt))
        elif arg.isupper():
            raise KeyError(f"compile_check does not set {fn.__name__}'s meta-parameter {arg}: add it to the job or _DEFAULT_META")
        else:
            sig[arg] = "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if not match:
        raise RuntimeError(f"could not parse cuobjdump output: {text[-300:]}")
    return int(match.group(1)), int(match.group(2))


def _compile(job: "Job", arch: int) -> tuple[int, int]:
    """Compile one job for sm_<arch>; (registers, stack bytes) per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import routed_lora

    fn = getattr(routed_lora, job.kernel)
    meta = {**{k: v for k, v in _DEFAULT_META.items() if k in fn.arg_names}, **dict(job.meta)}
    src = ASTSource(fn, _signature(fn, job.out_type, job.dt, meta), constexprs=meta)
    options = {"num_warps": job.num_warps, **({"num_stages": job.num_stages} if job.num_stages else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return _resources(kernel.asm["cubin"])


@dataclass(frozen=True)
class Job:
    """One kernel compile: `kernel` names a @triton.jit function of molora_ops.kernels.routed_lora; `meta` its
    meta-parameters as sorted (name, value) pairs; heuristic: the backend's shape heuristic takes this launch
    for some shape (else only a forced path does: benchmarks' triton:<path>, tests' override())."""

    name: str
    kernel: str
    dt: str
    out_type: str
    meta: tuple
    num_warps: int
    heuristic: bool
    num_stages: int = 0  # 0: triton's default


def _job(name, kernel, dt, out_type, meta: dict, num_warps, heuristic, num_stages=0) -> Job:
    return Job(name, kernel, dt, out_type, tuple(sorted(meta.items())), num_warps, heuristic, num_stages)


def _shrink_jobs(shape, dt: str) -> list[Job]:
    """The shrink at the heuristic split and at every forced one (1, 4, 16, atomic 4), with its reductions."""
    from . import configs

    T, K, N, R, H_in, H_out = shape
    upcast = dt == "fp32"
    chosen = configs.shrink_config(T * K, N, R, H_in, 4 if upcast else 2)
    jobs = []
    variants = [(chosen, False, True)] + [(chosen.with_split(s, H_in), False, False) for s in (1, 4, 16)]
    variants.append((chosen.with_split(4, H_in), True, False))
    for cfg, atomic, heuristic in variants:
        meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_R=cfg.BLOCK_R, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K,
                    USE_ATOMIC=atomic and cfg.SPLIT_K > 1, UPCAST=upcast, SCAN_BLOCK=configs.scan_block(N),
                    APPLY_COEF=cfg.SPLIT_K == 1 or atomic)
        jobs.append(_job("shrink", "_shrink_kernel", dt, "fp32", meta, cfg.num_warps, heuristic))
        if cfg.SPLIT_K > 1 and not atomic:
            bp, br = configs.reduce_config(R)
            jobs.append(_job("shrink_reduce", "_shrink_reduce_kernel", dt, "fp32",
                             dict(BLOCK_P=bp, BLOCK_R=br, SPLIT_K=cfg.SPLIT_K), 4, heuristic))
    return jobs


def _expand_jobs(shape, dt: str) -> list[Job]:
    """Every expand variant a forced path can launch (dot only up to DOT_EXPAND_MAX_RANK, where a forced
    "dot" takes the gather), the heuristic's marked."""
    from . import configs

    T, K, N, R, H_in, H_out = shape
    upcast = dt == "fp32"
    chosen = configs.expand_variant(T, K, N, R, dt != "fp32")
    jobs = []
    c = configs.expand_config(T, R, H_out)
    jobs.append(_job("expand", "_expand_kernel", dt, dt, dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                     BLOCK_R=c.BLOCK_R, ACCUMULATE=True), c.num_warps, chosen == "gather"))
    if R <= configs.DOT_EXPAND_MAX_RANK:
        c = configs.expand_dot_config(T, R, H_out)
        jobs.append(_job("expand_dot", "_expand_dot_kernel", dt, dt, dict(
            TOP_K=K, K_POW2=max(2, 1 << (K - 1).bit_length()), BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
            BLOCK_R=c.BLOCK_R, ACCUMULATE=True, UPCAST=upcast), c.num_warps, chosen == "dot"))
    g = configs.expand_grouped_config(T * K, R, H_out)
    jobs.append(_job("expand_grouped", "_expand_grouped_kernel", dt, "fp32", dict(
        BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N, BLOCK_R=g.BLOCK_R, SCAN_BLOCK=configs.scan_block(N), UPCAST=upcast),
        g.num_warps, chosen == "grouped"))
    jobs.append(_job("expand_reduce", "_expand_reduce_kernel", dt, dt, dict(
        TOP_K=K, BLOCK_M=g.REDUCE_M, BLOCK_N=g.BLOCK_N, ACCUMULATE=True), 4, chosen == "grouped"))
    return jobs


def _fused_jobs(shape, dt: str) -> list[Job]:
    """The fused kernel with the heuristic's config (forced fused uses the same tiles at any T), plain and,
    where the config has a pipeline depth, at FORCED_STAGES (the pipelined path)."""
    from . import configs

    T, K, N, R, H_in, H_out = shape
    heuristic = configs.use_fused(T, K, R, H_in, H_out)
    jobs = []
    stages = [None] + ([FORCED_STAGES] if "num_stages" in configs.GatherConfig.__dataclass_fields__ else [])
    for depth in stages:
        c = configs.fused_config(T, R, H_in, H_out, **({"num_stages": depth} if depth else {}))
        meta = dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_R=c.BLOCK_R, BLOCK_K=c.BLOCK_K, ACCUMULATE=True)
        n_stages = getattr(c, "num_stages", 0)
        if depth:
            meta["NUM_STAGES"] = n_stages
        jobs.append(_job("fused" + ("_pipelined" if depth else ""), "_fused_kernel", dt, dt, meta, c.num_warps,
                         heuristic and not depth, n_stages if depth else 0))
    return jobs


def jobs(shape, dt: str) -> list[Job]:
    """Every kernel launch the backend can make at `shape` (T, K, N, R, H_in, H_out) in dtype `dt`, through its
    heuristic or a forced path; with ranks (HAS_RANKS) for the heuristic's launches."""
    out = _shrink_jobs(shape, dt) + _expand_jobs(shape, dt) + _fused_jobs(shape, dt)
    ranked = [dataclasses.replace(j, name=j.name + "+ranks", meta=tuple(sorted({**dict(j.meta), "HAS_RANKS": True}.items())))
              for j in out if j.heuristic and _takes_ranks(j.kernel)]
    return out + ranked


def _takes_ranks(kernel: str) -> bool:
    from . import routed_lora

    return "HAS_RANKS" in getattr(routed_lora, kernel).arg_names


def kernels_covered(dtypes=tuple(_TL)) -> set[str]:
    """The routed_lora kernels some job compiles, over SHAPES and `dtypes` (no compiling)."""
    return {j.kernel for dt in dtypes for shape in SHAPES for j in jobs(shape, dt)}


def all_kernels() -> set[str]:
    """Every @triton.jit kernel (a *_kernel function) of molora_ops.kernels.routed_lora."""
    from . import routed_lora

    return {n for n, v in vars(routed_lora).items() if n.endswith("_kernel") and hasattr(v, "arg_names")}


def _run(job_arch) -> tuple:
    job, arch = job_arch
    try:
        return job, arch, _compile(job, arch), None
    except Exception as exc:  # reported with every other failure
        return job, arch, None, f"{type(exc).__name__}: {exc}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_TL))
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--strict", action="store_true", help="a spill on a forced-only path fails too")
    parser.add_argument("--only", nargs="+", default=None, help="compile only the jobs of these names (expand_reduce, ...)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs TRITON_INTERPRET unset (the interpreter does not compile)", file=sys.stderr)
        return 2
    missing = all_kernels() - kernels_covered(tuple(args.dtype))
    if missing:
        print(f"compile check: no job compiles {sorted(missing)}; add them to jobs()", file=sys.stderr)
        return 1
    work = list(dict.fromkeys((j, arch) for arch in args.arch for dt in args.dtype for shape in SHAPES
                              for j in jobs(shape, dt)))
    if args.only:
        work = [(j, a) for j, a in work if j.name in args.only]
    pool = None
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs)
    done = pool.map(_run, work) if pool else map(_run, work)  # lines print as results arrive, in order
    failures = warnings = 0
    for job, arch, res, error in done:
        tiles = " ".join(f"{k}={v}" for k, v in job.meta if k.startswith(("BLOCK", "SPLIT", "NUM_STAGES")))
        tag = "" if job.heuristic else " (forced)"
        if error:
            failures += 1
            print(f"sm_{arch} {job.dt:<4} {job.name + tag:<24} {tiles}: FAILED {error}", flush=True)
            continue
        regs, stack = res
        bad = stack > 0
        hard = bad and (job.heuristic or args.strict)
        failures += hard
        warnings += bad and not hard
        print(f"sm_{arch} {job.dt:<4} {job.name + tag:<24} {tiles:<52} regs {regs:>3} stack {stack:>4}"
              f"{'  SPILLS' if bad else ''}", flush=True)
    if pool:
        pool.shutdown()
    note = f" ({warnings} forced-only path(s) spill)" if warnings else ""
    print(f"compile check passed: {len(work)} compiles{note}" if not failures
          else f"compile check: {failures} problem(s){note}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel for NVIDIA targets without a GPU and report ptxas resource usage.

    python -m molora_ops.kernels.compile_check [--arch 80 90] [--dtype bf16 fp16 fp32]

For each representative shape (decode, prefill, odd sizes) it takes the configs the backend would pick
(molora_ops.kernels.configs), compiles the kernel to a cubin with the ptxas bundled in the triton wheel, and
prints registers and stack (spill) bytes per thread. Exit status 1 when a kernel fails to compile or spills,
so CI can catch a heuristic that produces an uncompilable or spilling tile on a machine with no GPU.

It proves the kernels compile and fit; it does not run them (numerics are tested under TRITON_INTERPRET=1,
speed only on a GPU). It uses triton's ASTSource / GPUTarget compile entry points, which are not a stable
API; it is a developer tool, not used at run time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

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


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = "*" + pointers[arg]
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


def _compile(fn, pointers, constexprs, arch: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return _resources(kernel.asm["cubin"])


def _jobs(shape, dt: str):
    from . import configs
    from . import routed_lora as k

    T, K, N, R, H_in, H_out = shape
    upcast = dt == "fp32"
    half = dt != "fp32"
    P = T * K
    s = configs.shrink_config(P, N, R, H_in, 4 if upcast else 2)
    sp = dict(x_ptr=dt, a_ptr=dt, ids_ptr="i64", w_ptr="fp32", scale_ptr="fp32", sorted_pairs_ptr="i32", seg_offsets_ptr="i32",
              out_ptr="fp32")
    meta = dict(BLOCK_M=s.BLOCK_M, BLOCK_R=s.BLOCK_R, BLOCK_K=s.BLOCK_K, SPLIT_K=s.SPLIT_K, USE_ATOMIC=False,
                UPCAST=upcast, SCAN_BLOCK=configs.scan_block(N))
    yield "shrink", k._shrink_kernel, sp, dict(meta, APPLY_COEF=s.SPLIT_K == 1), s.num_warps
    if s.SPLIT_K > 1:
        bp, br = configs.reduce_config(R)
        yield "shrink_reduce", k._shrink_reduce_kernel, dict(
            part_ptr="fp32", ids_ptr="i64", w_ptr="fp32", scale_ptr="fp32", h_ptr="fp32"
        ), dict(BLOCK_P=bp, BLOCK_R=br, SPLIT_K=s.SPLIT_K), 4
    ep = dict(h_ptr="fp32", b_ptr=dt, ids_ptr="i64", out_ptr=dt)
    if configs.expand_variant(T, K, N, R, half) == "dot":
        c = configs.expand_dot_config(T, R, H_out)
        yield "expand_dot", k._expand_dot_kernel, ep, dict(
            TOP_K=K, K_POW2=max(2, 1 << (K - 1).bit_length()), BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
            BLOCK_R=c.BLOCK_R, ACCUMULATE=True, UPCAST=upcast,
        ), c.num_warps
    else:
        c = configs.expand_config(T, R, H_out)
        yield "expand", k._expand_kernel, ep, dict(
            BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_R=c.BLOCK_R, ACCUMULATE=True
        ), c.num_warps
    if configs.use_fused(T, K, R, H_in, H_out):
        c = configs.fused_config(T, R, H_in, H_out)
        yield "fused", k._fused_kernel, dict(
            x_ptr=dt, a_ptr=dt, b_ptr=dt, ids_ptr="i64", w_ptr="fp32", scale_ptr="fp32", out_ptr=dt
        ), dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_R=c.BLOCK_R, BLOCK_K=c.BLOCK_K, ACCUMULATE=True), c.num_warps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_TL))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs TRITON_INTERPRET unset (the interpreter does not compile)", file=sys.stderr)
        return 2
    failures = 0
    seen = set()
    for arch in args.arch:
        for dt in args.dtype:
            for shape in SHAPES:
                for name, fn, pointers, meta, warps in _jobs(shape, dt):
                    key = (arch, dt, name, tuple(sorted(meta.items())), warps)
                    if key in seen:
                        continue
                    seen.add(key)
                    tiles = " ".join(f"{k}={v}" for k, v in meta.items() if k.startswith(("BLOCK", "SPLIT")))
                    try:
                        regs, stack = _compile(fn, pointers, meta, arch, warps)
                    except Exception as exc:  # report every failure, then exit non-zero
                        failures += 1
                        print(f"sm_{arch} {dt:<4} {name:<13} {tiles}: FAILED {type(exc).__name__}: {exc}")
                        continue
                    bad = stack > 0
                    failures += bad
                    print(f"sm_{arch} {dt:<4} {name:<13} {tiles:<48} regs {regs:>3} stack {stack:>4}"
                          f"{'  SPILLS' if bad else ''}")
    print("compile check passed" if not failures else f"compile check: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``molora selfcheck``: run every available backend on random routed-LoRA problems and compare each with
the float64 reference. Exits non-zero on any mismatch."""

from __future__ import annotations

import torch

# (T, K, N, R, H_in, H_out): decode-sized, odd sizes, and a token count that spans several tiles.
CASES = ((1, 2, 4, 8, 64, 64), (7, 3, 5, 7, 123, 77), (133, 2, 9, 16, 96, 130))
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def _problem(case, dtype, device, generator):
    T, K, N, R, H_in, H_out = case
    ids = torch.randint(-1, N, (T, K), generator=generator)
    x = torch.randn(T, H_in, generator=generator)
    a = torch.randn(N, R, H_in, generator=generator) / H_in**0.5
    b = torch.randn(N, H_out, R, generator=generator) / R**0.5
    w = torch.rand(T, K, generator=generator)
    s = torch.rand(N, generator=generator) + 0.5
    lowp = [t.to(dtype).to(device) for t in (x, a, b)]
    exact = [t.to(dtype).double() for t in (x, a, b)]
    return lowp, exact, ids.to(device), w.to(device), s.to(device)


def run(args) -> int:
    import molora_ops
    from molora_ops import reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(args.seed)
    names = [n for n, st in molora_ops.backends().items() if st["available"]]
    if device.type == "cpu":
        names = [n for n in names if n == "torch"]  # triton on CPU needs the interpreter; the tests cover it
    failures = 0
    print(f"selfcheck on {device}: backends {', '.join(names)}")
    for backend in names:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            worst = 0.0
            for case in CASES:
                (x, a, b), (xe, ae, be), ids, w, s = _problem(case, dtype, device, generator)
                got = molora_ops.routed_lora(x, a, b, ids, w, scaling=s, backend=backend)
                want = reference.routed_lora(xe, ae, be, ids.cpu(), w.cpu().double(), scaling=s.cpu().double())
                err = (got.double().cpu() - want).abs().max().item() if got.numel() else 0.0
                worst = max(worst, err / (1.0 + want.abs().max().item()))
            ok = worst <= TOLERANCE[dtype]
            failures += not ok
            print(f"  {backend:<7} {str(dtype).replace('torch.', ''):<9} max rel err {worst:.2e}  {'ok' if ok else 'FAIL'}")
    print("selfcheck passed" if failures == 0 else f"selfcheck FAILED ({failures} mismatches)")
    return 1 if failures else 0

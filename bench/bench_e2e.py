"""End-to-end benchmark: a random-init Llama-style model with N LoRA adapters on all linear projections.

One run, one process, all variants interleaved at each point: prefill and one KV-cached decode step at batch
1, 8 and 32, for the base model, ours (per-token top-k weights, a TokenRouter, adapter_names), PEFT's mixed
batch and a dense all-adapter baseline, eager and under torch.compile (molora_ops/benchmarking/e2e_suite.py
has the details). Arguments as for `molora bench`:

    python bench/bench_e2e.py --grid cpu                    # issue 10's CPU model (prefill 2 threads, decode 1)
    python bench/bench_e2e.py --grid cpu --modes eager      # without torch.compile (minutes faster)
    python -m molora_ops bench --suite e2e --grid gpu       # ~1.1B parameters, bf16, on a CUDA device

Results are appended to bench/results/e2e-<device>.jsonl; `python -m molora_ops report --readme README.md`
renders them, with the issue's targets beside the measured ratios.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from molora_ops.cli import main

    sys.exit(main(["bench", "--suite", "e2e", *sys.argv[1:]]))

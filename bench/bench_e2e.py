"""End-to-end benchmark: a random-init Llama-style model with N LoRA adapters on all linear projections.

Prefill and decode-step latency, tokens/s and (on CUDA) peak memory for the base model, ours with per-token
top-k routing, ours with adapter_names, PEFT's mixed batch and a dense all-adapter baseline, at batch 1, 8
and 32 (molora_ops/benchmarking/e2e_suite.py has the details). Arguments as for `molora bench`:

    python bench/bench_e2e.py --grid cpu --threads 1      # ~20M-parameter model on CPU
    python -m molora_ops bench --suite e2e --grid gpu      # ~1.1B parameters, bf16, on a CUDA device

Results are appended to bench/results/e2e-<device>.jsonl; `python -m molora_ops report` renders them.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from molora_ops.cli import main

    sys.exit(main(["bench", "--suite", "e2e", *sys.argv[1:]]))

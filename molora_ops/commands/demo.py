"""``molora demo`` (also ``molora-demo``): the routed multi-LoRA experiment end to end, offline.

Builds three domains from what Python ships (stdlib code, generated math, documentation prose), trains a
tokenizer, a tiny GPT-2 base, one PEFT LoRA per domain and a sequential baseline, trains a context router with
``mo.train_router``, then evaluates everything through ``mo.patch`` on held-out text. A MoLoRA stage then trains
a top-2 router and a dense all-adapter router through the LM loss (``objective="lm"``) and compares them with the
supervised router on the same held-out text, with training throughput. See molora_ops.demo.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced run for CI (about 1.5 minutes on 2 CPU cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--out", metavar="DIR", default="molora-demo",
                        help="artifacts: base model, PEFT adapters, router, heat map, results.json "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: free cores, from the load average)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply the pretraining and adapter training steps (default 1)")
    parser.add_argument("--no-plot", action="store_true",
                        help="skip the routing heat map (the only use of the optional matplotlib)")
    user = parser.add_argument_group("your own model (skips data/tokenizer/base/adapter training)")
    user.add_argument("--model", metavar="DIR", help="a local Hugging Face causal LM (with its tokenizer)")
    user.add_argument("--adapter", metavar="NAME=DIR", action="append",
                      help="a PEFT LoRA adapter directory; repeat for each adapter")
    user.add_argument("--data", metavar="NAME=PATH", action="append",
                      help="texts for adapter NAME (a file or folder) for router training and evaluation; "
                           "adapters named code/math/prose default to the built-in corpora")
    user.add_argument("--router", metavar="DIR",
                      help="a router saved by mo.train_router / Router.save (else one is trained)")
    user.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="--model weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")


def run(args) -> int:
    from molora_ops.demo.pipeline import run as run_pipeline

    return run_pipeline(args)


def main(argv=None) -> int:
    from molora_ops import __version__

    parser = argparse.ArgumentParser(prog="molora-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"molora_ops {__version__}")
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

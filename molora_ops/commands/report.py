"""``molora report``: render the README performance section, a full performance page and PNG plots from
results files.

    python -m molora_ops report                       # bench/results -> docs/performance.md + docs/performance/
    python -m molora_ops report --results DIR --out DIR
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--results", action="append", default=None,
                        help="a results folder or jsonl file (repeatable; default: bench/results)")
    parser.add_argument("--out", default="docs", help="where performance.md and performance/*.png go (default: docs)")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")


def run(args) -> int:
    from pathlib import Path

    from molora_ops.benchmarking import results
    from molora_ops.benchmarking.report import render

    sources = args.results or [str(results.default_results_dir())]
    records = results.load(sources)
    if not records:
        print(f"no results found in {', '.join(sources)}; run `python -m molora_ops bench` first")
        return 1
    written = render(records, Path(args.out), plots=not args.no_plots)
    print(f"read {len(records)} records from {', '.join(sources)}")
    for key in ("full", "readme"):
        print(f"wrote {written[key]}")
    for img in written["images"]:
        print(f"wrote {img}")
    return 0

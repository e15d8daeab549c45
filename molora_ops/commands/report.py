"""``molora report``: render the README performance section, a full performance page and PNG plots from
results files.

    python -m molora_ops report                       # bench/results -> docs/performance.md + docs/performance/
    python -m molora_ops report --results DIR --out DIR
    python -m molora_ops report --readme README.md   # also splice the section into the README's markers
"""

from __future__ import annotations

README_START, README_END = "<!-- performance:start -->", "<!-- performance:end -->"


def add_arguments(parser) -> None:
    parser.add_argument("--results", action="append", default=None,
                        help="a results folder or jsonl file (repeatable; default: bench/results)")
    parser.add_argument("--out", default="docs", help="where performance.md and performance/*.png go (default: docs)")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help=f"replace the text between {README_START} and {README_END} in FILE with the section")


def splice_readme(readme, section: str) -> None:
    """Put `section` between the performance markers of `readme` (a Path); ValueError if they are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers to write the section between")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{section.strip()}\n{README_END}{tail}")


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
    if args.readme:
        splice_readme(Path(args.readme), Path(written["readme"]).read_text())
        print(f"updated {args.readme}")
    return 0

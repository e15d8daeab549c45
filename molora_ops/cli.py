"""Command line: ``python -m molora_ops <command>`` (also installed as ``molora``); ``--version`` prints the version.

Commands are small modules, each exposing ``add_arguments(parser)`` and ``run(args) -> int``, imported only
when their command runs so that ``info`` stays fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = {
    "info": ("molora_ops.commands.info", "show which backends are available and why not"),
    "selfcheck": ("molora_ops.commands.selfcheck", "check every available backend against the reference"),
    "bench": ("molora_ops.commands.bench", "run a benchmark suite and append results to bench/results"),
    "report": ("molora_ops.commands.report", "render the performance table and plots from results files"),
    "demo": ("molora_ops.commands.demo", "the end-to-end routed multi-LoRA experiment, offline"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="molora", description="Routed multi-LoRA kernels: tools and demos.")
    parser.add_argument("--version", action="version", version=f"molora_ops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)

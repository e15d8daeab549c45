"""Results files: one JSON object per line, appended, never rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def default_results_dir() -> Path:
    """bench/results of the checkout this package lives in, else ./bench/results."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "bench").is_dir():
        return repo / "bench" / "results"
    return Path.cwd() / "bench" / "results"


def append(path: os.PathLike, records: Iterable[dict]) -> int:
    """Append records to a jsonl file (creating its folder); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            n += 1
    return n


def load(paths: Iterable[os.PathLike]) -> list[dict]:
    """Every record in the given jsonl files or folders of them (blank and broken lines are skipped)."""
    records = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        for file in files:
            with file.open() as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    rec.setdefault("_file", file.name)
                    records.append(rec)
    return records

"""Markdown tables and PNG plots rendered from results records (``bench/results/*.jsonl``).

Only the latest run of each (suite, device) is shown, and smoke runs only where nothing else exists. Every
table names the device, the date, the git sha and the machine's load when the run started; every ratio is
between numbers of the same run.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict, defaultdict
from pathlib import Path

from .baselines import BASELINES, OURS
from .e2e_suite import SCHEMA as E2E_SCHEMA
from .problems import TRAFFIC_PATTERNS

# sweep tag (prefix before '@') -> the config field that varies along it
SWEEP_AXIS = {"T": "T", "pattern": "pattern", "distinct32": "pattern", "N": "N", "K": "K", "R": "R",
              "hidden": "H_out", "dtype": "dtype", "empty": "empty_frac", "ranks": "T"}
PROVIDER_ORDER = list(OURS) + list(BASELINES)


def _is_ours(provider: str) -> bool:
    """Our backends, also as forced-path or per-adapter-rank variants ("triton:dot", "cuda+ranks")."""
    return re.split(r"[:+]", provider, maxsplit=1)[0] in OURS


def _variant_of(provider: str) -> tuple[str, str] | None:
    """(backend, path) of a forced-path or +ranks provider ("triton:dot" -> ("triton", "dot")), else None."""
    m = re.fullmatch(r"([a-z]+)([:+])(.+)", provider)
    if not m or m.group(1) not in OURS:
        return None
    return m.group(1), m.group(3) if m.group(2) == ":" else "+" + m.group(3)


ORDER = {v: i for i, v in enumerate(TRAFFIC_PATTERNS + ("float32", "float16", "bfloat16"))}
COLORS = {"torch": "#1f77b4", "triton": "#2ca02c", "cuda": "#d62728", "reference": "#7f7f7f",
          "peft-loop": "#ff7f0e", "dense": "#9467bd", "gather-bmm": "#8c564b", "base GEMM": "#000000"}
VARIANT_COLORS = {"base": "#000000", "ours-topk": "#1f77b4", "ours-router": "#2ca02c", "ours-names": "#17becf",
                  "peft-mixed": "#ff7f0e", "dense": "#9467bd"}


# ------------------------------------------------------------------------------------------- selection
def latest_runs(records: list[dict], suite: str) -> list[list[dict]]:
    """For each device, the records of its latest non-smoke run of `suite` (a smoke run if that is all)."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("suite") == suite:
            runs[r["env"]["device"]][r["run_id"]].append(r)
    chosen = []
    for device, by_run in runs.items():
        full = {k: v for k, v in by_run.items() if v[0].get("grid") != "smoke"} or by_run
        chosen.append(full[max(full, key=lambda k: full[k][0]["env"]["timestamp"])])
    return sorted(chosen, key=lambda rs: rs[0]["env"]["device"])


def _slug(run: list[dict]) -> str:
    """'cpu-amd-epyc', 'cuda-nvidia-h100-80gb-hbm3': the device without its parenthesised details or core count."""
    e = run[0]["env"]
    name = re.sub(r"\(.*?\)|,\s*\d+ cores", "", e["device"]).lower()
    return re.sub(r"[^a-z0-9]+", "-", f"{e['device_type']}-{name}").strip("-")[:48]


def run_header(run: list[dict]) -> str:
    r0 = run[0]
    e = r0["env"]
    versions = ", ".join(f"{k} {e[k]}" for k in ("torch", "triton", "transformers", "peft", "python") if e.get(k))
    parts = [f"**Device: {e['device']}**" + (f" (driver {e['driver']})" if e.get("driver") else ""),
             f"run {e['timestamp']}, git `{(e.get('git_sha') or 'unknown')[:12]}`, grid `{r0.get('grid')}`",
             versions, f"torch threads: {_threads_note(run) if 'threads' in r0 else e.get('torch_threads')}, "
                       f"1-min load average at start: {e.get('loadavg_1m')}"]
    timers = sorted({r["time"]["timer"] for r in run if r.get("status") == "ok" and "time" in r})
    if timers:
        parts.append(f"timer: {', '.join(timers)}")
    if "copy_gbps" in r0:
        floor = f"{r0['launch_floor_ms'] * 1e3:.1f} µs"
        if r0.get("launch_floor_graph_ms") is not None:
            floor += f" eager, {r0['launch_floor_graph_ms'] * 1e3:.1f} µs in a CUDA graph"
        parts.append(f"copy bandwidth {r0['copy_gbps']:.1f} GB/s, cheapest launch {floor} (same run)")
    return "; ".join(parts) + "."


# -------------------------------------------------------------------------------------------- ops tables
def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cell(rec: dict | None, spread: bool) -> str:
    if rec is None:
        return "–"
    if rec["status"] != "ok":
        return {"skipped": "skip", "wrong": "**WRONG**", "error": "error"}.get(rec["status"], rec["status"])
    t = rec["time"]
    text = _fmt_ms(t["median_ms"])
    return f"{text} [{_fmt_ms(t['p20_ms'])}, {_fmt_ms(t['p80_ms'])}]" if spread else text


def _points(run: list[dict], tag: str) -> "OrderedDict[tuple, dict[str, dict]]":
    """{config key: {provider: record}} for one sweep, ordered along the sweep's axis."""
    pts: dict = {}
    for r in run:
        if tag in r["config"]["sweeps"]:
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                               for k, v in r["config"].items() if k != "sweeps"))
            pts.setdefault(key, {})[r["provider"]] = r
    axis = SWEEP_AXIS.get(tag.split("@")[0], tag)

    def order(key):
        v = dict(key)[axis]
        return (0, v, "") if isinstance(v, (int, float)) else (1, ORDER.get(v, 99), str(v))

    return OrderedDict(sorted(pts.items(), key=lambda kv: order(kv[0])))


def _providers_in(run: list[dict]) -> list[str]:
    present = {r["provider"] for r in run if r["status"] == "ok"}
    return [p for p in PROVIDER_ORDER if p in present]


def _best(provs: dict[str, dict], names) -> dict | None:
    ok = [provs[n] for n in names if n in provs and provs[n]["status"] == "ok"]
    return min(ok, key=lambda r: r["time"]["median_ms"]) if ok else None


def sweep_tags(run: list[dict]) -> list[str]:
    tags: list[str] = []
    for r in run:
        for t in r["config"]["sweeps"]:
            if t not in tags:
                tags.append(t)
    return tags


def _fixed(run: list[dict], tag: str) -> str:
    """The config values held fixed along a sweep, in words."""
    axis = SWEEP_AXIS.get(tag.split("@")[0], tag)
    c = next(r["config"] for r in run if tag in r["config"]["sweeps"])
    items = {"T": f"T={c['T']}", "dtype": c["dtype"], "H_out": f"h {c['H_in']}→{c['H_out']}", "R": f"r={c['R']}",
             "N": f"N={c['N']}", "K": f"k={c['K']}", "pattern": c["pattern"]}
    if c.get("empty_frac"):
        items["empty_frac"] = f"{c['empty_frac']:.0%} empty slots"
    return ", ".join(v for k, v in items.items() if k != axis)


def ops_table(run: list[dict], tag: str, *, spread: bool = False) -> str:
    """One sweep as a markdown table: median ms per provider, then ours against the baselines."""
    axis = SWEEP_AXIS.get(tag.split("@")[0], tag)
    provs = _providers_in(run)
    ours = [p for p in provs if _is_ours(p)]
    baselines = [p for p in provs if not _is_ours(p) and p != "reference"]
    head = [axis, "base GEMM"] + [f"ours ({p})" if _is_ours(p) else p for p in provs]
    head += ["ours vs fastest baseline", "ours vs peft-loop", "ours % of copy BW", "ours / base GEMM", "ours / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_prov in _points(run, tag).items():
        cfg = dict(key)
        any_rec = next(iter(by_prov.values()))
        row = [str(cfg[axis]), _fmt_ms(any_rec["base_gemm"]["median_ms"]) if "base_gemm" in any_rec else "–"]
        row += [_cell(by_prov.get(p), spread) for p in provs]
        me, rival, peft = _best(by_prov, ours), _best(by_prov, baselines), by_prov.get("peft-loop")
        if me is not None:
            m = me["time"]["median_ms"]
            row.append(f"{rival['time']['median_ms'] / m:.2f}× ({rival['provider']})" if rival else "–")
            row.append(f"{peft['time']['median_ms'] / m:.2f}×" if peft and peft["status"] == "ok" else "–")
            row.append(f"{me['copy_frac']:.1%}")
            row.append(f"{me['lora_over_base']:.2f}")
            row.append(f"{me['over_floor']:.1f}")
        else:
            row += ["–"] * 5
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _forced_paths(run: list[dict]) -> dict[str, list[str]]:
    """{backend: [its forced paths and +ranks variants, first-seen order]} present in the run."""
    paths: dict[str, list[str]] = {}
    for r in run:
        v = _variant_of(r["provider"])
        if v and v[1] not in paths.setdefault(v[0], []):
            paths[v[0]].append(v[1])
    return paths


def _ops_point_label(cfg: dict) -> str:
    label = f"T={cfg['T']}"
    if cfg.get("ranks"):
        label += f", ranks {'/'.join(map(str, cfg['ranks']))} (R={cfg['R']})"
    return label


def forced_table(run: list[dict]) -> str | None:
    """Every forced kernel path per point, so that one GPU run can set the heuristics: a column per path
    (the plain provider is the shape heuristic), the median ms, the fastest path of each backend in bold
    and named at the end of the row. None when the run has no forced-path providers."""
    paths = _forced_paths(run)
    if not paths:
        return None
    cols = [(b, None) for b in paths] + [(b, p) for b, ps in paths.items() for p in ps]
    name = lambda b, p: b if p is None else (f"{b}{p}" if p.startswith("+") else f"{b}:{p}")  # noqa: E731
    pts: dict = {}
    for r in run:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in r["config"].items() if k != "sweeps"))
        pts.setdefault(key, {})[r["provider"]] = r
    head = ["point"] + [("heuristic " + b) if p is None else name(b, p) for b, p in cols]
    head += [f"fastest {b}" for b in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, provs in sorted(pts.items(), key=lambda kv: (bool(dict(kv[0]).get("ranks")), dict(kv[0])["T"])):
        if not any(name(b, p) in provs for b, p in cols if p is not None):
            continue
        best = {b: _best(provs, [name(b, p) for bb, p in cols if bb == b]) for b in paths}
        row = [_ops_point_label(dict(key))]
        for b, p in cols:
            cell = _cell(provs.get(name(b, p)), False)
            row.append(f"**{cell}**" if best[b] is not None and best[b] is provs.get(name(b, p)) else cell)
        row += [best[b]["provider"] if best[b] else "–" for b in paths]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


FORCED_LEGEND = ("*Forced kernel paths*: the same call with one kernel path forced (`triton:<path>` sets "
                 "`molora_ops.impl.triton_backend.Settings`, `cuda:<path>` sets `MOLORA_CUDA_PATH`; `+ranks` passes "
                 "each adapter's real rank); *heuristic* is the path the shape heuristic picks. Median ms, the "
                 "fastest of each backend in bold: where it is not the heuristic, the heuristic should change.")


OPS_LEGEND = ("Columns: median time of one `routed_lora` call in ms (CPU: thread CPU time with one torch thread, "
              "else wall time); *base GEMM* is `x @ W.T` on the same shapes, the projection the LoRA delta is added "
              "to; *ours vs X* is X's time over ours (above 1: ours is faster); *% of copy BW* is the minimum bytes "
              "(x, the routed adapters' A and B, the output) over our time, as a fraction of a large torch copy "
              "timed in the same run; *ours / base GEMM* is the LoRA cost relative to the base projection; "
              "*ours / floor* is our time over max(cheapest launch, minimum bytes / copy bandwidth).")


def _cache_note(run: list[dict]) -> str:
    """How the timed calls were kept from finding their data cached, counted over the run's timed rows."""
    methods = defaultdict(int)
    for r in run:
        if r.get("status") == "ok":
            methods[(r.get("cache") or {}).get("method", "not recorded")] += 1
    size = next((r["cache"]["cache_bytes"] for r in run if isinstance(r.get("cache"), dict)), None)
    told = {"l2_flush": "L2 flushed before each call", "pool": "cycled through copies of the data larger than "
            "the cache", "exceeds_cache": "one call's data exceeds the cache", "pool-partial": "a pool capped "
            "by memory (partly cache-resident)", "resident": "data cache-resident (no flush, no pool)",
            "not recorded": "cache handling not recorded (older run)"}
    parts = [f"{told.get(m, m)}: {n} rows" for m, n in sorted(methods.items())]
    where = f" (last-level cache {size / 2**20:.0f} MiB)" if size else ""
    return f"Caches{where}: " + "; ".join(parts) + "." if parts else "Caches: no timed rows."


def ratio_summary(run: list[dict], tag: str) -> str | None:
    """In words: each baseline's time over ours, lowest and highest along one sweep."""
    provs = _providers_in(run)
    ours = [p for p in provs if _is_ours(p)]
    pts = list(_points(run, tag).values())
    parts = []
    for b in (p for p in provs if not _is_ours(p)):
        ratios = [v[b]["time"]["median_ms"] / me["time"]["median_ms"]
                  for v in pts if (me := _best(v, ours)) is not None and b in v and v[b]["status"] == "ok"]
        if ratios:
            parts.append(f"{b} {min(ratios):.2f}×–{max(ratios):.2f}×")
    if not parts:
        return None
    axis = SWEEP_AXIS.get(tag.split("@")[0], tag)
    return (f"Along the {axis} sweep, each baseline's time over ours (above 1: ours is faster): "
            + "; ".join(parts) + ".")


def base_gemm_spread(run: list[dict]) -> str | None:
    """A noise yardstick: the same base GEMM shape is timed at many points of a run; how far apart were they?"""
    by_shape: dict = defaultdict(dict)
    for r in run:
        if "base_gemm" in r:
            c = r["config"]
            by_shape[(c["T"], c["H_in"], c["H_out"], c["dtype"])][r["config"]["pattern"], c["N"], c["K"], c["R"]] = \
                r["base_gemm"]["median_ms"]
    shape, times = max(by_shape.items(), key=lambda kv: len(kv[1]), default=(None, {}))
    if len(times) < 3:
        return None
    lo, hi = min(times.values()), max(times.values())
    T, h_in, h_out, dt = shape
    return (f"Noise yardstick: the identical base GEMM (T={T}, {h_in}→{h_out}, {dt}) was timed at {len(times)} points "
            f"of this run and its median ranged from {_fmt_ms(lo)} to {_fmt_ms(hi)} ms ({hi / lo - 1:.0%} apart): "
            f"differences smaller than that are not evidence.")


def ops_section(run: list[dict], *, full: bool, image: str | None) -> str:
    out = [run_header(run), "", OPS_LEGEND, ""]
    tags = sweep_tags(run)
    shown = tags if full else [t for t in tags if t.split("@")[0] in ("T", "pattern")][:2]
    for tag in shown:
        out += [f"*{tag} sweep* ({_fixed(run, tag)}); median ms" + (" [p20, p80]" if full else "") + ":", "",
                ops_table(run, tag, spread=full), ""]
    forced = forced_table(run)
    if forced:
        out += [FORCED_LEGEND, "", forced, ""]
    out += [_cache_note(run), ""]
    summary = ratio_summary(run, next((t for t in tags if t.split("@")[0] == "T"), tags[0]))
    if summary:
        out += [summary, ""]
    noise = base_gemm_spread(run)
    if noise:
        out += [noise, ""]
    bad = [r for r in run if r["status"] in ("wrong", "error")]
    if bad:
        out.append(f"{len(bad)} provider runs were wrong or failed and were not timed: "
                   + "; ".join(sorted({f"{r['provider']}: {r['reason'][:120]}" for r in bad})) + ".")
        out.append("")
    if image:
        out += [f"![routed_lora on {run[0]['env']['device']}]({image})", ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- e2e tables
E2E_MODES = ("eager", "compiled")
OURS_E2E = ("ours-topk", "ours-router", "ours-names")
RIVALS_E2E = ("peft-mixed", "dense")


def e2e_records(records: list[dict]) -> list[dict]:
    """The e2e records written by the current suite (schema 2); older runs had other points and no modes."""
    return [r for r in records if r.get("suite") == "e2e" and r.get("schema") == E2E_SCHEMA]


def _point_key(r: dict) -> tuple:
    return (0 if r["phase"] == "prefill" else 1, r["batch"] * r["seq"], r["batch"])


def _point_label(r: dict) -> str:
    return f"prefill {r['batch']}×{r['seq']}" if r["phase"] == "prefill" else f"decode b{r['batch']}"


def _e2e_points(run: list[dict]) -> list[tuple]:
    """[(phase, batch, seq)] in display order: prefill by size, then decode by batch."""
    keys = {(r["phase"], r["batch"], r["seq"]): _point_key(r) for r in run}
    return sorted(keys, key=keys.get)


def _e2e_cells(run: list[dict]) -> dict:
    """{(phase, batch, seq, variant, mode): record}"""
    return {(r["phase"], r["batch"], r["seq"], r["variant"], r["mode"]): r for r in run}


def _not_timed(r: dict) -> str:
    if r["status"] == "graph_breaks":
        n = r.get("graph_breaks")
        return f"{n} graph breaks" if n is not None else "graph breaks (count n/a)"
    return {"skipped": "skip", "wrong": "**WRONG**"}.get(r["status"], r["status"])


def e2e_table(run: list[dict], mode: str = "eager", *, spread: bool = False) -> str:
    """One mode as a markdown table: a row per point, median ms ([p20, p80] with spread) and (time / base,
    same mode, same point)."""
    cells = _e2e_cells(run)
    variants = [v for v in VARIANT_COLORS if any(r["variant"] == v and r["mode"] == mode for r in run)]
    head = ["point", "threads"] + variants
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ph, b, s in _e2e_points(run):
        recs = [cells.get((ph, b, s, v, mode)) for v in variants]
        threads = next((r["threads"] for r in recs if r), "–")
        row = [_point_label({"phase": ph, "batch": b, "seq": s}), str(threads)]
        for v, r in zip(variants, recs):
            if r is None:
                row.append("–")
            elif r["status"] != "ok":
                row.append(_not_timed(r))
            else:
                t = r["time"]
                text = f"{_fmt_ms(t['median_ms'])} ms"
                if spread:
                    text += f" [{_fmt_ms(t['p20_ms'])}, {_fmt_ms(t['p80_ms'])}]"
                extras = []
                if v != "base" and r.get("vs_base") is not None:
                    extras.append(f"{r['vs_base']:.2f}×")
                if r.get("eager_over_compiled") is not None:
                    extras.append(f"eager / compiled {r['eager_over_compiled']:.2f}×")
                row.append(text + (f" ({'; '.join(extras)})" if extras else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(cells: dict, pt: tuple, variant: str, mode: str, field: str = "vs_base"):
    """(value, None) or (None, why it is missing) for one record's ratio field."""
    r = cells.get((*pt, variant, mode))
    if r is None:
        return None, "not run"
    if r["status"] != "ok":
        return None, _not_timed(r).strip("*")
    return r.get(field), None


def _check(measure: str, target: str, values: list[tuple], limit: float, below: bool) -> dict:
    """One target row from [(label, value or None, why missing)]: passes when every value is measured and
    on the right side of `limit`."""
    parts, ok = [], True
    for label, v, why in values:
        if v is None:
            parts.append(f"{label}: {why}")
            ok = False
        else:
            parts.append(f"{label} {v:.2f}×")
            ok = ok and (v <= limit if below else v >= limit)
    return {"measure": measure, "target": target, "measured": "; ".join(parts) or "not run", "ok": ok and bool(values)}


def _faster_than(cells: dict, pts: list[tuple], rival: str) -> dict:
    """The target row 'ours faster than `rival`' over every eager point and ours variant; `measured` lists
    the pairs where ours was not faster (or either was not timed)."""
    pairs, misses = 0, []
    for p in pts:
        theirs = cells.get((*p, rival, "eager"))
        for v in OURS_E2E:
            mine = cells.get((*p, v, "eager"))
            if mine is None or theirs is None:
                continue
            pairs += 1
            label = f"{_point_label(mine)} {v}"
            if mine["status"] != "ok" or theirs["status"] != "ok":
                misses.append(f"{label}: not timed")
            elif theirs["time"]["median_ms"] <= mine["time"]["median_ms"]:
                misses.append(f"{label} {theirs['time']['median_ms'] / mine['time']['median_ms']:.2f}×")
    measured = f"{pairs - len(misses)} of {pairs} faster" + (f"; not: {'; '.join(misses)}" if misses else "")
    return {"measure": f"{rival} time / ours, every point and ours variant (eager)", "target": "> 1× (ours faster)",
            "measured": measured, "ok": pairs > 0 and not misses}


def e2e_targets(run: list[dict]) -> list[dict]:
    """Issue 10's targets evaluated on one run: [{measure, target, measured, ok}]. The prefill targets are
    read at the largest prefill point, the decode ones at batch 1 and 8."""
    cells = _e2e_cells(run)
    pts = _e2e_points(run)
    pre = [p for p in pts if p[0] == "prefill"][-1:]
    dec = [p for p in pts if p[0] == "decode"]
    dec18 = [p for p in dec if p[1] in (1, 8)]
    lab = lambda p: _point_label({"phase": p[0], "batch": p[1], "seq": p[2]})  # noqa: E731
    rows = []
    for p in pre:
        rows.append(_check(f"{lab(p)}, per-token top-2 (ours-topk) / base", "≤ 1.25×",
                           [("eager", *_ratio(cells, p, "ours-topk", "eager"))], 1.25, True))
        rows.append(_check(f"{lab(p)}, adapter_names (ours-names) / base", "≤ 1.12×",
                           [("eager", *_ratio(cells, p, "ours-names", "eager"))], 1.12, True))
    for v in OURS_E2E:
        rows.append(_check(f"decode b1 and b8, {v} / base", "≤ 1.30×",
                           [(lab(p), *_ratio(cells, p, v, "eager")) for p in dec18], 1.30, True))
    for rival in RIVALS_E2E:
        rows.append(_faster_than(cells, pts, rival))
    for v in OURS_E2E:
        rows.append(_check(f"decode, {v}: eager time / compiled time", "≥ 1.5×",
                           [(lab(p), *_ratio(cells, p, v, "compiled", "eager_over_compiled")) for p in dec], 1.5, False))
        rows.append(_check(f"compiled {v} / compiled base", "≤ 1.25×",
                           [(lab(p), *_ratio(cells, p, v, "compiled")) for p in pts], 1.25, True))
    return rows


def targets_table(run: list[dict]) -> str:
    rows = e2e_targets(run)
    lines = ["| measure | target | measured (same run) | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['measure']} | {r['target']} | {r['measured']} | {'pass' if r['ok'] else '**miss**'} |")
    passed = sum(r["ok"] for r in rows)
    return "\n".join(lines) + f"\n\n{passed} of {len(rows)} targets met."


def _threads_note(run: list[dict]) -> str:
    by_phase = defaultdict(set)
    for r in run:
        by_phase[r["phase"]].add(r["threads"])
    return ", ".join(f"{ph} {'/'.join(map(str, sorted(t)))}" for ph, t in sorted(by_phase.items(), reverse=True))


def e2e_section(run: list[dict], *, image: str | None, spread: bool = False) -> str:
    r0 = run[0]
    c = r0["config"]
    backend = f"; ours ran backend `{r0['ours_backend']}`" if r0.get("ours_backend") else ""
    model = (f"random-init Llama-style model, {r0.get('params', 0) / 1e6:.0f}M parameters ({c['layers']} layers, "
             f"hidden {c['hidden']}, {c['dtype']}), {c['adapters']} adapters of rank {c['rank']} on all 7 linear "
             f"projections, top-{c['top_k']} routing, decode at position {c['decode_context']}{backend}")
    out = [run_header(run), "",
           f"*End to end* ({model}). Torch threads per phase: {_threads_note(run)} (one thread is timed with "
           f"thread CPU time, more with wall time). Every call is one forward with HF's static cache; all variants "
           f"of a point, eager and compiled, were timed interleaved; each was first checked against the same "
           f"function computed densely in float32. Compiled = `torch.compile(fullgraph=True, dynamic=False, "
           f"backend=\"{c['compile_backend']}\")`; a variant it cannot trace shows its graph breaks "
           f"instead of a time. Median latency{' [p20, p80]' if spread else ''} (time / base in the same mode and run):",
           ""]
    for mode in E2E_MODES:
        if any(r["mode"] == mode for r in run):
            out += [f"*{mode}*:", "", e2e_table(run, mode, spread=spread), ""]
    out += ["*Targets* (issue 10):", "", targets_table(run), ""]
    bad = [r for r in run if r["status"] in ("wrong", "error", "skipped", "graph_breaks")]
    if bad:
        out += ["Not timed: " + "; ".join(sorted({f"{r['variant']} {r['mode']} ({r['status']}): "
                                                 f"{r['reason'][:160]}" for r in bad})) + ".", ""]
    if image:
        out += [f"![end to end on {r0['env']['device']}]({image})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def plot_ops(run: list[dict], path: Path) -> Path:
    plt = _plt()
    tags = sweep_tags(run)
    line_tags = [t for axis in ("T", "N", "R", "K") for t in tags if t.split("@")[0] == axis and len(_points(run, t)) > 1]
    bar_tag = next((t for t in tags if t.startswith("pattern")), None)
    panels = line_tags[:3] + ([bar_tag] if bar_tag else [])
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    provs = _providers_in(run)
    for ax, tag in zip(axes.flat, panels):
        axis = SWEEP_AXIS[tag.split("@")[0]]
        pts = list(_points(run, tag).items())
        xs = [dict(k)[axis] for k, _ in pts]
        if tag == bar_tag:
            width = 0.8 / max(len(provs), 1)
            for i, p in enumerate(provs):
                ys = [(v[p]["time"]["median_ms"] if p in v and v[p]["status"] == "ok" else float("nan")) for _, v in pts]
                ax.bar([j + i * width for j in range(len(xs))], ys, width, label=f"ours ({p})" if _is_ours(p) else p,
                       color=COLORS.get(p))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs)
            ax.set_yscale("log")
            top = max(v[p]["time"]["median_ms"] for _, v in pts for p in provs if p in v and v[p]["status"] == "ok")
            ax.set_ylim(top=top * 8)  # headroom for the legend above the bars
            ax.legend(fontsize=7, ncol=3, loc="upper center")
        else:
            base = [v[next(iter(v))]["base_gemm"]["median_ms"] for _, v in pts]
            ax.plot(xs, base, "k--", label="base GEMM (x @ W.T)", linewidth=1.2)
            for p in provs:
                sel = [(x, v[p]["time"]) for x, (_, v) in zip(xs, pts) if p in v and v[p]["status"] == "ok"]
                if not sel:
                    continue
                lw = 2.4 if _is_ours(p) else 1.3
                ax.plot([s[0] for s in sel], [s[1]["median_ms"] for s in sel], marker="o", ms=3.5, lw=lw,
                        label=f"ours ({p})" if _is_ours(p) else p, color=COLORS.get(p))
                ax.fill_between([s[0] for s in sel], [s[1]["p20_ms"] for s in sel], [s[1]["p80_ms"] for s in sel],
                                color=COLORS.get(p), alpha=0.15, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_yscale("log")
        ax.set_xlabel({"T": "tokens T", "N": "adapters N", "R": "rank r", "K": "top-k", "pattern": "traffic pattern"}[axis])
        ax.set_ylabel("median time (ms), band p20–p80")
        ax.yaxis.set_major_formatter(_plain())
        ax.set_title(f"{tag}: {_fixed(run, tag)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"routed_lora on {run[0]['env']['device']} ({run[0]['env']['timestamp'][:10]})", fontsize=11)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(run: list[dict], path: Path) -> Path:
    """Time / base per point and variant, one panel per mode; a variant compile could not trace is marked."""
    plt = _plt()
    cells = _e2e_cells(run)
    pts = _e2e_points(run)
    modes = [m for m in E2E_MODES if any(r["mode"] == m for r in run)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        variants = [v for v in VARIANT_COLORS if v != "base" and (pts and any((*p, v, mode) in cells for p in pts))]
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs = [j + i * width for j in range(len(pts))]
            ys = [cells[(*p, v, mode)].get("vs_base") if (*p, v, mode) in cells and cells[(*p, v, mode)]["status"] == "ok"
                  else float("nan") for p in pts]
            ax.bar(xs, ys, width, label=v, color=VARIANT_COLORS[v])
            for x, p in zip(xs, pts):
                r = cells.get((*p, v, mode))
                if r is not None and r["status"] != "ok":
                    ax.text(x, 0.05, "graph breaks" if r["status"] == "graph_breaks" else r["status"], rotation=90,
                            fontsize=7, ha="center", va="bottom", color=VARIANT_COLORS[v])
        ax.axhline(1.0, color="black", lw=1, ls="--", label="base (same mode)")
        shown = [r["vs_base"] for (*_, m), r in cells.items() if m == mode and r["status"] == "ok" and r.get("vs_base")]
        ax.set_ylim(0, 1.15 * max(shown + [1.5]))
        ax.set_xlim(-width, len(pts) - 0.2)  # also when every bar of the panel is missing
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(pts))],
                      [_point_label({"phase": p[0], "batch": p[1], "seq": p[2]}) for p in pts], fontsize=8)
        ax.set_ylabel("median time / base")
        ax.set_title(f"{mode}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(f"end to end on {run[0]['env']['device']} ({run[0]['env']['timestamp'][:10]}), threads: "
                 f"{_threads_note(run)}", fontsize=10)
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------------------ report
GPU_PENDING = ("GPU numbers are still to be taken: no GPU was lent when these results were produced, so the "
               "`triton` and `cuda` backends and the GPU targets are not measured here. On a CUDA machine run "
               "`python -m molora_ops bench --suite ops --grid gpu` and `python -m molora_ops bench --suite e2e "
               "--grid gpu`, then `python -m molora_ops report`.")


def render(records: list[dict], out_dir: Path, *, readme_root: Path | None = None, plots: bool = True) -> dict:
    """Write out_dir/performance.md (every sweep) and out_dir/performance/README_section.md (the README's
    section, image paths relative to readme_root), plus PNG plots under out_dir/performance/."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "performance"
    readme_root = Path(readme_root or Path.cwd())
    ops_runs, e2e_runs = latest_runs(records, "ops"), latest_runs(e2e_records(records), "e2e")
    images: dict[str, Path] = {}
    if plots:
        for run in ops_runs:
            images[run[0]["run_id"]] = plot_ops(run, img_dir / f"ops_{_slug(run)}.png")
        for run in e2e_runs:
            images[run[0]["run_id"]] = plot_e2e(run, img_dir / f"e2e_{_slug(run)}.png")

    def rel(run, base: Path):
        p = images.get(run[0]["run_id"])
        return os.path.relpath(p, base) if p else None

    has_gpu = any(r[0]["env"]["device_type"] == "cuda" for r in ops_runs + e2e_runs)
    intro = ("Every number below comes from `python -m molora_ops bench`, is stored in `bench/results/*.jsonl`, and "
             "this text is generated by `python -m molora_ops report`. Each provider's output was checked against "
             "`molora_ops.reference` before it was timed; ratios compare numbers from the same run.")
    sections = {"full": ["# Performance", "", intro, ""], "readme": ["## Performance", "", intro, ""]}
    if not has_gpu:
        for s in sections.values():
            s += [f"> {GPU_PENDING}", ""]
    for run in ops_runs:
        sections["full"] += [f"## Kernel: routed_lora on {run[0]['env']['device']}", "",
                             ops_section(run, full=True, image=rel(run, out_dir))]
        sections["readme"] += [f"### Kernel: routed_lora on {run[0]['env']['device']}", "",
                               ops_section(run, full=False, image=rel(run, readme_root))]
    for run in e2e_runs:
        sections["full"] += [f"## End to end on {run[0]['env']['device']}", "",
                             e2e_section(run, image=rel(run, out_dir), spread=True)]
        sections["readme"] += [f"### End to end on {run[0]['env']['device']}", "",
                               e2e_section(run, image=rel(run, readme_root))]
    sections["readme"] += [f"All sweeps (N, k, r, hidden sizes, dtypes) with p20/p80: "
                           f"[{os.path.relpath(out_dir / 'performance.md', readme_root)}]"
                           f"({os.path.relpath(out_dir / 'performance.md', readme_root)}).", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    full_path, readme_path = out_dir / "performance.md", img_dir / "README_section.md"
    full_path.write_text("\n".join(sections["full"]))
    readme_path.write_text("\n".join(sections["readme"]))
    return {"full": full_path, "readme": readme_path, "images": list(images.values())}

"""``molora bench``: run a benchmark suite, append its results to a jsonl file and print a table.

    python -m molora_ops bench --suite ops --grid cpu            # kernel sweep, CPU default grid
    python -m molora_ops bench --suite e2e --grid smoke --quick  # end-to-end toy, seconds
    python -m molora_ops bench --suite e2e --grid cpu            # issue 10's CPU model, eager and compiled
    python -m molora_ops bench --suite train --grid cpu          # forward + backward: ours vs dense vs PEFT loop
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--suite", choices=("ops", "e2e", "train"), default="ops",
                        help="kernel sweep, end-to-end model, or training (forward + backward)")
    parser.add_argument("--grid", choices=("smoke", "cpu", "gpu", "gpu-quick"), default=None,
                        help="named grid (default: gpu on a CUDA device, else cpu; gpu-quick: bench/gpu_check.sh quick)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--providers", default=None,
                        help="ops: comma-separated providers (reference,peft-loop,dense,gather-bmm,torch,triton,cuda, and the "
                             "forced paths of ops_suite.FORCED: triton:grouped, triton:fused-pipelined, cuda:segmented, "
                             "..., and <backend>+ranks for per-adapter ranks); "
                             "e2e: variants (base,ours-topk,ours-router,ours-names,peft-mixed,dense; ours-*@<backend> "
                             "patches with that backend, e.g. ours-topk@triton); train: ours,dense,peft-loop")
    parser.add_argument("--out", default=None,
                        help="jsonl file to append to (default: bench/results/<suite>-<device>.jsonl)")
    parser.add_argument("--no-save", action="store_true", help="print the table without writing results")
    parser.add_argument("--threads", type=int, default=None,
                        help="ops: torch CPU threads (default: torch's own). On a shared, loaded machine 1 thread gives "
                             "far steadier numbers: multi-threaded ops stall whenever one of their threads is descheduled. "
                             "e2e: ignored; the grid sets the threads of each phase (cpu: prefill 2, decode 1)")
    parser.add_argument("--modes", default=None,
                        help="e2e: comma-separated modes, eager and/or compiled (default: both)")
    parser.add_argument("--compile-backend", default=None,
                        help="e2e: torch.compile backend of the compiled mode (default: inductor; 'eager' traces "
                             "with dynamo only, for fast checks)")
    parser.add_argument("--quick", action="store_true", help="a few timed calls per point (smoke runs)")
    parser.add_argument("--verify-only", action="store_true", help="ops: check providers against the reference, no timing")


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from molora_ops.benchmarking import results
    from molora_ops.benchmarking.env import device_slug
    from molora_ops.benchmarking.report import e2e_section, latest_runs, ops_table, run_header, sweep_tags
    from molora_ops.benchmarking.timing import TimingConfig

    if args.threads and args.suite == "ops":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid_name = args.grid or ("gpu" if device.type == "cuda" else "cpu")
    names = [n.strip() for n in args.providers.split(",")] if args.providers else None

    if args.suite == "train":
        return _run_train(args, device, grid_name, names)
    if args.suite == "ops":
        from molora_ops.benchmarking import ops_suite

        configs = ops_suite.grid(grid_name)
        chosen, _ = ops_suite.select_providers(device, names, interpreted=args.verify_only)
        bar = tqdm(total=len(configs) * len(chosen), desc="ops", unit="run")
        timing = TimingConfig.quick() if args.quick else TimingConfig()
        records = ops_suite.run_ops(configs, device, providers=names, timing=timing, grid_name=grid_name,
                                    verify_only=args.verify_only, progress=lambda d: (bar.set_postfix_str(d), bar.update(1)))
    else:
        import dataclasses

        from molora_ops.benchmarking import e2e_suite

        cfg = e2e_suite.grid(grid_name)
        if args.modes:
            cfg = dataclasses.replace(cfg, modes=tuple(m.strip() for m in args.modes.split(",")))
        if args.compile_backend:
            cfg = dataclasses.replace(cfg, compile_backend=args.compile_backend)
        variants = names or list(e2e_suite.VARIANTS)
        bar = tqdm(total=len(e2e_suite.points(cfg)), desc="e2e", unit="point")
        kwargs = {"timing": TimingConfig.quick()} if args.quick else {}
        records = e2e_suite.run_e2e(cfg, device, variants=variants, grid_name=grid_name,
                                    progress=lambda d: (bar.set_postfix_str(d), bar.update(1)), **kwargs)
    bar.close()

    if not args.no_save:
        out = args.out or str(results.default_results_dir() / f"{args.suite}-{device_slug(device)}.jsonl")
        n = results.append(out, records)
        print(f"appended {n} records to {out}")
    run_records = latest_runs(records, args.suite)[0]
    if args.suite == "ops":
        print(run_header(run_records))
        if args.verify_only:
            for r in run_records:
                c = r["config"]
                print(f"  {r['provider']:<11} T={c['T']:<5} N={c['N']:<4} k={c['K']} r={c['R']:<4} {c['dtype']:<9} "
                      f"{c['pattern']:<9} {r['status']:<8} {r.get('max_rel_err', r.get('reason', ''))}")
        else:
            for tag in sweep_tags(run_records):
                print(f"\n{tag} sweep (median ms):\n{ops_table(run_records, tag)}")
    else:
        print(e2e_section(run_records, image=None))
    bad = [r for r in records if r["status"] in ("wrong", "error")]  # graph breaks are a result, not a failure
    for r in bad:
        who = r.get("provider") or r.get("variant")
        print(f"{r['status'].upper()}: {who}: {r['reason']}")
    return 1 if any(r["status"] == "wrong" for r in records) else 0


def _run_train(args, device, grid_name: str, names) -> int:
    import dataclasses

    from tqdm.auto import tqdm

    from molora_ops.benchmarking import results, train_suite
    from molora_ops.benchmarking.env import device_slug

    g = train_suite.grid(grid_name)
    if args.threads:
        g = dataclasses.replace(g, threads=args.threads)
    if args.quick:
        g = dataclasses.replace(g, rounds=min(g.rounds, 3), warmup=1)
    bar = tqdm(total=len(g.points), desc="train", unit="point")
    records = train_suite.run_train(g, device, grid_name=grid_name, providers=names,
                                    progress=lambda d: (bar.set_postfix_str(d), bar.update(1)))
    bar.close()
    if not args.no_save:
        out = args.out or str(results.default_results_dir() / f"train-{device_slug(device)}.jsonl")
        print(f"appended {results.append(out, records)} records to {out}")
    env = records[0]["env"] if records else {}
    print(f"{env.get('device')}, torch {env.get('torch')}, {env.get('torch_threads')} threads, load "
          f"{env.get('loadavg_1m')}, git {str(env.get('git_sha'))[:7]}; {g.rounds} interleaved rounds, medians")
    print(train_suite.format_table(records))
    for name, (x, target, ok) in train_suite.check_targets(records).items():
        print(f"target {name}: ours {x:.2f}x dense (target >= {target}x) {'PASS' if ok else 'MISS'}")
    return 1 if any(r["status"] == "wrong" for r in records) else 0

"""Benchmark machinery shared by ``bench/bench_ops.py``, ``bench/bench_e2e.py`` and the ``bench`` / ``report``
commands.

    env        the machine, driver, library versions and git sha stamped on every result
    timing     median / p20 / p80 timers: perf_counter on CPU, do_bench or CUDA graphs on CUDA
    problems   routed-LoRA inputs with punica traffic patterns, and the minimum bytes / FLOPs model
    baselines  the providers: reference, peft-loop, dense, gather-bmm and ours (torch, triton, cuda)
    ops_suite  the kernel sweep over named grids (smoke, cpu, gpu)
    e2e_suite  a random-init Llama-style model with N adapters: prefill and decode latency per variant
    results    appending and reading ``bench/results/*.jsonl``
    report     the markdown tables and PNG plots rendered from results files

Nothing here is imported by ``molora_ops`` itself; transformers, peft and matplotlib are imported only by
the pieces that need them.
"""

#!/usr/bin/env bash
# Checks for a lent GPU machine (no network there). Two modes:
#
#   bash bench/gpu_check.sh quick             # the first run of a lease: <= 8 minutes, correctness first
#   bash bench/gpu_check.sh quick --dry-run   # print the steps and their timeouts, run nothing
#   bash bench/gpu_check.sh [full]            # everything (a later lease; several device calls with
#                                             # GPU_CHECK_STAGES=build,tests,sanitizer,bench)
#
# quick: each step runs under its own `timeout` (SIGINT first, so a benchmark keeps the points it finished,
# then KILL 10 s later) and appends its log to $OUT as it goes, so a device call stopped at its limit still
# returns every finished step. A step may also use the seconds that the steps before it left unused; the
# worst case is the sum of the timeouts (<= 480 s, checked by tests/test_gpu_check.py). Steps, in order:
#   env, build      -> build.log   nvidia-smi and versions; pip install -e . for sm_90 only
#                                  (MOLORA_CUDA_ARCHS=90). If the CUDA build fails, a pure-Python install
#                                  (MOLORA_SKIP_CUDA_BUILD=1) follows and the CUDA steps below are skipped;
#                                  the Triton steps still run.
#   compile         -> build.log   kernels/compile_check.py: every Triton kernel, heuristic and forced paths,
#                                  compiled for sm_90 in bf16/fp16/fp32 (registers, spills), in parallel
#   selfcheck       -> check.log   `molora selfcheck --device cuda`: every available backend, every dtype
#   tests           -> tests.log   pytest -m gpu (parity, forced Triton paths in bf16/fp16/fp32, CUDA,
#                                  CUDA-graph replay), pytest-timeout per test, pytest-xdist workers
#   memcheck        -> check.log   compute-sanitizer memcheck of the cuda backend, every forced path
#   racecheck       -> check.log   compute-sanitizer racecheck of the segmented shrink
#   bench_ops       -> bench.log, ops-gpu.jsonl   grid gpu-quick (T 1..4096, bf16, h 4096, r 16, N 32, k 2,
#                                  then mixed ranks 8/16/64 at T 1 and 256): baselines, triton and cuda (plans
#                                  built untimed), every forced path and +ranks; graph-timed points cycle a
#                                  weight pool larger than L2, do_bench points flush L2 (each row's `cache`)
#   bench_e2e       -> bench.log, e2e-gpu.jsonl   grid gpu-quick: 2 layers of Llama-8B's shape, prefill 8x512,
#                                  decode batch 1 and 8; base, ours (cuda, triton), PEFT mixed batch
#   bench_train     -> bench.log, train-gpu.jsonl   grid gpu-quick: forward + backward of one layer (h 512,
#                                  1024, 4096) and of a small model; ours vs dense vs the PEFT loop
# plus summary.txt (one line per step: rc, seconds, last lines of its log): 8 files in $OUT (the most that return).
#
# Committing the results (a session, on its own machine, after the device call returns): the jsonl records
# already carry device, versions and git sha (molora_ops.benchmarking.results). Append them to the files of
# that device and commit only those, e.g.
#   cat <files_at>/ops-gpu.jsonl >> bench/results/ops-cuda-nvidia-h200.jsonl
#   cat <files_at>/e2e-gpu.jsonl >> bench/results/e2e-cuda-nvidia-h200.jsonl
#   cat <files_at>/train-gpu.jsonl >> bench/results/train-cuda-nvidia-h200.jsonl
#   git commit -m "H200 quick check results (<git sha of the run>)" -- bench/results/*-cuda-nvidia-h200.jsonl
# then regenerate the README's performance section with `python -m molora_ops report`.
#
# full (unchanged): stages build, tests, sanitizer, bench; logs in a scratch folder, tarred into $OUT at the
# end, with $OUT/summary.txt:
#   1. install the package offline and build the extension (pip --no-build-isolation --no-deps -e .);
#      MOLORA_CUDA_ARCHS defaults to this GPU's compute capability only, to keep the build short
#   2. `molora info` (backends and why) and nvidia-smi
#   3. pytest -m gpu (the cuda backend's parity grid, in-place out, CUDA graphs; plus the other gpu tests)
#   4. compute-sanitizer memcheck (caching allocator off, so every buffer is its own allocation), racecheck
#      and synccheck over `molora selfcheck`
#      with each CUDA kernel path forced (MOLORA_CUDA_PATH)
#   5. the kernel and end-to-end benchmarks, and the report (table + plots) rendered from their results
# A failing step does not stop the later ones (in both modes); the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------------------------------------ quick
# name:timeout_seconds:log[:results] (files in $OUT: <log>.log, and <results> for the benchmarks). The order is
# the run order: correctness first.
QUICK_STEPS=(
  "env:10:build"
  "build:95:build"
  "compile:20:build"
  "selfcheck:35:check"
  "tests:140:tests"
  "memcheck:40:check"
  "racecheck:25:check"
  "bench_ops:65:bench:ops-gpu.jsonl"
  "bench_e2e:30:bench:e2e-gpu.jsonl"
  "bench_train:20:bench:train-gpu.jsonl"
)
# Every provider of ours builds its routing plan outside the timed call; "triton"/"cuda" are the shape
# heuristics, "<backend>:<path>" forces one path, "<backend>+ranks" passes per-adapter ranks (mixed-rank points).
QUICK_OPS_PROVIDERS="gather-bmm,dense,peft-loop,triton,triton:fused,triton:fused-pipelined,triton:gather,triton:dot,\
triton:grouped,triton:split1,triton:split4,triton:split16,triton:atomic4,triton+ranks,cuda,cuda:per_pair,\
cuda:segmented,cuda:fused,cuda+ranks"
QUICK_E2E_VARIANTS="base,ours-topk@cuda,ours-topk@triton,peft-mixed"

# Runs the cuda backend's ops (routed_lora, lora_shrink, lora_expand) on selfcheck's random cases with each
# forced path (argv[1], comma-separated) and dtype (argv[2]), checked against the reference: the workload of
# the compute-sanitizer steps.
SANITIZER_WORKLOAD='
import os, sys, torch, molora_ops as mo
from molora_ops import reference
from molora_ops.commands.selfcheck import CASES, TOLERANCE, _problem
g = torch.Generator().manual_seed(0)
bad = 0
for path in sys.argv[1].split(","):
    os.environ["MOLORA_CUDA_PATH"] = path
    for dtype in (getattr(torch, d) for d in sys.argv[2].split(",")):
        for case in CASES:
            (x, a, b), (xe, ae, be), ids, w, s = _problem(case, dtype, torch.device("cuda"), g)
            got = mo.routed_lora(x, a, b, ids, w, scaling=s, backend="cuda")
            h = mo.lora_shrink(x, a, ids, w, scaling=s, backend="cuda")
            got2 = mo.lora_expand(h, b, ids, backend="cuda")
            want = reference.routed_lora(xe, ae, be, ids.cpu(), w.cpu().double(), scaling=s.cpu().double())
            scale = 1.0 + want.abs().max().item()
            err = max((r.double().cpu() - want).abs().max().item() if r.numel() else 0.0 for r in (got, got2)) / scale
            bad += not err <= TOLERANCE[dtype]
            print(f"{path:<9} {dtype} T={case[0]:<4} rel err {err:.2e}", flush=True)
torch.cuda.synchronize()
sys.exit(1 if bad else 0)
'

quick_env() {
  nvidia-smi
  nvcc --version
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
  "$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -n 20
  return 0
}

quick_build() {  # CUDA build for sm_90; on failure a pure-Python install, so the Triton steps can still run
  if env PIP_NO_INDEX=1 MOLORA_CUDA_ARCHS=90 MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation \
      --no-deps -v -e . && "$PY" -m molora_ops info \
      && "$PY" -c 'import molora_ops, sys; sys.exit(0 if molora_ops.backends()["cuda"]["available"] else 1)'; then
    return 0
  fi
  echo "!!! CUDA build or load failed: pure-Python install, CUDA steps skipped"
  env PIP_NO_INDEX=1 MOLORA_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > /dev/null
  "$PY" -m molora_ops info
  return 1
}

quick_compile() {  # every Triton kernel and forced path compiled for sm_90 (registers, spills); no GPU needed
  env -u TRITON_INTERPRET "$PY" -m molora_ops.kernels.compile_check --arch 90 --dtype bf16 fp16 fp32 \
    --jobs "${GPU_CHECK_COMPILE_JOBS:-16}"
}

quick_selfcheck() { "$PY" -m molora_ops selfcheck --device cuda; }

quick_tests() {  # -x would stop at the first failure; a lease is rare, so collect up to 25 of them instead
  local skip_cuda=()
  [ "$CUDA_OK" = 1 ] || skip_cuda=(--ignore=tests/test_cuda_backend.py)  # test_cuda_graphs skips cuda itself
  "$PY" -m pytest -p no:cacheprovider -m gpu -q -rfEs --timeout=90 --maxfail=25 -n "${GPU_CHECK_WORKERS:-8}" \
    "${skip_cuda[@]}" tests
}

sanitizer() { command -v compute-sanitizer || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; }; }

quick_memcheck() {
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool memcheck --error-exitcode 99 --leak-check no \
    "$PY" -c "$SANITIZER_WORKLOAD" per_pair,segmented,fused bfloat16,float32
}

quick_racecheck() {
  "$(sanitizer)" --tool racecheck --error-exitcode 99 "$PY" -c "$SANITIZER_WORKLOAD" segmented bfloat16
}

without_cuda() {  # without_cuda LIST: the comma-separated LIST less the cuda providers when the build failed
  if [ "$CUDA_OK" = 1 ]; then echo "$1"; else echo "$1" | tr ',' '\n' | grep -v 'cuda' | paste -sd,; fi
}

quick_bench_ops() {
  "$PY" -m molora_ops bench --suite ops --grid gpu-quick --providers "$(without_cuda "$QUICK_OPS_PROVIDERS")" \
    --out "$OUT/$1"
}

quick_bench_train() {  # forward + backward (issue 13): ours vs dense vs the PEFT loop, 3 interleaved rounds per point
  "$PY" -m molora_ops bench --suite train --grid gpu-quick --quick --out "$OUT/$1"
}

quick_bench_e2e() {  # --quick: 3 interleaved rounds per point, each a do_bench median over 10 ms
  "$PY" -m molora_ops bench --suite e2e --grid gpu-quick --quick --providers "$(without_cuda "$QUICK_E2E_VARIANTS")" \
    --out "$OUT/$1"
}

skip_reason() {  # why step $1 cannot run now (empty: it can)
  case "$1" in
    memcheck|racecheck)
      [ "$CUDA_OK" = 1 ] || { echo "the CUDA build failed"; return; }
      [ -n "$(sanitizer)" ] || echo "compute-sanitizer not found" ;;
  esac
}

run_quick() {  # run_quick [--dry-run]
  local dry=0 total=0 banked=0 entry name limit log results start rc why
  [ "${1:-}" = "--dry-run" ] && dry=1
  OUT="${OUT:-./out}"
  if [ "$dry" = 0 ]; then
    mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
    : > "$OUT/summary.txt"
  fi
  export PYTHONUNBUFFERED=1 OUT PY QUICK_OPS_PROVIDERS QUICK_E2E_VARIANTS SANITIZER_WORKLOAD
  export -f sanitizer without_cuda quick_env quick_build quick_compile quick_selfcheck quick_tests quick_memcheck quick_racecheck \
    quick_bench_ops quick_bench_e2e quick_bench_train
  export CUDA_OK=0
  for entry in "${QUICK_STEPS[@]}"; do
    IFS=: read -r name limit log results <<< "$entry"
    total=$((total + limit))
    if [ "$dry" = 1 ]; then
      echo "step $name timeout=${limit}s log=$OUT/$log.log${results:+ results=$OUT/$results}"
      continue
    fi
    why="$(skip_reason "$name")"
    if [ -n "$why" ]; then
      echo "=== $name: skipped ($why)" | tee -a "$OUT/summary.txt" "$OUT/$log.log"
      banked=$((banked + limit))
      continue
    fi
    echo "=== $name (limit $((limit + banked))s) $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt" >> "$OUT/$log.log"
    start=$SECONDS
    timeout --signal=INT --kill-after=10 $((limit + banked)) bash -c "quick_$name $results" >> "$OUT/$log.log" 2>&1
    rc=$?
    banked=$((banked + limit - (SECONDS - start)))
    [ "$banked" -gt 0 ] || banked=0
    [ "$name" = build ] && [ "$rc" = 0 ] && CUDA_OK=1
    [ "$rc" = 0 ] || status=1
    { echo "    $name: rc=$rc$( { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && echo ' (timed out)') in $((SECONDS - start))s"
      tail -n 4 "$OUT/$log.log" | sed 's/^/      | /'; } | tee -a "$OUT/summary.txt"
  done
  if [ "$dry" = 1 ]; then
    echo "total timeout=${total}s"
    return 0
  fi
  echo "=== overall: $([ "$status" -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$OUT/summary.txt"
}

# ------------------------------------------------------------------------------------------------- full
run_full() {
  OUT="${OUT:-./out}"
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  LOGS="$(mktemp -d)"
  SUMMARY="$OUT/summary.txt"
  : > "$SUMMARY"
  status=0

  step() {  # step NAME COMMAND...: run, log, record pass/fail and the time taken
    local name="$1"; shift
    local start=$SECONDS
    echo "=== $name: $*" | tee -a "$SUMMARY"
    "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local line="    $name: rc=$rc in $((SECONDS - start))s (log: $name.log in gpu_check_logs.tgz)"
    echo "$line" | tee -a "$SUMMARY"
    tail -n 5 "$LOGS/$name.log" | sed 's/^/      | /' | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
  }

  STAGES=",${GPU_CHECK_STAGES:-build,tests,sanitizer,bench},"
  want() { [[ "$STAGES" == *",$1,"* ]]; }

  if [ -z "${MOLORA_CUDA_ARCHS:-}" ] && command -v nvidia-smi > /dev/null; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$cap" ] && export MOLORA_CUDA_ARCHS="$cap"
  fi
  echo "MOLORA_CUDA_ARCHS=${MOLORA_CUDA_ARCHS:-default}" | tee -a "$SUMMARY"

  want build && step env sh -c 'nvidia-smi; nvcc --version; "$0" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"' "$PY"
  want build && step build env PIP_NO_INDEX=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  step info "$PY" -m molora_ops info
  "$PY" -c 'import molora_ops, sys; sys.exit(0 if molora_ops.backends()["cuda"]["available"] else 1)' \
    || { echo "!!! the cuda backend is not available; see info.log" | tee -a "$SUMMARY"; status=1; }

  want tests && step pytest_gpu "$PY" -m pytest -m gpu -q -rs --junitxml="$LOGS/pytest_gpu.xml" tests
  want tests && step pytest_cuda_backend "$PY" -m pytest -q -rs tests/test_cuda_backend.py

  if ! want sanitizer; then
    :
  elif command -v compute-sanitizer > /dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    for path in per_pair segmented fused; do
      step "memcheck_$path" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 MOLORA_CUDA_PATH="$path" "$SAN" --tool memcheck --error-exitcode 99 \
        --leak-check no "$PY" -m molora_ops selfcheck --device cuda
    done
    step racecheck_segmented env MOLORA_CUDA_PATH=segmented "$SAN" --tool racecheck --error-exitcode 99 \
      "$PY" -m molora_ops selfcheck --device cuda
    step synccheck_fused env MOLORA_CUDA_PATH=fused "$SAN" --tool synccheck --error-exitcode 99 \
      "$PY" -m molora_ops selfcheck --device cuda
  else
    echo "!!! compute-sanitizer not found: memcheck skipped" | tee -a "$SUMMARY"
    status=1
  fi

  if want bench; then
    step bench_ops "$PY" bench/bench_ops.py --grid gpu --providers reference,peft-loop,dense,gather-bmm,torch,triton,cuda \
      --out "$OUT/ops-gpu.jsonl"
    step bench_e2e "$PY" bench/bench_e2e.py --grid gpu --out "$OUT/e2e-gpu.jsonl"
    step report "$PY" -m molora_ops report --results "$OUT/ops-gpu.jsonl" --results "$OUT/e2e-gpu.jsonl" \
      --out "$LOGS/report"
    tar czf "$OUT/report.tgz" -C "$LOGS" report
  fi
  tar czf "$OUT/gpu_check_logs.tgz" -C "$LOGS" --exclude=report .

  echo "=== overall: $([ "$status" -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
  return "$status"
}

PY="${PYTHON:-python3}"   # on the lent machines python3 is the interpreter that holds the CUDA torch
status=0
case "${1:-full}" in
  quick) shift; run_quick "$@" || status=1 ;;
  full) run_full ;;
  *) echo "usage: bash bench/gpu_check.sh [quick [--dry-run] | full]" >&2; exit 2 ;;
esac
exit "$status"

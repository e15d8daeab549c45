#!/usr/bin/env bash
# One-shot check of the CUDA backend on a lent GPU machine (no network there).
#
#   bash bench/gpu_check.sh            # logs and results under $OUT (default ./out)
#
#   GPU_CHECK_STAGES=build,tests bash bench/gpu_check.sh   # only some stages (one device call is <= 10 min)
#
# Stages (build, tests, sanitizer, bench), each step logged to a scratch folder, with a summary in
# $OUT/summary.txt:
#   1. install the package offline and build the extension (pip --no-build-isolation --no-deps -e .);
#      MOLORA_CUDA_ARCHS defaults to this GPU's compute capability only, to keep the build short
#   2. `molora info` (backends and why) and nvidia-smi
#   3. pytest -m gpu (the cuda backend's parity grid, in-place out, CUDA graphs; plus the other gpu tests)
#   4. compute-sanitizer memcheck (caching allocator off, so every buffer is its own allocation), racecheck
#      and synccheck over `molora selfcheck`
#      with each CUDA kernel path forced (MOLORA_CUDA_PATH)
#   5. the kernel and end-to-end benchmarks, and the report (table + plots) rendered from their results
# The device tool brings back at most 8 files from $OUT, so $OUT gets only summary.txt, the results jsonl
# files, the rendered report and one tarball of every log; the logs themselves live in a scratch folder.
# A failing step does not stop the later ones; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"   # on the lent machines python3 is the interpreter that holds the CUDA torch
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
exit "$status"

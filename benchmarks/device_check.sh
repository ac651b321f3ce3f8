#!/usr/bin/env bash
# One-shot accelerator check, 7-8 minutes on one GPU (H100/H200) or TPU: versions and devices, the kernel
# numerics tests compiled for the real backend (AFPQ_KERNELS_NATIVE=1: interpret=False, other backends' kernels
# skipped), then benchmarks/quantized_matmul.py (every applicable kernel checked against "xla", then timed).
# Everything goes to one markdown report, $OUT/report.md (default OUT=results/device).
#
#   bash benchmarks/device_check.sh            # on the accelerator machine, from the repository root
#   bash benchmarks/device_check.sh --dry-run  # CPU: the same steps on tiny shapes, interpret mode (CI runs this)
#   STEPS="tests sweep lookup" B_SWEEP=150 bash benchmarks/device_check.sh   # a subset; B_SWEEP: the sweep's budget (s)
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-results/device}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
status=0

step() {  # step TITLE TIMEOUT_S COMMAND...: runs the command, its output into the report as a code block or table
  local title=$1 limit=$2; shift 2
  echo; echo "## $title"; echo; echo "\`$*\`"; echo
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1
  local rc=$?
  echo; echo "(exit $rc, $((SECONDS - t0)) s)"
  [ $rc -ne 0 ] && status=1
  return 0
}

isolated_tests() {  # isolated_tests -k EXPR: every selected test in its own process, 12 at a time (a CUDA fault
  # such as CUDA_ERROR_MISALIGNED_ADDRESS poisons the process it happens in: every later test there fails too)
  local ids
  ids=$($PY -m pytest --collect-only -q -p no:cacheprovider tests/kernels/test_quantized_matmul.py "$@" | grep '::')
  echo "$ids" | xargs -P 12 -I{} sh -c 'out=$("$0" -m pytest -q -p no:cacheprovider "$1" 2>&1); rc=$?
    if [ $rc -eq 0 ] && echo "$out" | grep -q " passed"; then echo "passed  $1"; elif [ $rc -eq 0 ]; then echo "skipped $1"; else echo "FAILED  $1"; echo "$out" | grep -m2 -E "^E  |Error" | cut -c1-220 | sed "s/^/        /"; fi; exit $rc' "$PY" {}
}
export -f isolated_tests
export PY

if [ $DRY -eq 1 ]; then
  export JAX_PLATFORMS=cpu
  TESTS=(-k "test_formats_match_reference and triton-int4-a-g128")
  BENCH=(--k 256 --n 256 --reps 2 --stack 2 --impls xla)  # the script, not the CPU kernels (tested elsewhere)
  SWEEP=(--m 1 --formats int4 nf3)
  LOOKUP=(--impls xla)  # the step's plumbing only: Triton does not run on CPU outside interpret mode
  TUNE_IMPLS=xla_scan TUNE=(--m 1 --k 512 --n 256 --formats int4 --reps 1) T_TUNE=120 B_TUNE=30
  T_TESTS=300 T_SWEEP=300 T_SMALL=120 B_SMALL=60; B_SWEEP=${B_SWEEP:-200}
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-} AFPQ_KERNELS_NATIVE=1
  TESTS=(-k "match_reference or vmap")
  BENCH=(--reps 20)
  SWEEP=(--m 1 16 128 1024 --formats nf4 fp4_e2m1 nf3 int4)
  LOOKUP=(--impls triton --triton-lookup both)
  TUNE_IMPLS=${TUNE_IMPLS:-$( [ -n "$(command -v nvidia-smi)" ] && echo triton || echo mosaic_tpu )}
  TUNE=(--m 1 16 128 --formats nf4 int4 fp4_e2m1 nf3) T_TUNE=${T_TUNE:-540} B_TUNE=${B_TUNE:-480}
  # Budgets (B_*) stop a benchmark step from starting new cases; a case takes up to ~20 s to compile, hence
  # time limits (T_*) 40-60 s above them. Typically 7-8 minutes in all; the limits cap it at 10.
  T_TESTS=150 T_SMALL=60 B_SMALL=25; B_SWEEP=${B_SWEEP:-130}; T_SWEEP=$((B_SWEEP + 60))
fi
set -o pipefail
STEPS=" ${STEPS:-tests sweep lookup g64 channel smollm2} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

{
  echo "# afpq-jax device check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  step "versions and devices" 120 $PY -c "import jax, jaxlib, platform; print('python', platform.python_version(), '| jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices()); print([d.device_kind for d in jax.devices()])"
  command -v nvidia-smi >/dev/null && step "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  want tests && step "kernel tests (native on the accelerator; interpret mode in the dry run)" $T_TESTS \
    bash -c 'isolated_tests "$@"' isolated_tests "${TESTS[@]}"
  want sweep && step "decode/prefill sweep, g128, asym and sym" $T_SWEEP \
    $PY -m benchmarks.quantized_matmul --markdown "${BENCH[@]}" "${SWEEP[@]}" --schemes asym sym --budget-s $B_SWEEP
  want lookup && step "Triton codebook decode: table lookup vs select tree" $T_SMALL $PY -m benchmarks.quantized_matmul --markdown "${BENCH[@]}" "${LOOKUP[@]}" --m 1 16 --formats nf4 --budget-s $B_SMALL
  want g64 && step "group 64" $T_SMALL $PY -m benchmarks.quantized_matmul --markdown "${BENCH[@]}" --m 1 16 --formats nf4 int4 --group-size 64 --no-profile --budget-s $B_SMALL
  want channel && step "per-channel" $T_SMALL $PY -m benchmarks.quantized_matmul --markdown "${BENCH[@]}" --m 1 16 --formats nf4 --group-size 0 --no-profile --budget-s $B_SMALL
  want smollm2 && step "SmolLM2-135M MLP shape (K=576, N=1536)" $T_SMALL $PY -m benchmarks.quantized_matmul --markdown "${BENCH[@]}" --m 1 16 --k 576 --n 1536 --formats nf3 nf4 --no-profile --budget-s $B_SMALL
  # Not in the default steps (minutes per kernel): STEPS="tune" records measured tilings in $OUT/tuned_configs.json
  # (copy it to afpq_jax/_src/kernels/quantized_matmul/tuned_configs.json to ship it).
  want tune && for impl in $TUNE_IMPLS; do step "autotune $impl" $T_TUNE $PY -m benchmarks.autotune --impl $impl "${TUNE[@]}" --out "$OUT/tuned_configs.json" --budget-s $B_TUNE; done
  echo; echo "device check: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED (see above)')"
  exit $status
} 2>&1 | tee "$REPORT"

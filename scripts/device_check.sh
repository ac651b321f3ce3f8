#!/usr/bin/env bash
# One-shot accelerator check (run it on a TPU/GPU machine from the repository root; needs jax, flax, orbax there).
# Every kernel that accepts a shape is checked against the "xla" reference, then timed against dense matmuls of
# the same shape (scripts/bench_quantized_matmul.py). Results go to $OUT (default results/device/).
set -u
OUT=${OUT:-results/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$OUT/env.txt"
bench() {
  echo; echo "### bench_quantized_matmul $*"
  timeout "${BENCH_TIMEOUT:-120}" python3 scripts/bench_quantized_matmul.py --markdown --reps "${REPS:-50}" "$@" 2>&1
  echo "(exit $?)"
}
{
  bench --m 1 16 128 --formats int4 fp4_e2m1 nf4 nf3 int3 int2
  bench --m 1 16 --formats int4 nf4 --sym
  bench --m 1 16 --formats nf4 int4 --group-size 64
  bench --m 1 16 --formats nf4 --group-size 0
  bench --m 1 16 --formats fp4_e2m1 --x-dtype float32
  bench --m 1 16 --k 576 --n 1536 --formats nf3 nf4   # SmolLM2-135M's MLP shape
} 2>&1 | tee "$OUT/bench.md"

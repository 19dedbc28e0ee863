#!/usr/bin/env bash
# On a machine with a GPU, from the checkout: every check CPU CI cannot make, logs in OUT_DIR.
#   bash bench/gpu_check.sh OUT_DIR [bench suite: smoke|quick|full, default quick]
# FlashInfer joins the benchmark when importable (FLASHINFER_CUDA_ARCH_LIST=9.0 on Hopper).
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [suite]}
suite=${2:-quick}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
status=0
run() {  # name, command...: log to OUT_DIR/name.log, print its last lines
  local name=$1; shift
  "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc"; tail -n 3 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
run tests python3 -m pytest -q -rf -p no:cacheprovider
# every kernel, ragged and paged caches, lengths off the tile size, every scheme and dtype
subset="counts_beyond or long_context or (santa_draws and (bfloat16-128-12-4-16 or float32-256-4-1-256 \
or float16-64-6-2-1 or bfloat16-128-10-5-7)) or (exact_matches and (float16-64-6-2-1 or float32-64 \
or bfloat16-128-12-4-16 or float32-256-4-1-256 or bfloat16-128-32-8)) \
or (pass_one_queue and 256 and (bfloat16-128-12-4-16 or float16-64-6-2-1)) \
or (part_tasks and systematic)"
# the ternary-query kernel: paged and contiguous, 16-bit and float32, SANTA and exact p V on top
key_subset="(scores_equal and stratified-mean and (bfloat16-128-16-1-16 or float32-64-6-3-4 or float16-64-8-2)) \
or (combined and ((bfloat16-128-16-1-16 and iid) or (float32-64-6-3-4 and tile))) or (feature_major_exact and float16-256)"
# 16-bit exact at head_dim 256 (two warps share a ring on a named barrier): memcheck only, since
# racecheck misreads several named barriers in one block (bench/NOTES.md, head_dim 256)
shared_rings="exact_matches and (float16-256-8-2 or bfloat16-256-8-2)"
for tool in memcheck racecheck; do
  cases=$subset; [ "$tool" = memcheck ] && cases="$subset or ($shared_rings)"
  run "$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_decode.py -k "$cases"
  run "$tool-ternary" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_bernoulli.py -k "$key_subset"
done
run bench python3 -m bench.decode --suite "$suite" --out "$out"
run bench-ternary python3 -m bench.bernoulli --out "$out"
exit $status

#!/usr/bin/env bash
# One call on the GPU machine (offline): build rlfuse with what is installed there,
# run the GPU tests, print the GPU benchmark table.  Full logs go to $OUT when set.
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/rlfuse-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (pip install --no-build-isolation --no-deps -e .)"
t0=$(date +%s)
if ! RLFUSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 ))s"
python3 -m rlfuse info

echo "== tests (all; CUDA and compiled-Triton cases run here)"
python3 -m pytest tests -q -p no:cacheprovider --maxfail=40 \
  2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
python3 -m rlfuse bench logprob --device cuda --backends cuda,triton --out "$OUT" \
  2>&1 | tee "$OUT/bench.log"
for suite in losses advantages linear_logprob preference search; do
  timeout 150 python3 -m rlfuse bench "$suite" --device cuda --quick --backends cuda,triton \
    2>&1 | tee -a "$OUT/bench.log"
done
echo "tests exit code: $tests_rc"
exit "$tests_rc"

#!/usr/bin/env bash
# One call on the GPU machine (offline): build rlfuse with what is installed there, run the
# GPU-relevant tests, print the GPU benchmark tables.  Every phase has its own deadline
# (the device lease is short); full logs go to $OUT when set.
#   bash benchmarks/gpu_check.sh [TOTAL_SECONDS]      (from the repository root; default 560)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/rlfuse-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL="${1:-560}"
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# a phase's timeout: its share, at most what is left minus a reserve for the later phases
budget() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); (( l < want )) && want=$l; (( want < 5 )) && want=5; echo "$want"; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

echo "== build (pip install --no-build-isolation --no-deps -e ., sm_90 only)"
t0=$(date +%s)
if ! RLFUSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
    timeout "$(budget 260 200)" python3 -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 ))s"
python3 -m rlfuse info 2>&1 | tee "$OUT/info.log" | tail -12

echo "== tests (ops, reliability, search, models: the CUDA and compiled-Triton cases)"
t0=$(date +%s)
# -v: every test's outcome is written as it ends ("[gw3] FAILED tests/..."), so a run cut
# short by its deadline still names its failures (-q prints them only in the final summary,
# which a killed run never reaches: 2026-11-28, 52 failures on the H200 lost that way)
# -k: only the tests whose ids name a GPU backend or that carry the gpu mark (~460 of ~2070
# there; the CPU-only rest is what CI runs anyway, and the whole set did not finish in 230 s)
timeout "$(budget 300 120)" python3 -m pytest tests/ops tests/reliability tests/search \
  tests/models -k "cuda or triton or gpu" -v -p no:cacheprovider -n 14 --maxfail=200 \
  -W ignore -rfE \
  > "$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' \
  | sort -u | cut -c1-200 | head -80
grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | sort -u > "$OUT/failed.txt"
tail -3 "$OUT/tests.log"
echo "tests took $(( $(date +%s) - t0 ))s, exit code $tests_rc"

echo "== benchmarks"
# (few files under $OUT: the device tool returns only a handful; no --out json / png)
bench() {  # bench SECONDS SUITE ARGS...
  local s=$1; shift
  timeout "$(budget "$s" 5)" python3 -m rlfuse bench "$@" --device cuda > "$OUT/bench.tmp" 2>&1
  local rc=$?
  cat "$OUT/bench.tmp" >> "$OUT/bench.log"; rm -f "$OUT/bench.tmp"
  echo "-- $1 (exit $rc)"; grep -v "^#" "$OUT/bench.log" | tail -25
}
bench 110 linear_logprob --no-compile --backends cuda,triton
bench 45 losses --quick --backends cuda,triton
bench 45 advantages --quick --backends cuda,triton
bench 45 logprob --quick --backends cuda,triton
bench 40 search --quick --backends cuda
if (( $(left) > 40 )); then   # where the small ops' GPU time goes (host launches, syncs)
  timeout "$(budget 60 3)" python3 benchmarks/gpu_profile.py > "$OUT/profile.log" 2>&1
  echo "-- profile (exit $?): $OUT/profile.log"
fi
echo "total $(( $(date +%s) - START ))s; tests exit code: $tests_rc"
exit "$tests_rc"

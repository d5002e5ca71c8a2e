#!/usr/bin/env bash
# pycomm on a GPU machine, made to fit short device leases (`make gpu-check STEP=...`).
#   bash bench/gpu_check.sh build   # pip install -e . with the CUDA library, into the machine's python
#   bash bench/gpu_check.sh test    # tests/cuda and tests/kernels with compiled Triton, one pytest per file
#   bash bench/gpu_check.sh bench   # collectives on CUDA tensors and the kernels against cuBLAS/SDPA/eager
#   bash bench/gpu_check.sh all     # the three, each step under its own time limit (about 9 minutes)
# Logs, JSON and summary.md (a markdown table of everything, bench/gpu_summary.py) go to $OUT (the
# device tool's output folder) or bench/results/<date>-<gpu>/ (commit that folder).
# Each test file runs in its own pytest under its own limit, with pytest-timeout's thread method,
# so a hang prints its stacks and costs one file's results, not the whole run's (2026-11-26: one
# `timeout pytest tests/cuda tests/kernels` killed at its limit left a log with no failure details).
set -uo pipefail
py=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^NVIDIA //; s/ .*//' \
  | tr 'A-Z' 'a-z')
out=${OUT:-bench/results/$(date -u +%F)-${gpu:-gpu}}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
step=${1:-all}
FILE_LIMIT=${FILE_LIMIT:-150}   # seconds per test file
T0=$(date +%s)
say() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }

env_info() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"
    nvcc --version 2>&1 | tail -1
  } 2>&1 | tee "$out/env.txt"
}

build() {
  env_info
  if [ -z "${NCCL_HOME:-}" ]; then  # the nvidia-nccl-cu* wheel, wherever the image put it
    for d in $($py -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null); do
      h=$(find "$d" -name nccl.h 2>/dev/null | head -1)
      if [ -n "$h" ]; then export NCCL_HOME; NCCL_HOME=$(dirname "$(dirname "$h")"); break; fi
    done
  fi
  rm -f pycomm/*.so  # built here for another python or GPU
  if ! PYCOMM_CUDA=1 PYCOMM_CUDA_ARCH="${PYCOMM_CUDA_ARCH:-90}" MAX_JOBS=16 \
       $py -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1; then
    grep -n "error" "$out/build.log" | head -30; say "BUILD FAILED (see build.log)"; return 1
  fi
  $py -c "import pycomm, pycomm._C; from pycomm import _cuda; print('pycomm built; CUDA:', _cuda.status(), _cuda.versions())" 2>&1 \
    | tee -a "$out/build.log"
  say "build done"
}

tests() {
  local f name rc
  for f in tests/cuda/test_*.py tests/kernels/test_*.py; do
    name=$(basename "$f" .py)
    timeout -k 10 "$FILE_LIMIT" $py -m pytest "$f" -q -rfEs --timeout 90 --timeout-method=thread \
      -p no:cacheprovider --junitxml "$out/$name.xml" > "$out/$name.log" 2>&1
    rc=$?
    say "$f: rc=$rc $(grep -E '[0-9]+ (passed|failed|error)' "$out/$name.log" | tail -1)"
    grep -E "^(FAILED|ERROR)|Timeout" "$out/$name.log" | head -10
  done
}

bench() {
  timeout 120 $py -m bench --device cuda -n 2 -e 16M --no-progress --plot '' --json "$out/collectives.json" \
    > "$out/bench-collectives.txt" 2>&1; say "bench collectives rc=$?"
  grep -E "^# (all_reduce|Avg)|^ +(8|1048576|16777216) " "$out/bench-collectives.txt" | head -40
  timeout 240 $py -m bench kernels --quick --json "$out/kernels.json" > "$out/bench-kernels.txt" 2>&1
  say "bench kernels rc=$?"; tail -60 "$out/bench-kernels.txt"
}

case "$step" in
  build) build ;;
  test) tests ;;
  bench) bench ;;
  all) build && tests && bench ;;
  *) echo "usage: bench/gpu_check.sh build|test|bench|all"; exit 2 ;;
esac
rc=$?
[ -f "$out/env.txt" ] || env_info > /dev/null
$py -m bench.gpu_summary "$out"
exit $rc

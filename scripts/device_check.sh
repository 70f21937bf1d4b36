#!/usr/bin/env bash
# One device call: the test suite on the GPU (gpu marker + the Triton suite on CUDA), then the benchmark.
# Usage on the device machine, from the repo root: bash scripts/device_check.sh [bench args...]
# RUN_TESTS=0 / RUN_BENCH=0 skip a half; TESTS (paths) and TEST_FILTER (-k) narrow the tests.
# The official dumps do not travel with the repo: copy them (without the 4 MB .flash.bin files, to
# stay under the device's 64 MiB carry limit) into the ignored folder refdumps/ and carry it:
#   mkdir -p refdumps && for f in ../shared/refdumps/*; do case $f in *.flash.bin) ;; *) cp "$f" refdumps/;; esac; done
set -uo pipefail
export PYTHONPATH=src SAGEFLASH_REFDUMPS=${SAGEFLASH_REFDUMPS:-refdumps}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${RUN_TESTS:-1}" = 1 ]; then
  python -m pytest ${TESTS:-tests} -q -p no:cacheprovider -rfs --tb=short --durations=15 -s \
    -k "${TEST_FILTER:-}" 2>&1 | tee "$OUT/pytest.txt" | tail -40
fi
if [ "${RUN_BENCH:-1}" = 1 ]; then
  python -m sageflash bench "$@" --json "$OUT/bench.json" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" | tail -60
fi

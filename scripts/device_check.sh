#!/usr/bin/env bash
# One device call: GPU tests (gpu marker + the Triton suite on CUDA), then the benchmark.
# Usage on the device machine, from the repo root: bash scripts/device_check.sh [bench args...]
set -uo pipefail
export PYTHONPATH=src SAGEFLASH_REFDUMPS=${SAGEFLASH_REFDUMPS:-refdumps}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest tests -x -q -p no:cacheprovider -rs --durations=15 -s -k "${TEST_FILTER:-}" 2>&1 | tee "$OUT/pytest.txt" | tail -40
if [ "${RUN_BENCH:-1}" = 1 ]; then
  python -m sageflash bench "$@" --json "$OUT/bench.json" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.txt" | tail -60
fi

#!/usr/bin/env bash
# The GPU check, once, on a lent H100/H200: one folder, one table, under 10 minutes.
#
#   bash bench/gpu.sh            (on a machine with CUDA; nothing is downloaded)
#   bash bench/gpu.sh --tiny     (CPU, tiny models: what `make test` runs so the script cannot rot)
#
# First the GPU-marked tests (lean decode == model forward on CUDA, CUDA graphs == eager, plan vs
# max_memory_allocated), then bench/gpu.py: the shipped 4B config for 2 steps against its plan, 0.6B
# decode eager and compiled against the bandwidth bound, training MFU, TRL beside tsopsd, top kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if [ "${1:-}" != "--tiny" ]; then
  "$PY" -m pytest -q -s -m gpu tests/test_decode.py tests/test_host_traffic.py tests/test_plan.py 2>&1 | tail -15
fi
PYTHONUNBUFFERED=1 "$PY" bench/gpu.py "$@"

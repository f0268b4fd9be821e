#!/usr/bin/env bash
# One prepared GPU run (H100/H200): the fused kernels' correctness at small and LLaMA shapes, then
# the benchmark (kernels at the four LLaMA shapes in bf16, plus a LLaMA-7B decoder block).
# Needs only torch + Triton on the machine (dyt-core has no other dependency).
#   scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
python -m pip install --quiet --no-deps --no-build-isolation -e packages/dyt-core 2>/dev/null \
  || export PYTHONPATH="$PWD/packages/dyt-core/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pip install --quiet pytest 2>/dev/null || true
python -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_dyt_layer.py 2>&1 | tail -15 | tee "$out/tests.txt"
python -m dyt.bench --block --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"

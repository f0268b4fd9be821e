#!/usr/bin/env bash
# One prepared GPU run (H100/H200), in this order (correctness first: a run cut short by the device's
# per-command limit loses timings, not the checks):
#   1. gpu.txt: nvidia-smi, torch / CUDA / Triton versions, the commit.
#   2. selfcheck.txt: every backend (eager, compiled, fused) against a float64 reference in
#      fp32/bf16/fp16/fp64, forward and gradients, residual add + DyT with one output used, double
#      backward, at small odd shapes and at LLaMA shapes (python -m dyt.selfcheck: plain Python,
#      PASS/FAIL per check, last line "N passed, M failed").
#   3. tests.txt: tests/test_fused.py and tests/test_dyt_layer.py, when pytest is installed.
#   4. The benchmark (bench.json, bench.txt): kernels at the four LLaMA shapes in bf16, plus a
#      LLaMA-7B decoder block.
#   5. tune.txt (tune.json): scripts/tune_fused_tiles.py, the fused kernels' tile sweep: chosen on
#      LLaMA-7B shapes and a 13B-wide one, confirmed on held-out shapes beside the shipped
#      constants (GPU only; stopped after TUNE_SECONDS, default 240; tune.json gets the selection's
#      timings once that stage ends).
# Needs only Python with torch + Triton: nothing is installed, nothing comes from a registry (dyt-core
# is used from this checkout through PYTHONPATH). A failed step never stops the later ones: each
# step's exit status goes to status.txt, and the script exits 1 when any step failed.
# Without a GPU the GPU-only parts are skipped (noted in the files): the benchmark is a short CPU
# smoke run, the tile sweep does not run, and the fused checks run at small shapes in Triton's
# interpreter.
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else runs/gpu; PYTHON picks the interpreter)
set -uo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
  -*) echo "gpu_check.sh: unknown option $1 (usage: scripts/gpu_check.sh [OUT_DIR])" >&2; exit 2 ;;
esac
[[ $# -le 1 ]] || { echo "gpu_check.sh: one OUT_DIR at most, got $#: $*" >&2; exit 2; }
out=${1:-${OUT:-runs/gpu}}
# every step's log goes there: a folder that cannot be made would leave a whole device run without them
mkdir -p "$out" 2>/dev/null && out=$(cd "$out" && pwd) \
  || { echo "gpu_check.sh: cannot make the folder $out for the logs (a file is there, or no permission)" >&2; exit 2; }
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD/packages/dyt-core/src${PYTHONPATH:+:$PYTHONPATH}"
: >"$out/status.txt"
failed=0

step() {  # step NAME LOG COMMAND...: run it, output to the terminal and OUT/LOG; record its status
  local name=$1 log=$2
  shift 2
  echo "== $name: $*" | tee "$out/$log"
  "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
  echo "$name $rc" >>"$out/status.txt"
  [ "$rc" -eq 0 ] || failed=1
}

if "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then gpu=1; else gpu=0; fi

info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && nvidia-smi
  else
    echo "nvidia-smi not found: no NVIDIA GPU here, GPU-only steps skipped"
  fi
  git log -1 --format='commit %H %cd' 2>/dev/null && git status --short 2>/dev/null | sed 's/^/  changed: /'
  "$py" -c "
import torch
print('python', __import__('platform').python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (torch sees no CUDA device)')
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton not installed')
"
}
step info gpu.txt info

if [ "$gpu" = 1 ]; then
  step selfcheck selfcheck.txt "$py" -m dyt.selfcheck
else
  step selfcheck selfcheck.txt env TRITON_INTERPRET=1 "$py" -m dyt.selfcheck
fi

if "$py" -c "import pytest" 2>/dev/null; then  # tests/conftest.py sets TRITON_INTERPRET without a GPU
  step pytest tests.txt "$py" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_dyt_layer.py
else
  echo "pytest not installed: tests skipped (selfcheck.txt has the correctness checks)" | tee "$out/tests.txt"
  echo "pytest skipped" >>"$out/status.txt"
fi

if [ "$gpu" = 1 ]; then
  step bench bench.txt "$py" -m dyt.bench --block --json "$out/bench.json"
  step tune tune.txt timeout "${TUNE_SECONDS:-240}" "$py" scripts/tune_fused_tiles.py --json "$out/tune.json"
else  # CPU: a smoke run of the same code paths, at sizes that take seconds
  step bench bench.txt "$py" -m dyt.bench --shape 512x256 --warmup 1 --repeats 3 --block \
    --block-size 128,4,344,64 --json "$out/bench.json"
fi

echo "== step exit statuses (in $out/status.txt)"
cat "$out/status.txt"
exit "$failed"

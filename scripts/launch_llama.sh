#!/usr/bin/env bash
# Launch dyt-llama pretraining with the deepspeed launcher.
#   scripts/launch_llama.sh CONFIG [RANKS | HOSTFILE] [--resume] [--set key=value ...]
# RANKS: processes on this machine (default: its GPU count, or 2 on a CPU-only machine).
# HOSTFILE: "<host> slots=<GPUs>" lines (see recipes/llama/hostfile.example) for several nodes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The venv: DYT_VENV, else the one activated, else the checkout's .venv.
bin=${DYT_VENV:-${VIRTUAL_ENV:-$root/.venv}}/bin
[[ $# -ge 1 ]] || { sed -n '2,5p' "$0"; exit 2; }
[[ -x "$bin/deepspeed" ]] || { echo "launch_llama.sh: no deepspeed in $bin: run make setup, activate a venv or set DYT_VENV" >&2; exit 2; }
config=$1; shift
where=()
if [[ $# -ge 1 && -f "$1" ]]; then
  where=(--hostfile "$1"); shift
elif [[ $# -ge 1 && "$1" != -* && ! "$1" =~ ^[0-9]+$ ]]; then
  # neither a rank count nor an option: a hostfile path that is not there (else every rank would fail
  # on it as an unknown argument)
  echo "launch_llama.sh: $1: no such hostfile (the second argument is a rank count or a hostfile)" >&2; exit 2
else
  gpus=$("$bin/python" -c 'import torch; print(torch.cuda.device_count())')
  if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then ranks=$1; shift; else ranks=$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2); fi
  [[ $ranks -ge 1 ]] || { echo "launch_llama.sh: $ranks ranks: give at least 1" >&2; exit 2; }
  where=(--num_gpus "$ranks")
  if [[ $gpus -eq 0 ]]; then
    # CPU ranks share the cores: one OpenMP team each, waiting passively (see docs/performance.md).
    export DS_ACCELERATOR=cpu OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}
  fi
fi
exec "$bin/deepspeed" "${where[@]}" --module dyt_llama.train --config "$config" "$@"

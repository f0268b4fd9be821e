#!/usr/bin/env bash
# Launch dyt-llama pretraining with the deepspeed launcher.
#   scripts/launch_llama.sh CONFIG [RANKS | HOSTFILE] [--resume] [--set key=value ...]
# RANKS: processes on this machine (default: its GPU count, or 2 on a CPU-only machine); on GPUs, the
#   first RANKS of CUDA_VISIBLE_DEVICES where it is set.
# HOSTFILE: "<host> slots=<GPUs>" lines (see recipes/llama/hostfile.example) for several nodes.
# MASTER_PORT: the rendezvous port (default: a free one for local ranks, DeepSpeed's 29500 with a hostfile).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The venv: DYT_VENV, else the one activated, else the checkout's .venv.
bin=${DYT_VENV:-${VIRTUAL_ENV:-$root/.venv}}/bin
[[ $# -ge 1 ]] || { sed -n '2,7p' "$0"; exit 2; }
[[ "$1" != -h && "$1" != --help ]] || { sed -n '2,7p' "$0"; exit 0; }
[[ -f "$1" ]] || { echo "launch_llama.sh: $1: no such config file (the first argument is a recipe YAML, e.g. recipes/llama/7b.yaml)" >&2; exit 2; }
[[ -x "$bin/deepspeed" ]] || { echo "launch_llama.sh: no deepspeed in $bin: run make setup, activate a venv or set DYT_VENV" >&2; exit 2; }
config=$1; shift
where=()
if [[ $# -ge 1 && -f "$1" ]]; then
  where=(--hostfile "$1" ${MASTER_PORT:+--master_port "$MASTER_PORT"}); shift
elif [[ $# -ge 1 && "$1" != -* && ! "$1" =~ ^[0-9]+$ ]]; then
  # neither a rank count nor an option: a hostfile path that is not there (else every rank would fail
  # on it as an unknown argument)
  echo "launch_llama.sh: $1: no such hostfile (the second argument is a rank count or a hostfile)" >&2; exit 2
else
  read -r gpus port < <("$bin/python" -c 'import socket, torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); print(torch.cuda.device_count(), s.getsockname()[1])') || true
  [[ -n "${port:-}" ]] || { echo "launch_llama.sh: $bin/python could not import torch (make setup?)" >&2; exit 2; }
  if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then ranks=$1; shift; else ranks=$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2); fi
  [[ $ranks -ge 1 ]] || { echo "launch_llama.sh: $ranks ranks: give at least 1" >&2; exit 2; }
  [[ $gpus -eq 0 || $ranks -le $gpus ]] || {
    echo "launch_llama.sh: $ranks ranks on $gpus visible GPU(s): give at most $gpus, or a hostfile for several nodes" >&2; exit 2; }
  where=(--num_gpus "$ranks")
  if [[ $gpus -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # deepspeed's --num_gpus N takes GPUs 0..N-1 and drops CUDA_VISIBLE_DEVICES: name the visible ones
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    where=(--include "localhost:$(IFS=,; echo "${visible[*]:0:ranks}")")
  fi
  # a port of its own, so that two launches on one machine (an RMSNorm and a DyT run) do not meet
  where+=(--master_port "${MASTER_PORT:-$port}")
  if [[ $gpus -eq 0 ]]; then
    # CPU ranks share the cores: one OpenMP team each, waiting passively (see docs/performance.md).
    export DS_ACCELERATOR=cpu OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}
  fi
fi
exec "$bin/deepspeed" "${where[@]}" --module dyt_llama.train --config "$config" "$@"

#!/usr/bin/env bash
# Create or refresh the project's virtual environment: the pinned stack from constraints.txt and the
# five packages installed editable. Idempotent: when nothing changed since the last run it exits at once.
#   DYT_VENV   where the venv lives (default: .venv at the repo root)
#   PYTHON     the interpreter the venv is made from (3.11 or newer; default python3)
#   --relock   rewrite constraints.txt from what is installed now (after changing a dependency)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DYT_VENV:-$root/.venv}
py=${PYTHON:-python3}
stamp=$venv/.dyt-setup-stamp

case "$#:${1:-}" in
  0:|1:--relock) ;;
  1:-h|1:--help) sed -n '2,6p' "$0"; exit 0 ;;
  *) echo "setup.sh: unknown arguments: $* (usage: scripts/setup.sh [--relock])" >&2; exit 2 ;;
esac
if [[ "${1:-}" == "--relock" ]]; then
  [[ -x "$venv/bin/pip" ]] || { echo "setup.sh --relock: no venv at $venv (DYT_VENV) to read the versions from" >&2; exit 1; }
  {  # written beside it, then moved: a failure leaves constraints.txt as it was
    echo "# Pinned environment for the whole monorepo (pip constraints): one file, every version."
    echo "# Regenerate with: scripts/setup.sh --relock"
    "$venv/bin/pip" freeze --exclude-editable | grep -v -E '^(dyt-|-e )'
  } > "$root/constraints.txt.new"
  mv "$root/constraints.txt.new" "$root/constraints.txt"
  echo "constraints.txt rewritten from $venv"
  exit 0
fi

# Everything that decides what the venv holds; a change to any of these reinstalls.
want=$(cat "$root/constraints.txt" "$root"/packages/*/pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

# constraints.txt pins releases (numpy 2.4, pandas 3.1, ...) that need Python 3.11 or newer
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "setup: $py is Python $("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not found)');" \
       "the pinned environment needs 3.11 or newer: set PYTHON=python3.11 (or newer)" >&2; exit 1; }

# fairseq2's native part loads the system libsndfile; torch.compile on CPU needs a C++ compiler, and the
# C++ extensions Python's headers; Debian's python3 makes a venv only with python3-venv.
need_apt=()
PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep -q 'libsndfile\.so\.1' || need_apt+=(libsndfile1)  # ldconfig: /sbin, off a user's PATH
command -v g++ >/dev/null || need_apt+=(g++)
"$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
[[ -x "$venv/bin/python" ]] || "$py" -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "setup: installing system packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${need_apt[*]} (run: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

echo "setup: installing the pinned environment into $venv (first time: a few minutes)"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -c "$root/constraints.txt" \
  -e "$root/packages/dyt-core[train,analysis]" \
  -e "$root/packages/dyt-data" \
  -e "$root/packages/dyt-llama" \
  -e "$root/packages/dyt-wav2vec2" \
  -e "$root/packages/dyt-dna" \
  pytest pytest-xdist ruff 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# Three C++ extensions build at first use (20-35 s each on a 2-core box): DyT's CPU kernels, Caduceus'
# selective scan and, without a GPU, DeepSpeed's CPU communication op (its CPU accelerator builds it
# when a run starts). Build them now, side by side, so that no training run or test pays for one
# inside its timing. A failure does not stop set-up: the DyT and scan kernels have slower fallbacks
# (named in their line), and DeepSpeed retries its build, and reports, when a run starts.
prebuild() {
  "$venv/bin/python" -c "$1" 2> >(grep -v "RuntimeWarning\|warnings.warn\|No CUDA runtime is found" >&2) || true
}
prebuild 'from dyt.kernels.cpu_fused import build_error; e = build_error(); print("setup: DyT cpu kernels:", e or "built")' &
prebuild 'from dyt_dna.scan_cpu import EXTENSION; e = EXTENSION.build_error(); print("setup: Caduceus C++ selective scan:", e or "built")' &
prebuild '
import contextlib, io, os, torch
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what dyt.train does without CUDA
    with contextlib.redirect_stdout(io.StringIO()):
        from dyt.train.distributed import load_cpu_communication_op
        try:
            e = None if load_cpu_communication_op() else "not available for this CPU"
        except Exception as error:
            e = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    print("setup: DeepSpeed CPU communication op:", e or "built", flush=True)
' &
wait
echo "$want" > "$stamp"
echo "setup: done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

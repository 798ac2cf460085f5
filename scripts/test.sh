#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${DIETPRUNE_DATA_DIR:-}" ] && [ -d ../shared/benchdata ]; then export DIETPRUNE_DATA_DIR=../shared/benchdata; fi
export DIETPRUNE_PROGRESS=0 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"

#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's browser test (tests/test_report.py) needs headless Chromium; it skips without one. As root
# with apt-get (CI containers), install Debian's package once: ~113 MB download, ~480 MB on disk, about a
# minute. DIETPRUNE_NO_CHROMIUM=1 skips this.
if [ -z "${DIETPRUNE_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) \
    >/dev/null 2>&1 || echo "test.sh: could not install chromium; the browser test will skip" >&2
fi
if [ -z "${DIETPRUNE_DATA_DIR:-}" ] && [ -d ../shared/benchdata ]; then export DIETPRUNE_DATA_DIR=../shared/benchdata; fi
# absolute, so tests that change directory still find it
if [ -n "${DIETPRUNE_DATA_DIR:-}" ] && [ -d "$DIETPRUNE_DATA_DIR" ]; then DIETPRUNE_DATA_DIR=$(cd "$DIETPRUNE_DATA_DIR" && pwd); export DIETPRUNE_DATA_DIR; fi
export DIETPRUNE_PROGRESS=0 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
# Two pytest-xdist workers on two or more cores, each with half the cores' threads: most tests run tiny
# models that keep one core busy, and two threads per process mostly spin. Tests that share a session fixture
# (a pruned preset) or fixed ports carry xdist_group marks. DIETPRUNE_TEST_WORKERS=0 runs in one process.
workers=${DIETPRUNE_TEST_WORKERS:-2}
cores=$(nproc 2>/dev/null || echo 1)
xdist=()
if [ "$workers" -gt 1 ] && [ "$cores" -ge 2 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --dist loadgroup)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))}
fi
exec .venv/bin/python -m pytest -q --durations=15 ${xdist[@]+"${xdist[@]}"} tests "$@"

#!/usr/bin/env bash
# Set up .venv, prune gemma3-270m at 20% on the seven DIET tasks, evaluate dense vs pruned, compare.
# Data: the Hugging Face hub, or $DIETPRUNE_DATA_DIR when set (here: ../shared/benchdata).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-gemma3-270m}
TASKS=boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa
LIMIT=${LIMIT:-50}   # examples per task; LIMIT=200 for the figures in docs (slower on CPU)
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
DP=.venv/bin/dietprune
$DP prune "$MODEL" --tasks "$TASKS" --samples 100 --sparsity 0.2 --output "$OUT/pruned" --overwrite
$DP eval "$MODEL" --tasks "$TASKS" --limit "$LIMIT" --output "$OUT/dense.json"
$DP eval "$OUT/pruned" --tasks "$TASKS" --limit "$LIMIT" --output "$OUT/pruned.json"
$DP compare "$OUT/dense.json" "$OUT/pruned.json" --plot "$OUT/compare.png"

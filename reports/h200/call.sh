# One device call from a fresh clone: build the GPU inputs if they are missing (`prescope gpu-inputs`: held-out
# prompts and prescope-tiny's LLaPor, with a manifest of checksums), then measure with them (`bench --inputs`).
# Usage: OUT=.cache/run bash reports/h200/call.sh [extra bench options]; MODELS and POLICIES may be overridden.
set -eu
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
INPUTS=${INPUTS:-.cache/device/inputs}
MODELS=${MODELS:-"prescope-tiny olmoe-1b-7b@prescope-tiny mixtral-8x7b:4 qwen3-30b-a3b:8"}
POLICIES=${POLICIES:-"on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope"}
[ -f "$INPUTS/manifest.json" ] || python3 -m prescope.cli gpu-inputs --out "$INPUTS" --device cuda
# shellcheck disable=SC2086  # MODELS and POLICIES are lists of words
python3 -m prescope.cli bench --inputs "$INPUTS" --profile reports/h200/h200-fast-engine.json --input-len 128 \
    --output-len 32 --models $MODELS --policies $POLICIES --out "$OUT/bench" "$@"

# The learned-routing comparison (issue 15): one subject per device call, the calls and estimates in comparison-routers.md.
# A twin driven by its routing model's routing and hidden states on held-out text, every policy. Usage: OUT=DIR bash reports/h200/comparison-routers.sh SUBJECT
# with SUBJECT mixtral (mixtral-8x7b:16@router), qwen3 (qwen3-30b-a3b@router, 48 layers) or deepseek (deepseek-v2-lite@router).
# Each call builds its inputs if missing (`gpu-inputs --routers`: the routing model, trained here in ROUTER_S seconds
# where none is committed, and LLaPor for the subject's MoE layers, its layers in parallel CPU processes), then runs
# `bench --inputs` with a deadline (`--deadline-s`): no cell starts past LIMIT_S seconds of the call (less a margin
# for the last cell), the cells left out are listed in bench.json's `deadline`, and what finished comes back.
# The inputs manifest, the card of a routing model trained in the call and its LLaPor-vs-gate-lookahead score on held-out
# text (`routers/NAME/llapor-vs-gate-N.json`, copied as NAME-llapor-vs-gate-N.json) come back with the run.
# Overrides: BUDGETS, BATCHES, POLICIES, OUTPUT_LEN, REPEATS, LIMIT_S, ROUTER_S, INPUTS, SWITCH_S (bench --switch-interval-s),
# RUN_NAME (the output folder's name, default routers-SUBJECT), ACCELERATE_BATCHES (accelerate's
# offload rows, none by default: at these depths one takes minutes and would run past the deadline). The grid does not fit one
# call per subject; the calls that cover it, and their estimates, are in reports/h200/comparison-routers.md.
set -eu
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=$(date +%s)
WHICH=${1:-mixtral}
case $WHICH in
    mixtral) MODEL=mixtral-8x7b:16@router ROUTERS=mixtral-8x7b:16 MARGIN=60 ;;  # link-bound cells of up to ~15 s
    qwen3) MODEL=qwen3-30b-a3b@router ROUTERS=qwen3-30b-a3b MARGIN=75 ;;  # a batch-64 cell takes ~40 s
    deepseek) MODEL=deepseek-v2-lite@router ROUTERS=deepseek-v2-lite MARGIN=60 ;;
    *) echo "usage: OUT=DIR bash $0 mixtral|qwen3|deepseek" >&2; exit 2 ;;
esac
LIMIT_S=${LIMIT_S:-540}
BUDGETS=${BUDGETS:-0.25}
BATCHES=${BATCHES:-"1 4 16"}  # batch 64: BATCHES=64, a call of its own
POLICIES=${POLICIES:-"on_demand_lru prescope ceiling belady hybrid cpu_misses lookahead_prefetch activation_matrix prescope[gate=False]"}
OUTPUT_LEN=${OUTPUT_LEN:-16}
REPEATS=${REPEATS:-1}
INPUTS=${INPUTS:-.cache/device/inputs-routers-$WHICH}
if [ ! -f "$INPUTS/manifest.json" ]; then
    python3 -m prescope.cli gpu-inputs --out "$INPUTS" --device cuda --no-predictor --routers "$ROUTERS" \
        --router-time-budget-s "${ROUTER_S:-90}" --batch-size 32
fi
LEFT=$((LIMIT_S - $(date +%s) + START - MARGIN))
[ "$LEFT" -gt 30 ] || { echo "comparison-routers: only ${LEFT}s left after the inputs; run again (they are built)" >&2; exit 3; }
RUN="$OUT/${RUN_NAME:-routers-$WHICH}"
set -f  # policy variants such as prescope[gate=False] are words, not file patterns
# shellcheck disable=SC2086  # BATCHES, BUDGETS, POLICIES and ACCELERATE_BATCHES are lists of words
python3 -m prescope.cli bench --inputs "$INPUTS" --models "$MODEL" --batch-sizes $BATCHES --budgets $BUDGETS \
    --policies $POLICIES --profile reports/h200/h200-fast-engine.json --input-len 128 --output-len "$OUTPUT_LEN" \
    --timeline-tokens 0 --repeats "$REPEATS" --stock-implementations grouped_mm batched_mm \
    --accelerate-batches ${ACCELERATE_BATCHES:-} --accelerate-tokens 2 --deadline-s "$LEFT" \
    ${SWITCH_S:+--switch-interval-s "$SWITCH_S"} --out "$RUN"
set +f
cp "$INPUTS/manifest.json" "$RUN/inputs-manifest.json"
for card in "$INPUTS"/routers/*/model_card.json; do  # the card of a routing model trained in this call
    if [ -f "$card" ]; then cp "$card" "$RUN/router-card-$(basename "$(dirname "$card")").json"; fi
done
for score in "$INPUTS"/routers/*/llapor-vs-gate-*.json; do  # LLaPor vs gate lookahead on held-out text
    if [ -f "$score" ]; then cp "$score" "$RUN/$(basename "$(dirname "$score")")-$(basename "$score")"; fi
done
echo "comparison-routers: $WHICH done in $(($(date +%s) - START)) s; files in $RUN"

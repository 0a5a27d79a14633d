# Device call I (rev 3d15d9b): the final check, 25 %, batch 1 and 4: prescope (window_reuse, AsyncIO only for
# large experts, cheaper planning) against on_demand_lru, cpu_misses and the oracle.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=3d15d9b
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 75 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope --out $OUT/qwen3 > $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 85 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope $P --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 75 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru prescope oracle --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
grep -E "b=|rc=|Error" $OUT/log.txt | grep -v "Loading weights" | tail -30

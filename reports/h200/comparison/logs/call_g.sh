# Device call G (rev a616ad2): batch 16 and 64 on the Mixtral twin, batch 16 on the Qwen3 twin (25 %), and the
# 50 % budget at batch 1 and 4 on the OLMoE twin with prescope-tiny's routing.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=a616ad2
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 200 $B --models mixtral-8x7b:4 --batch-sizes 16 64 --budgets 0.25 --policies on_demand_lru hybrid prescope oracle --out $OUT/mixtral > $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 120 $B --models qwen3-30b-a3b:8 --batch-sizes 16 --budgets 0.25 --policies on_demand_lru cpu_misses prescope oracle --out $OUT/qwen3 >> $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 150 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.5 --policies on_demand_lru cpu_misses prescope prescope+sync oracle $P --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
grep -E "b=|rc=|Error" $OUT/log.txt | grep -v "Loading weights" | tail -40

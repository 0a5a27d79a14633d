# Device call D: prescope after the no-churn change, Qwen3 twin (8 layers) and OLMoE twin with prescope-tiny routing.
set -u
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
timeout 85 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru prescope oracle \
  --out $OUT/qwen3 > $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 60 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope prescope+sync \
  --prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
grep "b=" $OUT/log.txt

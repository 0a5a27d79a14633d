# Device call C: LLaPor overhead on the GPU (prescope-tiny), the Qwen3-30B-A3B twin (8 layers) batch 1/4,
# and AsyncIO on/off for prescope and oracle on the OLMoE twin with prescope-tiny's routing.
set -u
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32"
timeout 60 $B --models prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope --timeline-tokens 0 \
  --prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt --accelerate-batches --out $OUT/tiny > $OUT/log.txt 2>&1
echo "tiny rc=$?"
timeout 150 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 0.5 --timeline-tokens 4 \
  --accelerate-batches 1 --out $OUT/qwen3 >> $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 80 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 --budgets 0.25 --timeline-tokens 0 \
  --policies on_demand_lru prescope prescope+sync oracle oracle+sync \
  --prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt --accelerate-batches --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
grep -v "Loading weights" $OUT/log.txt | grep -v "^ *{" | tail -60

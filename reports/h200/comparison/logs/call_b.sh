# Device call B: Mixtral twin (4 layers) batch 1/4 with the engine-refitted CPU model, then the OLMoE twin
# driven by prescope-tiny's held-out routing (LLaPor for prescope), every policy.
set -u
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32"
timeout 200 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 0.5 --timeline-tokens 4 \
  --accelerate-batches 1 --out $OUT/mixtral > $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 340 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 16 64 --budgets 0.25 0.5 --timeline-tokens 4 \
  --prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt --accelerate-batches 1 \
  --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
grep -v "Loading weights" $OUT/log.txt | grep -v "^ *{" | tail -120

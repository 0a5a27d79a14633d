# Device call A: smoke (AsyncIO on CUDA), then Mixtral twin (4 layers) and prescope-tiny, every policy.
set -u
B="python3 -m prescope.cli bench --profile reports/h200/h200-calibrated.json --input-len 128 --output-len 32"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
timeout 100 $B --models mixtral-8x7b:2 --batch-sizes 1 --budgets 0.25 --policies prescope oracle on_demand_lru \
  --output-len 6 --timeline-tokens 3 --accelerate-batches --out $TMPDIR/smoke > $OUT/log.txt 2>&1
rc=$?; tail -5 $OUT/log.txt; [ $rc -eq 0 ] || { echo "smoke failed rc=$rc"; exit 1; }
timeout 330 $B --models mixtral-8x7b:4 --batch-sizes 1 4 16 64 --budgets 0.25 0.5 --timeline-tokens 4 \
  --accelerate-batches 1 --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 150 $B --models prescope-tiny --batch-sizes 1 4 16 64 --budgets 0.25 0.5 --timeline-tokens 4 \
  --prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt --accelerate-batches 1 \
  --out $OUT/tiny >> $OUT/log.txt 2>&1
echo "tiny rc=$?"
grep -v "Loading weights" $OUT/log.txt | tail -150

# Device call F: the comparison at rev a616ad2 (graphed forecast, on-demand loads issued by the compute thread),
# 25 % budget, batch 1 and 4; prescope+sync = AsyncIO off; prescope+cal = with online calibration.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=a616ad2
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_streams.py tests/test_predictors.py tests/test_transfers.py -k "not llamacpp" > $OUT/log.txt 2>&1
echo "gpu tests rc=$?"; tail -2 $OUT/log.txt
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 60 $B --models prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope prescope+sync oracle $P --out $OUT/tiny >> $OUT/log.txt 2>&1
echo "tiny rc=$?"; rm -f $OUT/tiny/routing.npz
timeout 175 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope prescope+sync oracle $P --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 140 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope prescope+sync oracle --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 110 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses activation_matrix prescope prescope+sync oracle --out $OUT/qwen3 >> $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
grep -E "b=|rc=|Error" $OUT/log.txt | grep -v "Loading weights" | tail -60

# Device call E: CUDA tests (graphs, sync-free inclusion_probs, AsyncIO), then prescope with graphed LLaPor /
# gate lookahead and calibrated probabilities (prescope) against uncalibrated (prescope+raw), 25 %, batch 1 and 4.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=6d249cf
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $OUT/log.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_streams.py tests/test_predictors.py tests/test_transfers.py >> $OUT/log.txt 2>&1
echo "gpu tests rc=$?"; tail -4 $OUT/log.txt
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 70 $B --models prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope prescope+raw $P --out $OUT/tiny >> $OUT/log.txt 2>&1
echo "tiny rc=$?"; rm -f $OUT/tiny/routing.npz
timeout 120 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope prescope+raw oracle $P --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 140 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru hybrid prescope prescope+raw oracle --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 110 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope prescope+raw oracle --out $OUT/qwen3 >> $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
grep -E "b=|rc=|overhead|Error|error" $OUT/log.txt | grep -v "Loading weights" | tail -70

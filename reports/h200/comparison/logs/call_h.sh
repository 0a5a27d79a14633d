# Device call H (rev 00657d3): window_reuse on (prescope) against off, 25 %; and a cProfile of prescope+sync on
# the Qwen3 twin at batch 1 (where the policy's host time decides).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=00657d3
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 100 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru prescope 'prescope[window_reuse=False]' oracle --out $OUT/qwen3 > $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 80 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope 'prescope[window_reuse=False]' $P --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 70 $B --models mixtral-8x7b:4 --batch-sizes 4 --budgets 0.25 --policies on_demand_lru prescope 'prescope[window_reuse=False]' --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
rm -f $OUT/*/routing.npz
timeout 60 python3 -m cProfile -o $OUT/qwen3-prescope-sync.prof -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 12 --timeline-tokens 0 --accelerate-batches --models qwen3-30b-a3b:8 --batch-sizes 1 --budgets 0.25 --policies prescope+sync --out $TMPDIR/prof >> $OUT/log.txt 2>&1
echo "profile rc=$?"
python3 -c "import pstats; pstats.Stats('$OUT/qwen3-prescope-sync.prof').sort_stats('tottime').print_stats(30)" > $OUT/profile-tottime.txt 2>&1
python3 -c "import pstats; pstats.Stats('$OUT/qwen3-prescope-sync.prof').sort_stats('cumulative').print_stats('prescope', 40)" > $OUT/profile-cumulative.txt 2>&1
grep -E "b=|rc=|Error" $OUT/log.txt | grep -v "Loading weights" | tail -40

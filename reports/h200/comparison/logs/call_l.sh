# Device call L (rev 5f83609): AsyncIO cuts unused prefetches. Mixtral twin b1/b4 25 % every policy (+ prescope+cal,
# prescope[lookahead=1]); host-bound cells in 3 interleaved rounds: OLMoE twin @ prescope-tiny b1/b4 25 %, prescope-tiny b1.
set -u
set -f
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=5f83609
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
ALL="on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope prescope+cal prescope[lookahead=1] oracle"
timeout 170 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies $ALL --out $OUT/mixtral > $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 240 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope oracle $P --repeats 3 --out $OUT/olmoe >> $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 110 $B --models prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope oracle $P --repeats 3 --out $OUT/tiny >> $OUT/log.txt 2>&1
echo "tiny rc=$?"
rm -f $OUT/tiny/routing.npz
grep -E "b=|rc=|Error|failed" $OUT/log.txt | grep -v "Loading weights\|round [12]" | tail -40

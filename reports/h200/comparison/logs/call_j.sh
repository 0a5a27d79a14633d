# Device call J (rev 7b9d049): the gate (host-bound layers on demand) measured; OLMoE twin @ prescope-tiny 25 % b1/b4
# every policy (+ prescope[gate=False], the behaviour before) and accelerate b1; prescope-tiny; OLMoE 50 %.
set -u
set -f
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=7b9d049
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
ALL="on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope prescope[gate=False] oracle"
timeout 270 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies $ALL $P --accelerate-batches 1 --accelerate-tokens 8 --out $OUT/olmoe > $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 100 $B --models prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru cpu_misses prescope prescope[gate=False] oracle $P --accelerate-batches 1 --accelerate-tokens 8 --out $OUT/tiny >> $OUT/log.txt 2>&1
echo "tiny rc=$?"
timeout 150 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.5 --policies on_demand_lru cpu_misses prescope prescope[gate=False] oracle $P --out $OUT/olmoe50 >> $OUT/log.txt 2>&1
echo "olmoe50 rc=$?"
rm -f $OUT/tiny/routing.npz
ls -R $OUT | head -30
grep -E "b=|rc=|Error|lean" $OUT/log.txt | grep -v "Loading weights" | tail -60

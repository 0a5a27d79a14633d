# Device call M (rev bec855b, the final one): the gate with launch and planning costs. Host-bound cells in interleaved
# rounds: OLMoE twin @ prescope-tiny b1/b4 25 % (3 rounds), Qwen3 twin b1/b4 (2 rounds); Qwen3 b16 and Mixtral b1/b4.
set -u
set -f
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=bec855b
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 200 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope prescope[gate=False] oracle $P --repeats 3 --out $OUT/olmoe > $OUT/log.txt 2>&1
echo "olmoe rc=$?"
timeout 110 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru cpu_misses prescope oracle --repeats 2 --out $OUT/qwen3 >> $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 70 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies on_demand_lru prescope oracle --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
timeout 90 $B --models qwen3-30b-a3b:8 --batch-sizes 16 --budgets 0.25 --policies on_demand_lru prescope prescope[gate=False] oracle --out $OUT/qwen3-b16 >> $OUT/log.txt 2>&1
echo "qwen3-b16 rc=$?"
rm -f $OUT/qwen3-b16/routing.npz
grep -E "b=|rc=|Error|failed" $OUT/log.txt | grep -v "Loading weights\|round [12]" | tail -40

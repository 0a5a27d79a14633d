# Device call N (rev 955bd65): the host-bound cell once more, OLMoE twin @ prescope-tiny b1 25 %, 2 interleaved rounds.
set -u
set -f
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=955bd65
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
P="--prompts .cache/device/heldout-128.npy --predictor .cache/device/llapor.pt"
timeout 170 $B --models olmoe-1b-7b@prescope-tiny --batch-sizes 1 --budgets 0.25 --policies on_demand_lru prescope prescope[gate=False] $P --repeats 2 --out $OUT/olmoe > $OUT/log.txt 2>&1
echo "olmoe rc=$?"
grep -E "b=|rc=|Error|failed" $OUT/log.txt | grep -v "Loading weights" | tail -20

# Device call K (rev 7c7d358): Qwen3 twin b1/b4 (2 interleaved rounds) and Mixtral twin b1/b4, 25 %, every policy
# plus prescope[gate=False] (the behaviour before the gate).
set -u
set -f
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PRESCOPE_GIT_REV=7c7d358
B="python3 -m prescope.cli bench --profile reports/h200/h200-engine.json --input-len 128 --output-len 32 --timeline-tokens 0 --accelerate-batches"
ALL="on_demand_lru cpu_misses hybrid lookahead_prefetch activation_matrix prescope prescope[gate=False] oracle"
timeout 250 $B --models qwen3-30b-a3b:8 --batch-sizes 1 4 --budgets 0.25 --policies $ALL --repeats 2 --out $OUT/qwen3 > $OUT/log.txt 2>&1
echo "qwen3 rc=$?"
timeout 290 $B --models mixtral-8x7b:4 --batch-sizes 1 4 --budgets 0.25 --policies $ALL --out $OUT/mixtral >> $OUT/log.txt 2>&1
echo "mixtral rc=$?"
grep -E "b=|rc=|Error|failed" $OUT/log.txt | grep -v "Loading weights\|round 1" | tail -40

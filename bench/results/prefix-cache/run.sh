#!/usr/bin/env bash
# Prefix pulls and migration dedup in the simulator (bench/results/prefix-cache/README.md):
# 16 simulated H200 instances of llama3-8b (the profile's full KV: 56,596 blocks each),
# KV copies at 200 GB/s; ferry with and without pulls, and prefix_affinity (llm-d's
# scoring), on the tenants and multiturn traces at two rates each near their knees.
# ~15 minutes on 2 shared cores. Run from the repository root.
set -euo pipefail
OUT=bench/results/prefix-cache
PY=${PY:-.venv/bin/python}
SIM=("$PY" -m ferry.bench.sim --instances 16 --profile services/worker/profiles/llama3-8b-h200.json
     --migration-bandwidth-gbs 200)
TRACES=/tmp/ferry-prefix-cache-traces
mkdir -p "$TRACES"
for rate in 350 450; do
  "$PY" -m ferry.bench.trace --kind tenants --skew 1.2 --rate $rate --num 6000 --seed 0 \
    --out "$TRACES/tenants-$rate.jsonl"
done
for rate in 1000 2000; do
  "$PY" -m ferry.bench.trace --kind multiturn --think-s 2 --rate $rate --num 16000 --seed 0 \
    --out "$TRACES/multiturn-$rate.jsonl"
done
for trace in tenants-350 tenants-450 multiturn-1000 multiturn-2000; do
  "${SIM[@]}" --trace "$TRACES/$trace.jsonl" --policy ferry --out "$OUT/$trace-ferry.json" >/dev/null
  "${SIM[@]}" --trace "$TRACES/$trace.jsonl" --policy ferry --no-prefix-pull \
    --out "$OUT/$trace-ferry-nopull.json" >/dev/null
  "${SIM[@]}" --trace "$TRACES/$trace.jsonl" --policy prefix_affinity \
    --out "$OUT/$trace-prefix_affinity.json" >/dev/null
done
"$PY" "$OUT/table.py" "$OUT" > "$OUT/table.md"

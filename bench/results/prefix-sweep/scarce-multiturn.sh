#!/usr/bin/env bash
# Ferry's prefix pulls under scarce KV (bench/results/prefix-sweep/README.md, "Pulls under
# scarce KV"): multiturn at 40 sessions/s, 600 requests, 8 simulated H200 instances of
# llama3-8b with 1000 KV blocks each, five seeds, ferry with and without pulls.
# Deterministic; ~1 minute on 2 cores. Writes bench/results/prefix-sweep/scarce/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/prefix-sweep/scarce
mkdir -p "$OUT"
for seed in 0 1 2 3 4; do
  $PY -m ferry.services.cli bench trace --kind multiturn --think-s 1 --rate 40 --num 600 \
    --seed "$seed" --out "$OUT/multiturn-s$seed.jsonl" >/dev/null 2>&1
  for variant in pulls no-pulls; do
    flag=""; [ "$variant" = no-pulls ] && flag="--no-prefix-pull"
    FERRY_LOG_LEVEL=warning $PY -m ferry.services.cli bench sim --trace "$OUT/multiturn-s$seed.jsonl" \
      --instances 8 --profile services/worker/profiles/llama3-8b-h200.json --kv-blocks 1000 \
      --max-num-batched-tokens 2048 --migration-interval-s 0.05 --policy ferry $flag \
      --out "$OUT/s$seed-$variant.json" >/dev/null 2>&1
  done
done
$PY - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| variant | P99 TTFT ms, seeds 0-4 | median | mean TTFT ms | hit rate | pulls | preemptions |")
print("|---|---|---:|---:|---:|---:|---:|")
for variant in ("pulls", "no-pulls"):
    runs = [json.loads((out / f"s{s}-{variant}.json").read_text()) for s in range(5)]
    p99 = [r["prefill_latency_s"]["p99"] * 1e3 for r in runs]
    print(f"| {variant} | {' '.join(f'{x:.1f}' for x in p99)} | {statistics.median(p99):.1f} | "
          f"{statistics.median(r['prefill_latency_s']['mean'] * 1e3 for r in runs):.1f} | "
          f"{statistics.median(r['cache_hit_rate'] for r in runs):.3f} | "
          f"{statistics.median(r['num_pulls'] for r in runs)} | "
          f"{sum(r['num_preemptions'] for r in runs)} |")
PY

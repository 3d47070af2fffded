#!/bin/bash
# experiments.cluster_check end to end on CPU: two real tiny workers (random weights, fp32),
# the real gateway and scheduler, least_load and llumnix on one M-M trace, then the
# ranking. It shows the part-B driver works (the migration log, the pooled fit, the
# simulation with N instances), not how a GPU cluster performs. About 5 minutes on 2 cores.
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
HERE=bench/results/cpu/cluster-check-smoke-2026-12-06
for policy in least_load llumnix; do
  $PY -m experiments.cluster_check --model random:tiny --device cpu --workers 2 \
    --kv-blocks 120 --policy "$policy" --kinds M-M --rates 6 --num 60 --warm-up 5 \
    --spread-seeds 3 --profile services/worker/profiles/tiny-cpu.json \
    --out-dir "$HERE/$policy" 2>&1 | grep -v "^20[0-9][0-9]-" > "$HERE/$policy.txt"
  rm -f "$HERE/$policy"/profile-cycle.json "$HERE/$policy"/*.png
  gzip -9f "$HERE/$policy"/steps-*.jsonl
done
$PY -m experiments.cluster_check --rank "$HERE/least_load" "$HERE/llumnix" > "$HERE/rank.txt"
cat "$HERE/rank.txt"

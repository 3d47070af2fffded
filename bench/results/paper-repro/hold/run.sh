#!/usr/bin/env bash
# Session 4: the scheduler's pending queue (hold_until_room) for both policies, every trace
# near and past the knee, 3 seeds. Run from the repository root on a lent 64-core machine
# (device kind nvidia-h200-x4); writes hold.json and hold.log to $1 (default: this folder).
set -euo pipefail
out=${1:-$(dirname "$0")}
tmp=$(mktemp -d)
python -m experiments.paper_repro --experiments policies --out-dir "$tmp" \
  --load-fractions 0.85,0.9,0.92,0.94 --seeds 3 --jobs 64 \
  --variant least_load --variant llumnix \
  --variant "least_load+hold=least_load --hold-until-room" \
  --variant "llumnix+hold=llumnix --hold-until-room" > "$out/hold.log" 2>&1
mv "$tmp/policies.json" "$out/hold.json"
rm -rf "$tmp"

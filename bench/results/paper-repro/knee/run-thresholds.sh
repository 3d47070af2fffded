#!/usr/bin/env bash
# Session 4, second call: llumnix's migration source threshold (F below it makes a source;
# destinations need F >= threshold + max(1, threshold)) on the traces of run.sh's variants.
# Run on a lent 64-core machine (device kind nvidia-h200-x4) from the repository root;
# writes thresholds.json and its log to $1 (default: this script's folder).
set -euo pipefail
out=${1:-$(dirname "$0")}
tmp=$(mktemp -d)
python -m experiments.paper_repro --experiments policies --out-dir "$tmp" \
  --kinds M-M,L-L,S-L --load-fractions 0.9,0.94 --seeds 4 --jobs 64 \
  --variant least_load --variant llumnix \
  --variant "thr0.5=llumnix --migrate-out-threshold 0.5" \
  --variant "thr2=llumnix --migrate-out-threshold 2" \
  --variant "thr4=llumnix --migrate-out-threshold 4" > "$out/thresholds.log" 2>&1
mv "$tmp/policies.json" "$out/thresholds.json"
rm -rf "$tmp"

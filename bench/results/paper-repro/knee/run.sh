#!/usr/bin/env bash
# Session 4: where each policy's knee is, and which llumnix migration settings move it.
# Run on a lent 64-core machine (device kind nvidia-h200-x4) from the repository root;
# writes knee.json, variants.json and their logs to $1 (default: this script's folder),
# which bench.paper_report reads from bench/results/paper-repro/knee/.
#   1. every trace past the session-3 rates (0.9-0.96 of the capacity estimate),
#      least_load vs llumnix, 3 seeds;
#   2. M-M, L-L, S-L at 0.9 and 0.94: llumnix with other destination growth rooms,
#      more concurrent migrations per instance, Llumnix's "shortest" source choice.
set -euo pipefail
out=${1:-$(dirname "$0")}
tmp=$(mktemp -d)
python -m experiments.paper_repro --experiments policies --out-dir "$tmp/knee" \
  --load-fractions 0.9,0.92,0.94,0.96 --seeds 3 --jobs 32 \
  --variant least_load --variant llumnix > "$out/knee.log" 2>&1 &
python -m experiments.paper_repro --experiments policies --out-dir "$tmp/variants" \
  --kinds M-M,L-L,S-L --load-fractions 0.9,0.94 --seeds 4 --jobs 32 \
  --variant least_load --variant llumnix \
  --variant "growth0=llumnix --migrate-dst-growth-blocks 0" \
  --variant "growth2=llumnix --migrate-dst-growth-blocks 2" \
  --variant "mig4=llumnix --max-migrations-per-instance 4" \
  --variant "shortest=llumnix --migration-choice shortest" > "$out/variants.log" 2>&1 &
wait
mv "$tmp/knee/policies.json" "$out/knee.json"
mv "$tmp/variants/policies.json" "$out/variants.json"
rm -rf "$tmp"

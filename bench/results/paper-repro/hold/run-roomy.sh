#!/usr/bin/env bash
# Session 4, after hold/run.sh: a held request is placed only among the instances with
# room for it (the policy used to choose among all open ones). The +hold runs again.
set -euo pipefail
out=${1:-$(dirname "$0")}
tmp=$(mktemp -d)
python -m experiments.paper_repro --experiments policies --out-dir "$tmp" \
  --load-fractions 0.85,0.9,0.92,0.94 --seeds 3 --jobs 64 \
  --variant "least_load+hold=least_load --hold-until-room" \
  --variant "llumnix+hold=llumnix --hold-until-room" > "$out/hold-roomy.log" 2>&1
mv "$tmp/policies.json" "$out/hold-roomy.json"
rm -rf "$tmp"

#!/usr/bin/env bash
# Session 4: the priorities and auto-scaling experiments again, every simulation with the
# scheduler's pending queue (--hold-until-room). Run from the repository root on a lent
# 64-core machine; writes priorities-hold.json, autoscale-hold.json and the log to $1.
set -euo pipefail
out=${1:-$(dirname "$0")}
tmp=$(mktemp -d)
python -m experiments.paper_repro --experiments priorities,autoscale --seeds 3 --jobs 54 \
  --sim-args=--hold-until-room --out-dir "$tmp" > "$out/prio-scale-hold.log" 2>&1
mv "$tmp/priorities.json" "$out/priorities-hold.json"
mv "$tmp/autoscale.json" "$out/autoscale-hold.json"
rm -rf "$tmp"

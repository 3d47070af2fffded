#!/usr/bin/env bash
# Issue 12's sweep in the simulator (bench/results/prefix-sweep/README.md): 16 simulated
# H200 instances of llama3-8b (the profile's full KV: 56,596 blocks of 16 tokens each),
# KV copies at 200 GB/s; three cache-heavy traces at three rates, three seeds, four
# policies (+ ferry with the pending queue on long context). Resumable: runs already in
# bench/results/prefix-sweep/runs are not run again. ~1 hour on 2 shared cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PY:-.venv/bin/python}" -m ferry.bench.prefix_sweep --out-dir bench/results/prefix-sweep \
  --kind "tenants:300,400,500:6000:--skew 1.2" \
  --kind "longctx:40,50,60:3000:" \
  --kind "multiturn:1000,2000,4000:6000:--think-s 1" \
  --variant least_load --variant prefix_affinity --variant llumnix --variant ferry \
  --variant "longctx:ferry-hold=ferry --hold-until-room" \
  --seeds 0,1,2 --jobs 2 "$@"

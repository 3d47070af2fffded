#!/bin/bash
# CPU re-analysis of the sim checks of sessions 8 to 10 with this version of the simulator
# (about 12 minutes on 2 cores); each writes RUN/reanalysis*/sim_check.json and a .txt table
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
run() {  # run_dir out_dir model args...
  local src=$1 out=$2 model=$3; shift 3
  mkdir -p "$out"
  $PY -m experiments.sim_check --replayed "$src" --model "random:$model" \
    --profile "services/worker/profiles/$model-h200.json" --out-dir "$out" "$@" 2>&1 \
    | grep -v "^20[0-9][0-9]-" > "$out.txt"
  rm -f "$out"/profile-insitu*.json  # large, and remade from the step log
}
H=bench/results/h100
run $H/simcheckknee-2026-12-06/simcheckknee $H/simcheckknee-2026-12-06/reanalysis llama3-8b --kv-blocks 1000 --num 500 --kinds sharegpt,multiturn --rates sharegpt:4.0,multiturn:12.73 --warm-up 30
run $H/eagernoise-simcheck3b-2026-12-06/simcheck3b $H/eagernoise-simcheck3b-2026-12-06/reanalysis llama3-8b --kv-blocks 1000 --num 100 --kinds sharegpt --rates 1.5,2.5,4.0 --warm-up 30
run bench/results/h200/simcheckh200-2026-12-06/simcheckh200 bench/results/h200/simcheckh200-2026-12-06/reanalysis llama3-8b --kv-blocks 56596 --num 200 --kinds sharegpt --load-fractions 0.4,0.7,1.0 --warm-up 30
run $H/sim-check3-2026-12-06 $H/sim-check3-2026-12-06/reanalysis-s9 llama3-8b --kv-blocks 1000 --num 100 --kinds sharegpt,multiturn --load-fractions 0.5,0.8,1.1
run $H/grammarstep-simcheck3c-v2-2026-12-06 $H/grammarstep-simcheck3c-v2-2026-12-06/reanalysis-s9 llama3-8b --kv-blocks 25000 --num 150 --kinds sharegpt --rates 7,11,15 --warm-up 30
run $H/simcheckh100b-2026-12-06/simcheckh100b $H/simcheckh100b-2026-12-06/reanalysis llama2-7b --kv-blocks 7000 --num 100 --kinds L-L --load-fractions 0.5,0.8,1.1 --warm-up 20
run $H/simcheckrealknee-2026-12-06/simcheckrealknee $H/simcheckrealknee-2026-12-06/reanalysis llama3-8b --kv-blocks 25000 --num 1000 --kinds sharegpt --rates 12,16 --warm-up 30
run $H/simchecklongctx-2026-12-06/simchecklongctx $H/simchecklongctx-2026-12-06/reanalysis llama3-8b --kv-blocks 25000 --num 100 --kinds longctx --max-total-tokens 65536 --rates 0.8,1.6,2.4 --warm-up 20
# every replay of this run queues (20 and 24 req/s, past the knee): IN from simcheckrealknee's
# least loaded replay (12 req/s, the same trace family and KV; 0.7 ms), OUT measured here
run $H/simcheckrealknee2-2026-12-06/simcheckrealknee2 $H/simcheckrealknee2-2026-12-06/reanalysis llama3-8b --kv-blocks 25000 --num 1000 --kinds sharegpt --rates 20,24 --warm-up 30 --request-in-ms 0.7
# hot long prefixes; the first run's replays shared their documents with each other and the
# warm-up (fixed since: bench/workload.py), the second's did not
run $H/simchecklongshared-2026-12-06/simchecklongshared $H/simchecklongshared-2026-12-06/reanalysis llama3-8b --kv-blocks 25000 --num 150 --kinds longctx-shared --tenants 16 --max-total-tokens 65536 --rates 1.6,3.2,4.8 --warm-up 20
run $H/simchecklongshared2-2026-12-06/simchecklongshared2 $H/simchecklongshared2-2026-12-06/reanalysis llama3-8b --kv-blocks 25000 --num 100 --kinds longctx-shared --tenants 16 --max-total-tokens 65536 --rates 1.6,4.0 --warm-up 20
# session 8's first check: llama2-7b at the paper's KV (1000 blocks), M-M and L-L
run $H/sim-check-2026-12-06 $H/sim-check-2026-12-06/reanalysis-s10 llama2-7b --kv-blocks 1000 --num 100 --kinds M-M,L-L --load-fractions 0.5,0.8,1.1

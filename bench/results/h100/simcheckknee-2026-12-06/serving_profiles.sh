#!/bin/bash
# The serving profiles shipped in services/worker/profiles (*-serving.json): each fitted to
# whole engine cycles of real workers' step logs at their card's real KV (ferry profile
# --from-step-log), keeping 400 evenly spaced steps as samples. Seconds on 2 cores.
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
P=services/worker/profiles
H=bench/results/h100
serving() {  # name base device_name num_blocks step_logs...
  local name=$1 base=$2 device=$3 blocks=$4; shift 4
  $PY -m ferry.services.cli profile --from-step-log "$@" --base "$P/$base.json" --name "$name" \
    --device-name "$device" --num-blocks "$blocks" --keep-samples 400 --out "$P/$name.json" \
    | $PY -c "import json, sys; d = json.load(sys.stdin); print(d['out'], d['samples'], 'steps, median err', round(d['fit_median_rel_err'], 4))"
}
serving llama3-8b-h200-serving llama3-8b-h200 "NVIDIA H200" 56596 \
  bench/results/h200/simcheckh200-2026-12-06/simcheckh200/steps.jsonl.gz
# three lent H100s at 25,000 blocks: ShareGPT-like to past the throughput knee, and long
# contexts (prompts to 64k) past the TTFT knee
serving llama3-8b-h100-serving llama3-8b-h200 "NVIDIA H100 80GB HBM3" 25000 \
  $H/grammarstep-simcheck3c-v2-2026-12-06/steps.jsonl.gz \
  $H/simcheckrealknee-2026-12-06/simcheckrealknee/steps.jsonl.gz \
  $H/simchecklongctx-2026-12-06/simchecklongctx/steps.jsonl.gz
serving llama2-7b-h100-serving llama2-7b-h200 "NVIDIA H100 80GB HBM3" 7000 \
  $H/simcheckh100b-2026-12-06/simcheckh100b/steps.jsonl.gz

#!/bin/bash
# The three serving profiles (services/worker/profiles/*-serving.json) against the runs they
# were fitted from (in sample) and against the 1000-block runs (another load regime, another
# lent machine): python -m experiments.profile_check, about 5 minutes on 2 cores.
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
P=services/worker/profiles
H=bench/results/h100
check() {  # out_name profile path_ms run_dirs...
  local out=$1 profile=$2 path=$3; shift 3
  $PY -m experiments.profile_check --profile "$P/$profile.json" --request-path-ms "$path" "$@" \
    --out "$H/simcheckknee-2026-12-06/$out.json" 2>&1 | grep -v "^20[0-9][0-9]-" \
    > "$H/simcheckknee-2026-12-06/$out.txt"
}
check profile-check-llama3-8b-h200 llama3-8b-h200-serving 6.2,7.8 \
  bench/results/h200/simcheckh200-2026-12-06/reanalysis
# in sample: 3c, realknee, longctx (the three it is fitted to); out of sample: realknee2
# (25,000 blocks past the TTFT knee, another lent H100), 3b and knee (1000 blocks)
check profile-check-llama3-8b-h100 llama3-8b-h100-serving 2.1,2.1 \
  $H/grammarstep-simcheck3c-v2-2026-12-06/reanalysis-s9 \
  $H/simcheckrealknee-2026-12-06/reanalysis $H/simchecklongctx-2026-12-06/reanalysis \
  $H/simcheckrealknee2-2026-12-06/reanalysis \
  $H/eagernoise-simcheck3b-2026-12-06/reanalysis $H/simcheckknee-2026-12-06/reanalysis
check profile-check-llama2-7b-h100 llama2-7b-h100-serving 5.7,2.4 \
  $H/simcheckh100b-2026-12-06/reanalysis $H/sim-check-2026-12-06

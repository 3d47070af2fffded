#!/bin/bash
# Every sim check since session 8 in one table (summary.md, summary.json beside this file),
# from the re-analyses reanalyse.sh writes: P99 TTFT real against the simulator (cycle
# model + measured spread + request path, median of 5 seeds). Seconds on CPU.
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD
PY=${PY:-.venv/bin/python}
H=bench/results/h100
HERE=$H/simcheckknee-2026-12-06
$PY -m experiments.sim_check_summary --out $HERE/summary.json \
  "s8 simcheck=$H/sim-check-2026-12-06/reanalysis-s10" \
  "s8 simcheck3=$H/sim-check3-2026-12-06/reanalysis-s9" \
  "s9 simcheck3b=$H/eagernoise-simcheck3b-2026-12-06/reanalysis" \
  "s9 simcheckknee=$HERE/reanalysis" \
  "s8 simcheck3c=$H/grammarstep-simcheck3c-v2-2026-12-06/reanalysis-s9" \
  "s10 simcheckrealknee=$H/simcheckrealknee-2026-12-06/reanalysis" \
  "s10 simcheckrealknee2=$H/simcheckrealknee2-2026-12-06/reanalysis" \
  "s10 simchecklongctx=$H/simchecklongctx-2026-12-06/reanalysis" \
  "s10 simchecklongshared (documents shared across replays)=$H/simchecklongshared-2026-12-06/reanalysis" \
  "s10 simchecklongshared2=$H/simchecklongshared2-2026-12-06/reanalysis" \
  "s9 simcheckh200=bench/results/h200/simcheckh200-2026-12-06/reanalysis" \
  "s9 simcheckh100b=$H/simcheckh100b-2026-12-06/reanalysis" > $HERE/summary.md
tail -1 $HERE/summary.md

#!/usr/bin/env bash
# GPU checks and benchmarks, run on the lent H200 machines (see docs/gpu.md):
#   bench/gpu_checks.sh STEP [STEP...]    steps: tests modeltests kernels breakdown engine prefixttft sampler grammarthreads grammarstep eagernoise
#                                         profiles
#                                         migration concurrent simcheck simcheck3 simcheck3b
#                                         simcheck3c simcheckknee simcheckrealknee
#                                         simcheckrealknee2 simchecklongctx simchecklongshared
#                                         simchecklongshared2
#                                         cluster-least_load cluster-llumnix (and -noqueue),
#                                         clusterreal-llumnix (issue 13 part B: 4+ GPUs)
#                                         simcheckh200 simcheckh200b simcheckh100b
# Writes logs and JSON under $OUT (or bench/results/tmp). Expects wheels of packages the
# image lacks in .whl (make gpu-wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/tmp}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FERRY_MODEL_CACHE=/tmp/ferry-models FERRY_LOG_LEVEL=warning
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"

# Keep what comes back under the device tool's limits (8 files, 16 MiB each): the step log
# gzipped; the refitted profiles (large, and remade from it) left out.
tidy_simcheck() {
  gzip -9f "$1/steps.jsonl" 2>/dev/null
  rm -f "$1"/profile-insitu*.json
  # each real replay's per-request records (ferry bench serve JSON), one archive
  if [ -d "$1/serve" ]; then tar czf "$1/serve.tar.gz" -C "$1" serve && rm -rf "$1/serve"; fi
}

# simcheck NAME TIMEOUT_S MODEL SIM_CHECK_ARGS...: one real worker (random:MODEL, checked
# against the MODEL-h200 bundled profile) and the simulator on the same traces
# (experiments/sim_check.py), into $OUT/NAME, its log $OUT/NAME.log, tidied
simcheck() {
  local name=$1 limit=$2 model=$3; shift 3
  timeout "$limit" python3 -m experiments.sim_check --model "random:$model" --device cuda \
    --profile "services/worker/profiles/$model-h200.json" "$@" --out-dir "$OUT/$name" \
    --serve-dir "$OUT/$name/serve" 2>&1 | tee "$OUT/$name.log" | tail -40
  tidy_simcheck "$OUT/$name"
}

# clustercheck NAME TIMEOUT_S POLICY HOLD KV_BLOCKS RATES: issue 13 part B, one policy on
# one llama3-8b worker per GPU of the machine (experiments/cluster_check.py), ShareGPT-like,
# 1000 requests a rate; the deterministic simulation only (the CPU re-analysis, --replayed,
# adds the spread seeds). Everything of a run comes back as one NAME.tar.gz.
clustercheck() {
  local name=$1 limit=$2 policy=$3 hold=$4 blocks=$5 rates=$6
  timeout "$limit" python3 -m experiments.cluster_check --model random:llama3-8b --device cuda \
    --workers "$(nvidia-smi -L | wc -l)" --policy "$policy" "$hold" --kv-blocks "$blocks" \
    --kinds sharegpt --rates "$rates" --num 1000 --warm-up 30 --spread-seeds 0 \
    --request-path-ms 2.1,2.1 --out-dir "$OUT/$name" 2>&1 | tee "$OUT/$name.log" | tail -30
  rm -f "$OUT/$name"/profile-cycle.json "$OUT/$name"/*.png
  gzip -9f "$OUT/$name"/steps-*.jsonl 2>/dev/null
  tar czf "$OUT/$name.tar.gz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
}

for step in "$@"; do
  echo "=== $step"
  case $step in
    tests)
      timeout 420 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider -o addopts="" \
        -rs --timeout 400 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    modeltests)
      timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_model_gpu.py -p no:cacheprovider \
        -o addopts="" -rs -s --timeout 280 2>&1 | tee "$OUT/gpu_model_tests.log" \
        | grep -E "agreement|passed|failed|Error" | tail -12 ;;
    kernels)
      timeout 400 python3 -m ferry.bench.kernels_bench --out "$OUT/kernels_h200.json" 2>&1 \
        | tee "$OUT/kernels_h200.log" | tail -40 ;;
    breakdown)
      timeout 400 python3 -m ferry.bench.decode_breakdown --out "$OUT/decode_breakdown_h200.json" 2>&1 \
        | tee "$OUT/decode_breakdown_h200.log" | tail -20 ;;
    engine)
      timeout 400 python3 -m ferry.bench.engine_bench --out "$OUT/engine.json" 2>&1 \
        | tee "$OUT/engine.log" | tail -20 ;;
    prefixttft)
      # TTFT of an 8k-token prompt whose first 7k tokens are cached vs not, outputs on/off
      timeout 300 python3 -m ferry.bench.prefix_ttft --out "$OUT/prefix_ttft.json" 2>&1 \
        | tee "$OUT/prefix_ttft.log" | tail -8 ;;
    sampler)
      # the sampler's cost per step: penalties + logprobs, then a grammar's bitmask
      timeout 150 python3 -m ferry.bench.sampler_bench --device cuda --out "$OUT/sampler_gpu.json" \
        2>&1 | tee "$OUT/sampler_gpu.log" | tail -12
      timeout 150 python3 -m ferry.bench.grammar_bench --device cuda --vocab 32000,128256 \
        --out "$OUT/grammar_gpu.json" 2>&1 | tee "$OUT/grammar_gpu.log" | tail -12
      # the whole decode step (llama3-8b forward + sampler): the issue's 10% target
      timeout 200 python3 -m ferry.bench.sampling_step_bench --model random:llama3-8b \
        --device cuda --out "$OUT/sampling_step_gpu.json" 2>&1 \
        | tee "$OUT/sampling_step_gpu.log" | tail -6 ;;
    grammarthreads)
      # a grammar step's mask: the book sharded over its threads (the worker's) vs one
      # book shared by them; then the whole decode step at batch 64 with 4 and 8 threads
      for threads in 4 8; do
        timeout 120 python3 -m ferry.bench.grammar_bench --device cuda --vocab 128256 \
          --batch 64 --grammar-threads $threads --layouts sharded,shared \
          --out "$OUT/grammar_layouts_$threads.json" 2>&1 | tail -3
      done
      for threads in 4 8; do
        timeout 120 python3 -m ferry.bench.sampling_step_bench --model random:llama3-8b \
          --device cuda --batch 64 --grammar-threads $threads \
          --out "$OUT/sampling_step_$threads.json" 2>&1 | tail -3
      done ;;
    grammarstep)
      # the whole decode step at batch 1 and 64 with json_schema rows (and without)
      timeout 120 python3 -m ferry.bench.sampling_step_bench --model random:llama3-8b \
        --device cuda --batch 1,64 --out "$OUT/sampling_step.json" 2>&1 | tail -4 ;;
    eagernoise)
      # eager (prefill / mixed) steps alone vs beside a GIL-holding Python thread: where
      # the serving worker's wide eager-step spread comes from (sim-check3 README)
      timeout 200 python3 -m ferry.bench.eager_noise --out "$OUT/eager_noise.json" 2>&1 \
        | tee "$OUT/eager_noise.log" | tail -9 ;;
    profiles)
      for preset in llama3-8b llama2-7b; do
        timeout 250 python3 -m ferry.services.cli profile --model "random:$preset" --device cuda \
          --name "$preset-h200" --out "$OUT/$preset-h200.json" 2>&1 | tail -3
      done ;;
    migration)
      timeout 560 python3 -m ferry.bench.migration_bench --devices cuda:0,cuda:1 --log-dir "$OUT/mlogs" \
        --out "$OUT/migration_h200x2.json" 2>&1 | tee "$OUT/migration_h200x2.log" | tail -14 ;;
    concurrent)
      timeout 400 python3 -m ferry.bench.migration_bench --devices cuda:0,cuda:1,cuda:2,cuda:3 \
        --concurrent --verify-kv --lengths 1024,8192,32768 --log-dir "$OUT/clogs" \
        --out "$OUT/migration_h200x4_concurrent.json" 2>&1 | tail -6 ;;
    simcheck)
      # the simulator against one real worker (random:llama2-7b, 1000 KV blocks): ~5 min
      simcheck simcheck 420 llama2-7b --kv-blocks 1000 --num 100 --kinds M-M,L-L \
        --load-fractions 0.5,0.8,1.1 ;;
    simcheck3)
      # issue 13 part A's other model and traces: llama3-8b, ShareGPT-like and multi-turn
      simcheck simcheck3 560 llama3-8b --kv-blocks 1000 --num 100 --kinds sharegpt,multiturn \
        --load-fractions 0.5,0.8,1.1 ;;
    simcheck3b)
      # ShareGPT-like again, at rates below and at the H100's knee (simcheck3's fractions of
      # the H200 profile's estimate were all past it), after an unmeasured warm-up replay
      simcheck simcheck3b 400 llama3-8b --kv-blocks 1000 --num 100 --kinds sharegpt \
        --rates 1.5,2.5,4.0 --warm-up 30 ;;
    simcheck3c)
      # the KV an 80 GB card really has for llama3-8b (25,000 blocks = 50 GiB), ShareGPT-like
      # at 0.5 / 0.8 / 1.1 of the H100 cycle fit's capacity estimate (13.9 req/s)
      simcheck simcheck3c 400 llama3-8b --kv-blocks 25000 --num 150 --kinds sharegpt \
        --rates 7,11,15 --warm-up 30 ;;
    simcheckknee)
      # the two rows outside 15% with 500 requests instead of 100 (a P99 of 100 is the
      # second-slowest request: at the knee one request's fate): ShareGPT-like at 4.0 req/s
      # and multi-turn at 12.73, 1000 blocks; the CPU re-analysis (--replayed) adds the
      # spread seeds and the sensitivity
      simcheck simcheckknee 560 llama3-8b --kv-blocks 1000 --num 500 \
        --kinds sharegpt,multiturn --rates sharegpt:4.0,multiturn:12.73 --warm-up 30 \
        --spread-seeds 0 --sensitivity "" ;;
    simcheckrealknee)
      # past the knee with a card's real KV: llama3-8b, 25,000 blocks (an H100's), 1000
      # ShareGPT-like requests at 12 and 16 req/s (0.86 / 1.15 of the H100 cycle fit's
      # capacity estimate, 13.9): a burst of 200 requests never reached the knee there
      simcheck simcheckrealknee 560 llama3-8b --kv-blocks 25000 --num 1000 --kinds sharegpt \
        --rates 12,16 --warm-up 30 --spread-seeds 0 --sensitivity "" ;;
    simcheckrealknee2)
      # simcheckrealknee's trace past the TTFT knee: at 16 req/s the H100 served 13.4 req/s
      # with P99 TTFT 0.22 s (prefill goes first; decode slows). At 20 and 24 req/s the
      # backlog fills the 25,000 blocks within the trace, and requests queue for room.
      simcheck simcheckrealknee2 560 llama3-8b --kv-blocks 25000 --num 1000 --kinds sharegpt \
        --rates 20,24 --warm-up 30 --spread-seeds 0 --sensitivity "" ;;
    simchecklongctx)
      # long contexts (the Mooncake-like longctx trace: prompts 4k-64k here, median 5.5k,
      # short outputs), llama3-8b with an H100's real KV (25,000 blocks), at 0.8 / 1.6 /
      # 2.4 req/s: below, near and past the knee the H100 serving profile puts near 2.2
      simcheck simchecklongctx 560 llama3-8b --kv-blocks 25000 --num 100 --kinds longctx \
        --max-total-tokens 65536 --rates 0.8,1.6,2.4 --warm-up 20 --spread-seeds 0 \
        --sensitivity "" ;;
    simchecklongshared)
      # hot long prefixes (longctx-shared: half the requests ask about one of 16 long
      # documents, Zipf-popular; the rest long prompts of their own), prompts to 64k,
      # llama3-8b with an H100's real KV: the prefix cache's hits and evictions, real
      # against simulated, at 1.6 / 3.2 / 4.8 req/s (the knee near 4 by the H100 profile)
      simcheck simchecklongshared 560 llama3-8b --kv-blocks 25000 --num 150 \
        --kinds longctx-shared --tenants 16 --max-total-tokens 65536 --rates 1.6,3.2,4.8 \
        --warm-up 20 --spread-seeds 0 --sensitivity "" ;;
    simchecklongshared2)
      # simchecklongshared again with each replay's own documents (bench/workload.py: the
      # seed's), shorter (a session's last minutes of device time): below and past the knee
      simcheck simchecklongshared2 300 llama3-8b --kv-blocks 25000 --num 100 \
        --kinds longctx-shared --tenants 16 --max-total-tokens 65536 --rates 1.6,4.0 \
        --warm-up 20 --spread-seeds 0 --sensitivity "" ;;
    simcheckh200)
      # the KV an H200 really has beside llama3-8b (56,596 blocks, 110 GiB: the bundled
      # profile's, measured on an H200; needs an H200), ShareGPT-like at 0.4 / 0.7 / 1.0 of
      # the H200 profile's capacity estimate (35.4 req/s). The simulations are few here
      # (no spread seeds, no sensitivity): the CPU re-analysis (--replayed) runs them all.
      simcheck simcheckh200 330 llama3-8b --kv-blocks 56596 --num 200 --kinds sharegpt \
        --load-fractions 0.4,0.7,1.0 --warm-up 30 --spread-seeds 0 --sensitivity "" ;;
    simcheckh200b)
      # llama2-7b with the KV an H200 really has beside it (14,532 blocks, 113.5 GiB; needs
      # an H200), L-L at 0.5 / 0.8 / 1.1 of the H200 profile's capacity estimate (8.6)
      simcheck simcheckh200b 300 llama2-7b --kv-blocks 14532 --num 100 --kinds L-L \
        --load-fractions 0.5,0.8,1.1 --warm-up 20 --spread-seeds 0 --sensitivity "" ;;
    simcheckh100b)
      # llama2-7b with the KV an 80 GB card holds beside it (7,000 blocks, 55 GiB), L-L at
      # 0.5 / 0.8 / 1.1 of the H200 profile's capacity estimate at that KV (7.8)
      simcheck simcheckh100b 300 llama2-7b --kv-blocks 7000 --num 100 --kinds L-L \
        --load-fractions 0.5,0.8,1.1 --warm-up 20 --spread-seeds 0 --sensitivity "" ;;
    cluster-least_load|cluster-llumnix|cluster-least_load-noqueue|cluster-llumnix-noqueue)
      # issue 13 part B (4 GPUs: nvidia-h100-x4 / nvidia-h200-x4), paper-like memory
      # pressure (1000 blocks a worker), at 0.85 and 1.1 of four times one H100's knee at
      # that KV (4.23 req/s, bench/results/h100/simcheckknee-2026-12-06); about 6 minutes
      policy=${step#cluster-}; policy=${policy%-noqueue}
      hold=--hold-until-room; [[ $step == *-noqueue ]] && hold=--no-hold-until-room
      clustercheck "$step" 560 "$policy" "$hold" 1000 14.4,18.6 ;;
    clusterreal-llumnix)
      # part B with each card's real KV (25,000 blocks a worker on an H100), past four
      # times one H100's knee there (17.9 req/s)
      clustercheck "$step" 560 llumnix --hold-until-room 25000 64,80 ;;
    *) echo "unknown step $step" ;;
  esac
done

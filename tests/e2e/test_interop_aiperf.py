"""A third-party benchmark client against Ferry (issue 16: "a test runs one of them"):
NVIDIA's aiperf 0.13, from its own virtual environment (.venv-interop: `make interop`, which
`make test` builds first), runs unmodified against `ferry up` with the tiny model on CPU:
streaming /v1/completions and /v1/chat/completions with include_usage, /v1/models (its
readiness check) and /metrics (its server-metrics scrape). From its exported artifacts:
every request succeeded, TTFT and ITL are positive, every output has exactly the max_tokens
asked (ignore_eos, through --extra-inputs), and it read Ferry's metrics.

aiperf is offline here: its tokenizer is the tiny model's, filed in a hub cache of the
test's own (bench/interop_check.py `hub_cache` says why not the model directory itself)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ferry.bench.interop_check import (
    AIPERF,
    aiperf_env,
    aiperf_profile,
    read_records,
    read_summary,
    run_aiperf,
)
from ferry.bench.local_cluster import Cluster, start_cluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not AIPERF.exists(), reason=(
        f"{AIPERF} is missing: run `make interop` (`make test` builds it; plain pytest does "
        "not)")),
]

NUM_REQUESTS = 8
PROMPT_TOKENS = 24
OUTPUT_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("interop")
    models = tmp_path_factory.getbasetemp() / "models"
    c = start_cluster(tmp, workers=2, model_cache=str(models),
                      extra=("--worker-arg=--num-blocks=1024",))
    yield c
    c.stop()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_aiperf_profiles_ferry_unmodified(cluster, endpoint, tmp_path):
    env, tokenizer = aiperf_env(tmp_path, Path(cluster.ready["model"]))
    artifacts = tmp_path / "artifacts"
    command = aiperf_profile(
        url=cluster.base_url, model="tiny", tokenizer=tokenizer, artifact_dir=artifacts,
        args=("--endpoint-type", endpoint, "--request-count", str(NUM_REQUESTS),
              "--concurrency", "2", "--isl", str(PROMPT_TOKENS), "--osl", str(OUTPUT_TOKENS),
              "--extra-inputs", "ignore_eos:true", "--random-seed", "0",
              # readiness: GET /v1/models, then a one-token request
              "--wait-for-model-timeout", "60", "--wait-for-model-mode", "both"))
    run_aiperf(command, env, timeout_s=240)

    records = read_records(artifacts)
    assert len(records) == NUM_REQUESTS
    assert [r["error"] for r in records if r.get("error")] == []
    for record in records:
        metrics = {name: m["value"] for name, m in record["metrics"].items()}
        assert metrics["time_to_first_token"] > 0, metrics
        assert metrics["inter_token_latency"] > 0, metrics
        # the usage of the stream's last chunk (include_usage): exactly what was asked
        assert metrics["usage_completion_tokens"] == OUTPUT_TOKENS, metrics
        assert metrics["output_sequence_length"] == OUTPUT_TOKENS, metrics
        assert metrics["http_req_chunks_received"] > OUTPUT_TOKENS // 2, "streamed in pieces"

    summary = read_summary(artifacts)
    assert summary["error_summary"] == [] and summary["request_error_rate"]["avg"] == 0
    assert summary["request_count"]["avg"] == NUM_REQUESTS
    assert summary["time_to_first_token"]["p50"] > 0
    assert summary["inter_token_latency"]["p50"] > 0
    with (artifacts / "profile_export_aiperf.csv").open() as f:
        rows = {row[0]: row[1:] for row in csv.reader(f) if row}
    assert float(rows["Request Count"][0]) == NUM_REQUESTS
    assert float(rows["Request Error Rate (%)"][0]) == 0

    # /metrics: scraped, vLLM-style names under Ferry's prefix
    server = json.loads((artifacts / "server_metrics_export.json").read_text())
    assert server["summary"]["endpoints_successful"] == [cluster.base_url + "/metrics"]
    assert "ferry:e2e_request_latency_seconds" in server["metrics"]

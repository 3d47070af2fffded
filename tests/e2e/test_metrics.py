"""/metrics of a real cluster (`ferry up`, 2 tiny-model CPU workers): a migration moves the
scheduler's migration counters and downtime histogram; every instance has its gauges,
labelled with its model and id; every metric the Grafana dashboard (docs/grafana/ferry.json)
reads exists in the gateway's and the scheduler's scrapes, with series, after traffic."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.bench.local_cluster import Cluster, start_cluster
from ferry.common import wire
from ferry.common.zmq_util import make_context, request
from tests.unit.test_dashboard import (
    dashboard_exprs,
    family_of,
    load_dashboard,
    metric_names,
    scrape_families,
)

pytestmark = pytest.mark.e2e

# Families that have series only once their event happened (labelled by reason or code).
EVENT_ONLY = {"ferry:migrations_aborted", "ferry:instance_down", "ferry:gateways_gone"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("metrics")
    models = tmp_path_factory.getbasetemp() / "models"
    c = start_cluster(tmp, workers=2, model_cache=str(models),
                      extra=("--worker-arg=--num-blocks=1024",))
    yield c
    c.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: dict, name: str, **labels) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def by_instance(got: dict, name: str) -> dict[str, dict[str, str]]:
    """instance_id -> labels of the samples of `name`."""
    return {dict(labels)["instance_id"]: dict(labels)
            for sample, labels in got if sample == name}


async def holder_of(cluster: Cluster, req_id: str) -> str:
    reply = await request(make_context(), cluster.admin_addr, wire.StatusRequest(),
                          timeout_s=5, expected=(wire.StatusReply,))
    holders = [r.instance_id for r in reply.requests if r.req_id == req_id]
    assert holders, f"{req_id} is no longer running: make max_tokens larger"
    return holders[0]


def test_a_migration_moves_the_counters_and_the_downtime_histogram(cluster):
    from ferry import AsyncClient

    url = cluster.scheduler_metrics_url
    before = samples(fetch(url))

    async def body() -> str:
        async with AsyncClient(cluster.sdk_addr) as client:
            stream = client.stream(prompt_token_ids=list(range(100, 260)), max_tokens=1500,
                                   ignore_eos=True, temperature=0.0)
            num_tokens = 0
            async for chunk in stream:
                num_tokens += len(chunk.token_ids)
                if num_tokens >= 40:
                    holder = await holder_of(cluster, chunk.req_id)
                    dst = "worker-1" if holder == "worker-0" else "worker-0"
                    out = await asyncio.to_thread(cluster.cli, "migrate", chunk.req_id,
                                                  "--to", dst)
                    assert out.returncode == 0, out.stderr + cluster.logs()
                    break
            await stream.aclose()  # aborts the rest
            return dst

    asyncio.run(asyncio.wait_for(body(), 120))
    after = samples(fetch(url))
    for name in ("ferry:migrations_started_total", "ferry:migrations_committed_total",
                 "ferry:migration_downtime_seconds_count",
                 "ferry:migration_downtime_seconds_bucket"):
        labels = {"le": "+Inf"} if name.endswith("_bucket") else {}
        assert value(after, name, **labels) == value(before, name, **labels) + 1, name
    downtime = (value(after, "ferry:migration_downtime_seconds_sum")
                - value(before, "ferry:migration_downtime_seconds_sum"))
    assert 0 < downtime < 5
    assert value(after, "ferry:migration_bytes_total") > value(before, "ferry:migration_bytes_total")
    assert value(after, "ferry:migration_stages_total") > value(before, "ferry:migration_stages_total")
    assert value(after, "ferry:migrations_in_flight") == 0

    # Per instance, from the load reports: both workers, labelled with model and id.
    model_name = Path(cluster.ready["model"]).name
    deadline = time.monotonic() + 10
    while True:
        got = samples(fetch(url))
        queued = sum(v for (name, _), v in got.items()
                     if name == "ferry:request_queue_time_seconds_count")
        if queued >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert queued >= 1  # the request's wait at its first instance
    for name in ("ferry:num_requests_running", "ferry:num_requests_waiting",
                 "ferry:kv_cache_usage_perc", "ferry:num_preemptions_total",
                 "ferry:prefix_cache_queries_total", "ferry:generation_tokens_total",
                 "ferry:request_queue_time_seconds_count"):
        found = by_instance(got, name)
        assert set(found) == {"worker-0", "worker-1"}, (name, found)
        assert all(labels["model_name"] == model_name for labels in found.values()), found
    generated = by_instance(got, "ferry:generation_tokens_total")
    assert sum(value(got, "ferry:generation_tokens_total", **labels)
               for labels in generated.values()) >= 40
    cluster.wait_idle()


def test_every_metric_the_dashboard_reads_exists_after_traffic(cluster):
    import httpx

    with httpx.Client(base_url=cluster.base_url, timeout=60) as http:
        for i in range(3):
            resp = http.post("/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 6})
            assert resp.status_code == 200, resp.text
        assert http.post("/v1/completions", json={"prompt": "x", "n": 0}).status_code == 400
    cluster.wait_idle()
    time.sleep(0.3)  # a load report after the last request
    families, num_samples = {}, {}
    for url in (cluster.ready["metrics"]["gateway"], cluster.scheduler_metrics_url):
        types, counts = scrape_families(fetch(url))
        families.update(types)
        for name, num in counts.items():
            num_samples[name] = num_samples.get(name, 0) + num
    read = {name for _, expr in dashboard_exprs(load_dashboard()) for name in metric_names(expr)}
    assert len(read) > 20
    missing = sorted(name for name in read if family_of(name, families) is None)
    assert not missing, f"the dashboard reads metrics no process exports: {missing}"
    empty = sorted(name for name in read
                   if family_of(name, families) not in EVENT_ONLY
                   and num_samples[family_of(name, families)] == 0)
    assert not empty, f"no series after traffic: {empty}"

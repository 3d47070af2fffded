"""The scheduler's /metrics (services/scheduler/metrics.py) over a SchedulerCore without
sockets: per-instance families from the reports, migration outcomes and histograms, the
pending queue, failures; the exposition parsed back; the HTTP server; the flag."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ferry.common.histogram import QUEUE_TIME_BOUNDS_S, Buckets, is_cumulative
from ferry.common.wire import LoadReport, MigrationDone, Register, Release
from ferry.services.scheduler.core import Pending
from ferry.services.scheduler.entry import add_arguments
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.metrics import (
    DEFAULT_METRICS_PORT,
    MetricsServer,
    SchedulerCollector,
    SchedulerStats,
    make_registry,
)
from tests.unit.test_scheduler_core import addr, make_core, request


def test_buckets_are_prometheus_cumulative():
    b = Buckets((0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 3.0, 50.0):
        b.observe(value)
    assert b.cumulative() == (2, 3, 4, 5) and b.count == 5  # le: 0.1 counts in the first
    assert b.sum == pytest.approx(53.65)
    assert is_cumulative(b.bounds, b.cumulative())
    assert not is_cumulative(b.bounds, (2, 3, 4))  # one count short
    assert not is_cumulative(b.bounds, (2, 1, 4, 5))  # decreasing
    for bad in ((), (1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            Buckets(bad)


def register(core, instance_id, model_name="m1", now=0.0):
    return core.register(Register(
        instance_id=instance_id, inbox_addr=addr(instance_id), num_blocks=100, block_size=16,
        max_model_len=4096, req_ids=(), model_name=model_name,
        queue_time_bounds_s=QUEUE_TIME_BOUNDS_S), now)


def report(core, instance_id, seq, now, counts=(), queue_sum=0.0, **fields):
    load = dataclasses.replace(empty_load(100), **fields)
    return core.load_report(LoadReport(
        instance_id=instance_id, inbox_addr=addr(instance_id), seq=seq,
        num_dispatch_received=0, load=load, queue_time_counts=counts,
        queue_time_sum_s=queue_sum), now)


def done(migration_id, committed=True, reason="", **fields):
    return MigrationDone(
        migration_id=migration_id, req_id="r0", src_instance_id="w0", dst_instance_id="w1",
        committed=committed, reason=reason, num_stages=3, num_blocks=4, num_bytes=4096,
        total_s=0.2, downtime_s=0.004, **fields)


def scrape(collector: SchedulerCollector) -> dict:
    """name -> {tuple(sorted labels) -> value} of every sample, and the families' types."""
    text = generate_latest(make_registry(collector)).decode()
    samples: dict[str, dict[tuple, float]] = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return {"samples": samples, "types": types, "text": text}


def one(samples: dict, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_per_instance_families_come_from_the_last_report():
    core = make_core()
    register(core, "w0", model_name="llama")
    register(core, "w1", model_name="llama")
    register(core, "w2")  # registered, no report yet: not exported
    counts = (0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4)
    report(core, "w0", 1, 0.1, counts=counts, queue_sum=7.25, num_running=3, num_waiting=2,
           num_free_blocks=40, num_cached_blocks=15, num_preemptions=5, num_prompt_tokens=900,
           num_prefix_hit_tokens=300, num_generation_tokens=1234, prefill_tokens_per_s=5e3,
           step_time_ewma_s=0.02)
    report(core, "w1", 1, 0.1, num_free_blocks=100)
    got = scrape(SchedulerCollector(core, SchedulerStats()))
    s, types = got["samples"], got["types"]
    w0 = dict(model_name="llama", instance_id="w0")
    assert one(s, "ferry:num_requests_running", **w0) == 3
    assert one(s, "ferry:num_requests_waiting", **w0) == 2
    assert one(s, "ferry:kv_cache_usage_perc", **w0) == pytest.approx(0.6)  # cached count free
    assert one(s, "ferry:kv_cache_usage_perc", model_name="llama", instance_id="w1") == 0
    assert one(s, "ferry:prefix_cache_blocks", **w0) == 15
    assert one(s, "ferry:prefill_tokens_per_second", **w0) == 5e3
    assert one(s, "ferry:step_time_seconds", **w0) == 0.02
    assert one(s, "ferry:num_preemptions_total", **w0) == 5
    assert one(s, "ferry:prefix_cache_queries_total", **w0) == 900
    assert one(s, "ferry:prefix_cache_hits_total", **w0) == 300
    assert one(s, "ferry:prompt_tokens_total", **w0) == 900
    assert one(s, "ferry:generation_tokens_total", **w0) == 1234
    assert one(s, "ferry:request_queue_time_seconds_bucket", le="0.001", **w0) == 0
    assert one(s, "ferry:request_queue_time_seconds_bucket", le="0.0025", **w0) == 1
    assert one(s, "ferry:request_queue_time_seconds_bucket", le="+Inf", **w0) == 4
    assert one(s, "ferry:request_queue_time_seconds_count", **w0) == 4
    assert one(s, "ferry:request_queue_time_seconds_sum", **w0) == 7.25
    # w1 sent no queue-time counts: no histogram for it; w2 has not reported: nothing
    assert ("instance_id", "w1") not in dict_keys(s["ferry:request_queue_time_seconds_count"])
    assert {dict(k)["instance_id"] for k in s["ferry:num_requests_running"]} == {"w0", "w1"}
    assert types["ferry:num_requests_running"] == "gauge"
    assert types["ferry:num_preemptions"] == "counter"
    assert types["ferry:request_queue_time_seconds"] == "histogram"
    # a later report replaces the numbers; a dead instance disappears
    report(core, "w0", 2, 0.2, counts=counts, num_running=1, num_free_blocks=100)
    core.expire(10.0)
    s = scrape(SchedulerCollector(core, SchedulerStats()))["samples"]
    assert "ferry:num_requests_running" not in s


def dict_keys(series: dict) -> set:
    return {pair for key in series for pair in key}


def test_migration_counters_and_histograms():
    core = make_core()
    register(core, "w0")
    register(core, "w1")
    stats = SchedulerStats()
    collector = SchedulerCollector(core, stats)
    assert core.dispatch(request("r0")) in ("w0", "w1")
    before = scrape(collector)["samples"]
    assert one(before, "ferry:migrations_started_total") == 0
    assert one(before, "ferry:migration_downtime_seconds_count") == 0
    ids = [core.migrate_request("r0", "w1" if core.reqs["r0"].instance_id == "w0" else "w0",
                                1.0)[0] for _ in range(1)]
    s = scrape(collector)["samples"]
    assert one(s, "ferry:migrations_started_total") == 1
    assert one(s, "ferry:migrations_in_flight") == 1
    for msg in (done(ids[0], first_stage_bytes=10**8, first_stage_s=0.5, token_gap_s=0.03),
                done("x-1", committed=False, reason="destination out of memory"),
                done("x-2", committed=False, reason="destination out of memory")):
        core.migration_done(msg)
        stats.migration_done(msg)
    s = scrape(collector)["samples"]
    assert one(s, "ferry:migrations_committed_total") == 1
    assert one(s, "ferry:migrations_aborted_total", reason="destination out of memory") == 2
    assert one(s, "ferry:migrations_in_flight") == 0
    assert one(s, "ferry:migration_downtime_seconds_count") == 1
    assert one(s, "ferry:migration_downtime_seconds_bucket", le="0.003") == 0
    assert one(s, "ferry:migration_downtime_seconds_bucket", le="0.005") == 1
    assert one(s, "ferry:migration_downtime_seconds_sum") == pytest.approx(0.004)
    assert one(s, "ferry:migration_token_gap_seconds_count") == 1
    assert one(s, "ferry:migration_bytes_total") == 3 * 4096  # every outcome's bytes
    assert one(s, "ferry:migration_stages_total") == 9
    assert one(s, "ferry:migration_bulk_bandwidth_bytes_per_s_count") == 1
    assert one(s, "ferry:migration_bulk_bandwidth_bytes_per_s_sum") == pytest.approx(2e8)
    assert one(s, "ferry:migration_bulk_bandwidth_bytes_per_s_bucket", le="1e+08") == 0
    assert one(s, "ferry:migration_bulk_bandwidth_bytes_per_s_bucket", le="3e+08") == 1


def test_pending_queue_autoscaling_and_failures():
    core = make_core(pending_max_wait_s=1.0)
    register(core, "w0")
    report(core, "w0", 1, 0.0, num_free_blocks=1)  # no room for a 2-block prompt
    stats = SchedulerStats()
    collector = SchedulerCollector(core, stats)
    assert isinstance(core.dispatch(request("r0"), now=0.0), Pending)
    assert isinstance(core.dispatch(request("r1"), now=0.1), Pending)
    s = scrape(collector)["samples"]
    assert one(s, "ferry:pending_requests") == 2
    assert one(s, "ferry:pending_wait_seconds_count") == 0
    report(core, "w0", 2, 0.3, num_free_blocks=100)
    placed, _ = core.release_pending(0.3)
    assert [p.req.req_id for p in placed] == ["r0", "r1"]
    core.release(Release(req_id="r0", reason="finished"))
    s = scrape(collector)["samples"]
    assert one(s, "ferry:pending_requests") == 0
    assert one(s, "ferry:pending_wait_seconds_count") == 2
    assert one(s, "ferry:pending_wait_seconds_sum") == pytest.approx(0.3 + 0.2)
    assert one(s, "ferry:requests_dispatched_total") == 2
    stats.autoscaled("scale_up")
    core.see_gateway("tcp://gw:1", 0.0, "p1")
    core.see_gateway("tcp://gw:1", 0.5, "p2")  # a restart at the same inbox
    core.expire(5.0)  # w0 silent since 0.3
    s = scrape(collector)["samples"]
    assert one(s, "ferry:autoscale_actions_total", action="scale_up") == 1
    assert one(s, "ferry:autoscale_actions_total", action="drain") == 0
    assert one(s, "ferry:instance_down_total", reason="heartbeat timeout") == 1
    assert one(s, "ferry:gateways_gone_total", reason="restarted") == 1
    assert one(s, "ferry:instances", state="dead") == 1
    assert one(s, "ferry:instances", state="serving") == 0


def test_every_family_is_declared_before_anything_happened():
    """A dashboard's queries find every family on a fresh scheduler (labelled families
    with no series yet are declared all the same)."""
    text = scrape(SchedulerCollector(make_core(), SchedulerStats()))["text"]
    for name in ("ferry:num_requests_running", "ferry:kv_cache_usage_perc",
                 "ferry:request_queue_time_seconds", "ferry:migrations_aborted_total",
                 "ferry:migration_downtime_seconds", "ferry:pending_wait_seconds",
                 "ferry:autoscale_actions_total", "ferry:instance_down_total"):
        assert f"# TYPE {name} " in text, name


def test_metrics_server_serves_the_registry_over_http():
    async def body():
        core = make_core()
        register(core, "w0")
        report(core, "w0", 1, 0.0, num_running=2)
        server = MetricsServer(make_registry(SchedulerCollector(core, SchedulerStats())),
                               "127.0.0.1", 0)
        await server.start()
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            text, ctype = await asyncio.to_thread(fetch, url)
        finally:
            await server.stop()
        assert ctype.startswith("text/plain")
        assert 'ferry:num_requests_running{instance_id="w0",model_name="m1"} 2.0' in text

    asyncio.run(body())


def fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def test_metrics_port_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).metrics_port == DEFAULT_METRICS_PORT == 5603
    assert parser.parse_args(["--metrics-port", "0"]).metrics_port == 0

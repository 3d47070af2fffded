"""The scheduler's /metrics (`--metrics-port`, 5603): the cluster as Prometheus sees it,
read from the scheduler's own state when scraped, never updated per load report.

    per instance (model_name, instance_id)   from its last LoadReport (the worker's own
                                              numbers: cumulative ones are its counters)
    migrations                                Counters (MigrateOut issued, outcomes) and
                                              SchedulerStats (each MigrationDone)
    pending queue, autoscaler, failures       PendingQueue, SchedulerStats, Counters

Names follow vLLM's under `ferry:` where the meaning is the same (num_requests_running,
kv_cache_usage_perc, num_preemptions_total, request_queue_time_seconds, prompt and
generation tokens, prefix_cache_queries/hits in tokens), so a vLLM dashboard reads them
with its prefix changed. The collector runs on the scheduler's event loop (the HTTP
server is aiohttp on that loop): it sees the state between two handlers, never mid-change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ferry.common.histogram import Buckets, is_cumulative
from ferry.common.wire import LoadFields, MigrationDone
from ferry.services.scheduler.load import freeness, to_wire

if TYPE_CHECKING:
    from ferry.services.scheduler.core import SchedulerCore

DEFAULT_METRICS_PORT = 5603  # beside the inbox (5600), admin (5601), gateway inbox (5602)
INSTANCE_LABELS = ("model_name", "instance_id")
# Paused time of a committed migration (DESIGN §6): ~3 ms on H200s, 16-180 ms on CPU.
DOWNTIME_BOUNDS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0, 2.5, 5.0)
# Bulk stage transfer rate, bytes/s: gloo on CPU ~1e8-1e9, NVLink up to ~3.6e11.
BANDWIDTH_BOUNDS = (1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11, 2e11, 3e11, 5e11,
                    1e12)
AUTOSCALE_ACTIONS = ("scale_up", "drain", "terminate")


class SchedulerStats:
    """What the scheduler learns from events it sees rarely (a MigrationDone, an autoscaler
    decision) and keeps only for /metrics. Pure."""

    def __init__(self) -> None:
        self.downtime = Buckets(DOWNTIME_BOUNDS_S)  # committed migrations
        self.token_gap = Buckets(DOWNTIME_BOUNDS_S)  # committed: last token on src to first on dst
        self.bulk_bandwidth = Buckets(BANDWIDTH_BOUNDS)  # first_stage_bytes / first_stage_s
        self.num_migration_bytes = 0  # KV bytes sent, every outcome
        self.num_migration_stages = 0  # stages run, every outcome
        self.autoscale_actions = dict.fromkeys(AUTOSCALE_ACTIONS, 0)

    def migration_done(self, msg: MigrationDone) -> None:
        self.num_migration_bytes += max(0, msg.num_bytes)
        self.num_migration_stages += max(0, msg.num_stages)
        if msg.first_stage_bytes > 0 and msg.first_stage_s > 0:
            self.bulk_bandwidth.observe(msg.first_stage_bytes / msg.first_stage_s)
        if msg.committed:
            self.downtime.observe(max(0.0, msg.downtime_s))
            if msg.token_gap_s > 0:
                self.token_gap.observe(msg.token_gap_s)

    def autoscaled(self, action: str) -> None:
        self.autoscale_actions[action] = self.autoscale_actions.get(action, 0) + 1


class TransportCounters(Protocol):
    """What the collector reads of the process around the core (main.Scheduler)."""

    num_send_dropped: int  # messages the scheduler could not send, total
    num_handler_errors: int  # messages whose handler raised, total


class SchedulerCollector:
    """A prometheus_client collector over the scheduler's state (see the module docstring).
    `process`: the Scheduler around the core, for its transport counters (None in tests
    of the core alone)."""

    def __init__(self, core: SchedulerCore, stats: SchedulerStats,
                 process: TransportCounters | None = None) -> None:
        self.core = core
        self.stats = stats
        self.process = process

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        yield from self._migrations()
        yield from self._cluster()

    # ---- per instance -----------------------------------------------------------------

    def _instances(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=INSTANCE_LABELS)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=INSTANCE_LABELS)

        running = gauge("ferry:num_requests_running",
                        "Requests in the instance's batch (paused by a migration included).")
        waiting = gauge("ferry:num_requests_waiting",
                        "Requests queued at the instance (preempted ones included).")
        kv_use = gauge("ferry:kv_cache_usage_perc",
                       "KV-cache usage, 1 = full: 1 - free/total blocks, evictable "
                       "prefix-cache blocks counted as free (vLLM's meaning).")
        cached = gauge("ferry:prefix_cache_blocks",
                       "Free blocks holding a cached prefix (evictable).")
        prefill_rate = gauge("ferry:prefill_tokens_per_second",
                             "The instance's measured prefill rate (EWMA); 0 until measured.")
        step_time = gauge("ferry:step_time_seconds", "EWMA of the instance's engine step time.")
        free = gauge("ferry:instance_freeness",
                     "The global policy's freeness F (DESIGN §5): free blocks per running "
                     "request; very negative while draining.")
        draining = gauge("ferry:instance_draining", "1 while the instance takes no new work.")
        preemptions = counter("ferry:num_preemptions",
                              "Preemptions (recompute) at the instance since it started.")
        queries = counter("ferry:prefix_cache_queries",
                          "Prefix-cache queries, in tokens: prompt tokens of the requests "
                          "admitted.")
        hits = counter("ferry:prefix_cache_hits",
                       "Prefix-cache hits, in tokens: of those, found cached.")
        prompt = counter("ferry:prompt_tokens",
                         "Prompt tokens of the requests admitted at the instance (a request "
                         "preempted and admitted again counts again).")
        generation = counter("ferry:generation_tokens", "Tokens the instance generated.")
        queue_time = HistogramMetricFamily(
            "ferry:request_queue_time_seconds",
            "Each request's wait at the instance: its arrival there to its first step.",
            labels=INSTANCE_LABELS)
        headroom = self.core.cfg.high_priority_headroom_blocks
        for inst in sorted(self.core.table, key=lambda i: i.instance_id):
            load: LoadFields | None = inst.report
            if not inst.alive or load is None:
                continue
            labels = (inst.model_name, inst.instance_id)
            running.add_metric(labels, load.num_running)
            waiting.add_metric(labels, load.num_waiting)
            total = load.num_total_blocks
            kv_use.add_metric(labels, 1.0 - load.num_free_blocks / total if total > 0 else 0.0)
            cached.add_metric(labels, load.num_cached_blocks)
            prefill_rate.add_metric(labels, load.prefill_tokens_per_s)
            step_time.add_metric(labels, load.step_time_ewma_s)
            estimate = self.core.table.load(inst.instance_id)
            free.add_metric(labels, to_wire(freeness(estimate, headroom_blocks=headroom)))
            draining.add_metric(labels, 1.0 if estimate.draining else 0.0)
            preemptions.add_metric(labels, load.num_preemptions)
            queries.add_metric(labels, load.num_prompt_tokens)
            hits.add_metric(labels, load.num_prefix_hit_tokens)
            prompt.add_metric(labels, load.num_prompt_tokens)
            generation.add_metric(labels, load.num_generation_tokens)
            if is_cumulative(inst.queue_time_bounds_s, inst.queue_time_counts):
                queue_time.add_metric(labels, _buckets(inst.queue_time_bounds_s,
                                                       inst.queue_time_counts),
                                      inst.queue_time_sum_s)
        yield from (running, waiting, kv_use, cached, prefill_rate, step_time, free, draining,
                    preemptions, queries, hits, prompt, generation, queue_time)

    # ---- migrations ---------------------------------------------------------------------

    def _migrations(self) -> Iterator[Metric]:
        counters, stats = self.core.counters, self.stats
        yield CounterMetricFamily("ferry:migrations_started", "Migrations issued (MigrateOut).",
                                  value=counters.num_migrations_started)
        yield CounterMetricFamily("ferry:migrations_committed",
                                  "Migrations committed: the request runs on the destination.",
                                  value=counters.num_committed)
        aborted = CounterMetricFamily(
            "ferry:migrations_aborted",
            "Migrations aborted, by reason (at most 64 reasons, then \"other\"); the request "
            "went on where it was.", labels=("reason",))
        for reason, num in sorted(counters.abort_reasons.items()):
            aborted.add_metric((reason,), num)
        yield aborted
        yield GaugeMetricFamily("ferry:migrations_in_flight",
                                "Migrations issued with no outcome yet.",
                                value=len(self.core.migrations))
        yield _histogram("ferry:migration_downtime_seconds",
                         "A committed migration's paused time: the request's last step on the "
                         "source to its first on the destination.", stats.downtime)
        yield _histogram("ferry:migration_token_gap_seconds",
                         "A committed migration as the client sees it: the last token from the "
                         "source to the first from the destination.", stats.token_gap)
        yield CounterMetricFamily("ferry:migration_bytes", "KV bytes migrations sent.",
                                  value=stats.num_migration_bytes)
        yield CounterMetricFamily("ferry:migration_stages", "Stages migrations ran.",
                                  value=stats.num_migration_stages)
        yield _histogram("ferry:migration_bulk_bandwidth_bytes_per_s",
                         "Transfer rate of a migration's bulk (first) stage: its bytes over "
                         "its gather-and-send time.", stats.bulk_bandwidth)

    # ---- the rest of the scheduler --------------------------------------------------------

    def _cluster(self) -> Iterator[Metric]:
        core, counters = self.core, self.core.counters
        pending = core.pending
        yield GaugeMetricFamily("ferry:pending_requests",
                                "Requests held in the scheduler's pending queue.",
                                value=len(pending) if pending is not None else 0)
        if pending is not None:
            yield _histogram("ferry:pending_wait_seconds",
                             "How long a request was held in the pending queue (observed "
                             "when it is released to an instance).", pending.waits)
        actions = CounterMetricFamily("ferry:autoscale_actions",
                                      "Autoscaler actions: scale_up, drain, terminate.",
                                      labels=("action",))
        for action, num in sorted(self.stats.autoscale_actions.items()):
            actions.add_metric((action,), num)
        yield actions
        down = CounterMetricFamily("ferry:instance_down",
                                   "Instances declared down, by reason (gateways replay "
                                   "their requests).", labels=("reason",))
        for reason, num in sorted(counters.instances_down.items()):
            down.add_metric((reason,), num)
        yield down
        gone = CounterMetricFamily("ferry:gateways_gone",
                                   "Gateways declared gone (silent or restarted): workers "
                                   "drop their requests.", labels=("reason",))
        for reason, num in sorted(counters.gateways_gone.items()):
            gone.add_metric((reason,), num)
        yield gone
        instances = GaugeMetricFamily("ferry:instances", "Instances by state.",
                                      labels=("state",))
        states = {"serving": 0, "draining": 0, "dead": 0}
        for inst in core.table:
            state = ("dead" if not inst.alive
                     else "draining" if core.table.load(inst.instance_id).draining
                     else "serving")
            states[state] += 1
        for state, num in states.items():
            instances.add_metric((state,), num)
        yield instances
        yield GaugeMetricFamily("ferry:gateways", "Gateways heard from recently.",
                                value=len(core.gateways))
        yield CounterMetricFamily("ferry:requests_dispatched",
                                  "Requests placed on an instance (replays included).",
                                  value=counters.num_dispatched)
        yield CounterMetricFamily("ferry:dispatch_rejected",
                                  "Dispatches answered 503 (no instance) or 429 (full).",
                                  value=counters.num_rejected)
        if self.process is not None:
            yield CounterMetricFamily("ferry:scheduler_send_dropped",
                                      "Messages the scheduler could not queue for a peer.",
                                      value=self.process.num_send_dropped)
            yield CounterMetricFamily("ferry:scheduler_handler_errors",
                                      "Handlers that raised (bugs; the loop went on).",
                                      value=self.process.num_handler_errors)


def _buckets(bounds: tuple[float, ...], cumulative: tuple[int, ...]) -> list[tuple[str, float]]:
    return [*((floatToGoString(b), c) for b, c in zip(bounds, cumulative, strict=False)),
            ("+Inf", cumulative[-1])]


def _histogram(name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=_buckets(buckets.bounds, buckets.cumulative()),
                                 sum_value=buckets.sum)


def make_registry(collector: SchedulerCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class MetricsServer:
    """GET /metrics over HTTP, on the scheduler's event loop (no authentication: read-only
    numbers, bound to FERRY_BIND_HOST like every other port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port  # the bound port once started (for port 0)
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=30.0)
        self.listener: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and serve; OSError if the port is taken."""
        await self.runner.setup()
        assert self.runner.server is not None
        self.listener = await asyncio.get_running_loop().create_server(
            self.runner.server, self.host, self.port)
        self.port = self.listener.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

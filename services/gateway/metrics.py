"""Prometheus metrics of one gateway, in a registry of its own (served at /metrics, no API
key needed).

What a client sees, under vLLM's names with the `ferry:` prefix, labelled with the model
(`model_name`, the gateway's --model-name) and the instance that delivered the request's
first token (`instance_id`, "" when none did: a request that ended before its first
token); the gateway's own state under `ferry:gateway_*`. The scheduler's /metrics
(services/scheduler/metrics.py) has the instances' side (running, waiting, KV use, queue
time, their own token counters) and migrations.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets, with finer low ones: a tiny model on CPU, or a fast GPU decode step.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
               0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
               20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
REQUEST_LABELS = ("model_name", "instance_id")
MAX_INSTANCE_LABELS = 1024  # distinct instance_id values; later ones are labelled "other"


class Series:
    """The children of one (model_name, instance_id): what a request's metrics go to, looked
    up once per request (labels() is too slow for every token chunk)."""

    __slots__ = ("ttft", "inter_token", "e2e", "prompt_tokens", "generation_tokens",
                 "_success", "_labels", "_metrics")

    def __init__(self, metrics: GatewayMetrics, labels: tuple[str, str]) -> None:
        self.ttft = metrics.ttft.labels(*labels)
        self.inter_token = metrics.inter_token.labels(*labels)
        self.e2e = metrics.e2e.labels(*labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self.generation_tokens = metrics.generation_tokens.labels(*labels)
        self._success: dict[str, Counter] = {}
        self._labels = labels
        self._metrics = metrics

    def success(self, finished_reason: str) -> Counter:
        child = self._success.get(finished_reason)
        if child is None:
            child = self._success[finished_reason] = self._metrics.success.labels(
                *self._labels, finished_reason)
        return child


class GatewayMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "ferry:time_to_first_token_seconds",
            "Arrival at the gateway to the first output token delivered.",
            REQUEST_LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(
            "ferry:inter_token_latency_seconds",
            "Time per output token after the first (one sample per delivered chunk: the gap "
            "since the previous chunk divided by its tokens).",
            REQUEST_LABELS, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            "ferry:e2e_request_latency_seconds",
            "Arrival at the gateway to the end of the request (any finish reason).",
            REQUEST_LABELS, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "ferry:prompt_tokens",
            "Prompt tokens of the requests that got their first token.", REQUEST_LABELS,
            registry=r)
        self.generation_tokens = Counter(
            "ferry:generation_tokens", "Output tokens delivered to clients.", REQUEST_LABELS,
            registry=r)
        self.success = Counter(
            "ferry:request_success",
            "Requests finished, by finish reason (stop, length, abort, timeout); failures "
            "are in ferry:gateway_rejected_total.",
            (*REQUEST_LABELS, "finished_reason"), registry=r)
        # The gateway's own.
        self.rejected = Counter(
            "ferry:gateway_rejected",
            "Requests answered with an error, by code (refused, or failed in flight).",
            ["code"], registry=r)
        self.replays = Counter(
            "ferry:gateway_replays",
            "Requests dispatched again as a new attempt: their instance died or dropped "
            "them, a bypass or scheduler-restart re-dispatch.", registry=r)
        self.bad_client_messages = Counter(
            "ferry:gateway_bad_client_messages",
            "Unreadable or unexpected messages on the SDK socket (answered with an error).",
            registry=r)
        self.inflight = Gauge("ferry:gateway_inflight_requests", "Requests in flight.",
                              registry=r)
        self.bypass = Gauge("ferry:gateway_bypass_mode",
                            "1 while dispatching straight to workers.", registry=r)
        self._series: dict[str, Series] = {}

    def series(self, instance_id: str | None) -> Series:
        """The children for requests whose first token came from instance_id."""
        key = instance_id or ""
        found = self._series.get(key)
        if found is None:
            if len(self._series) >= MAX_INSTANCE_LABELS and key != "other":
                return self.series("other")
            found = self._series[key] = Series(self, (self.model_name, key))
        return found

    def error(self, code: int) -> None:
        self.rejected.labels(code=str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

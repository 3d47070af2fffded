"""Prometheus metrics of one gateway, in a registry of its own (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "ferry_gateway_time_to_first_token_seconds",
            "Arrival to the first output token delivered.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "ferry_gateway_inter_token_latency_seconds",
            "Time per output token after the first (one sample per delivered chunk: the gap "
            "since the previous chunk divided by its tokens).",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ferry_gateway_e2e_latency_seconds",
            "Arrival to the end of the request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "ferry_gateway_requests", "Finished requests by outcome.", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "ferry_gateway_rejected",
            "Requests answered with an error, by code (refused, or failed in flight).",
            ["code"], registry=r,
        )
        self.prompt_tokens = Counter("ferry_gateway_prompt_tokens", "Prompt tokens.", registry=r)
        self.output_tokens = Counter(
            "ferry_gateway_output_tokens", "Output tokens delivered.", registry=r
        )
        self.replays = Counter(
            "ferry_gateway_replays", "Requests re-dispatched after their instance died.",
            registry=r,
        )
        self.bad_client_messages = Counter(
            "ferry_gateway_bad_client_messages",
            "Unreadable or unexpected messages on the SDK socket (answered with an error).",
            registry=r,
        )
        self.inflight = Gauge("ferry_gateway_inflight_requests", "Requests in flight.", registry=r)
        self.bypass = Gauge(
            "ferry_gateway_bypass_mode", "1 while dispatching straight to workers.", registry=r
        )
        self._outcome = {}  # label value -> child, to skip labels() on the hot path

    def outcome(self, reason: str) -> Counter:
        child = self._outcome.get(reason)
        if child is None:
            child = self._outcome[reason] = self.requests.labels(outcome=reason)
        return child

    def error(self, code: int) -> None:
        self.rejected.labels(code=str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

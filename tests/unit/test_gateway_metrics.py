"""The gateway's metric families (services/gateway/metrics.py): vLLM's names under ferry:,
the model and first-token instance as labels, and a bound on the instance labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ferry.services.gateway import metrics as gateway_metrics
from ferry.services.gateway.metrics import GatewayMetrics


def samples(m: GatewayMetrics) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.render().decode())
            for s in family.samples}


def test_series_carry_the_model_and_the_first_token_instance():
    m = GatewayMetrics("llama")
    a = m.series("w0")
    assert m.series("w0") is a  # one lookup per request, children cached
    a.ttft.observe(0.2)
    a.prompt_tokens.inc(7)
    a.success("stop").inc()
    m.series(None).success("abort").inc()  # ended before its first token
    got = samples(m)
    w0 = (("instance_id", "w0"), ("model_name", "llama"))
    assert got[("ferry:time_to_first_token_seconds_count", w0)] == 1
    assert got[("ferry:prompt_tokens_total", w0)] == 7
    assert got[("ferry:request_success_total", (("finished_reason", "stop"), *w0))] == 1
    none = (("finished_reason", "abort"), ("instance_id", ""), ("model_name", "llama"))
    assert got[("ferry:request_success_total", none)] == 1


def test_instance_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(gateway_metrics, "MAX_INSTANCE_LABELS", 3)
    m = GatewayMetrics("llama")
    for i in range(5):
        m.series(f"w{i}").generation_tokens.inc()
    got = samples(m)
    ids = {dict(labels)["instance_id"] for name, labels in got
           if name == "ferry:generation_tokens_total"}
    assert ids == {"w0", "w1", "w2", "other"}
    assert got[("ferry:generation_tokens_total",
                (("instance_id", "other"), ("model_name", "llama")))] == 2

"""docs/grafana/ferry.json: its layout, and every PromQL expression in it parsed, with the
metric names it reads declared by the gateway's and the scheduler's /metrics. The e2e
twin (tests/e2e/test_metrics.py) checks the same names against a running cluster's
scrapes, after traffic, with series."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ferry.services.gateway.metrics import GatewayMetrics
from ferry.services.scheduler.metrics import SchedulerCollector, SchedulerStats, make_registry
from tests.unit.test_scheduler_core import make_core

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "ferry.json"
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "delta",
             "histogram_quantile", "clamp_min", "clamp_max", "topk", "bottomk", "abs",
             "quantile", "avg_over_time", "max_over_time", "vector", "scalar"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def walk_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query: each panel target's expr and each query variable."""
    exprs = [(p["title"], t["expr"]) for p in walk_panels(dashboard["panels"])
             for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL
            selector = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_]\w*\)", query)
            exprs.append((f"${var['name']}", selector.group(1) if selector else query))
    return exprs


def check_balanced(expr: str) -> None:
    """Brackets nest and close, strings end (PromQL's string syntax: "…" with escapes)."""
    pairs, stack, i = {")": "(", "]": "[", "}": "{"}, [], 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            end = re.compile(r'"(?:[^"\\]|\\.)*"').match(expr, i)
            if end is None:
                raise ValueError(f"unterminated string at {i}: {expr}")
            i = end.end()
            continue
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                raise ValueError(f"unbalanced {c!r} at {i}: {expr}")
        i += 1
    if stack:
        raise ValueError(f"unclosed {stack}: {expr}")


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads: every identifier that is not a function
    (followed by "("), a keyword, a label of a grouping clause, or inside a label matcher
    ({…}, strings) or a range ([…])."""
    check_balanced(expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(GROUPING, " ", s)
    names = []
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = match.group(0)
        if s[match.end():].lstrip().startswith("("):
            if word not in FUNCTIONS:
                raise ValueError(f"unknown function {word!r}: {expr}")
        elif word not in KEYWORDS:
            names.append(word)
    if not names:
        raise ValueError(f"reads no metric: {expr}")
    return names


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The family a sample name belongs to (histogram series, counters' _total)."""
    if name in families:
        return name
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        base = name.removesuffix(suffix)
        if base != name and base in families:
            wanted = "histogram" if suffix in HISTOGRAM_SUFFIXES else "counter"
            return base if families[base] == wanted else None
    return None


def scrape_families(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """family name -> type, and family name -> number of samples, of an exposition."""
    types, num_samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        num_samples[family.name] = len(family.samples)
    return types, num_samples


def test_every_expression_parses_and_reads_ferry_metrics():
    exprs = dashboard_exprs(load_dashboard())
    assert len(exprs) > 20
    for where, expr in exprs:
        for name in metric_names(expr):
            assert name.startswith("ferry:"), (where, name)


def test_the_parser_finds_names_and_refuses_broken_queries():
    q = ('histogram_quantile(0.99, sum by (le, instance_id) (rate(ferry:x_seconds_bucket'
         '{model_name=~"$m", a="}"}[$__rate_interval]))) / on (job) group_left ferry:y')
    assert metric_names(q) == ["ferry:x_seconds_bucket", "ferry:y"]
    for bad in ("sum(rate(ferry:x[1m])", "sum(ferry:x{a=\"b})", "ferry:x{a=\"b\"]",
                "rte(ferry:x[1m])", "sum()"):
        with pytest.raises(ValueError):
            metric_names(bad)


def test_every_metric_it_reads_is_declared():
    """Against fresh processes (families declared, series or not)."""
    text = (GatewayMetrics("m").render()
            + generate_latest(make_registry(SchedulerCollector(make_core(), SchedulerStats()))))
    families, _ = scrape_families(text.decode())
    for where, expr in dashboard_exprs(load_dashboard()):
        for name in metric_names(expr):
            assert family_of(name, families), f"{where}: {name} is not exported"


def test_layout():
    dashboard = load_dashboard()
    panels = list(walk_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model_name"} <= names
    titles = {p["title"] for p in panels}
    for wanted in ("Time to first token", "Inter-token latency", "End-to-end latency",
                   "KV-cache usage", "Prefix-cache hit rate", "Migrations per second by outcome",
                   "Migration downtime", "Bulk-stage bandwidth", "Pending queue",
                   "Autoscaler and instances"):
        assert wanted in titles

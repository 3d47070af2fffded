"""bench/plots.py: every figure says what ran (trace, rate or concurrency, policy,
instances) and its tick labels never overlap, over latencies spanning a tenth of a decade
to six decades."""

from __future__ import annotations

import itertools
import random

import pytest

from ferry.bench.metrics import RequestRecord
from ferry.bench.plots import latency_cdfs, policy_comparison, run_title


def records(low: float, high: float, *, num: int = 200, seed: int = 0) -> list[RequestRecord]:
    """Prefill, per-token decode and so e2e latencies spread log-uniformly over [low, high]."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        arrival = i * 0.01
        first = arrival + low * (high / low) ** rng.random()
        tokens = rng.randint(2, 64)
        finish = first + (tokens - 1) * low * (high / low) ** rng.random()
        out.append(RequestRecord(req_id=str(i), priority="high" if i % 4 == 0 else "normal",
                                 arrival_s=arrival, num_prompt_tokens=8, first_token_s=first,
                                 finish_s=finish, num_output_tokens=tokens))
    return out


def drawn_tick_labels(axis, limits) -> list:
    """The tick labels matplotlib draws on axis, major and minor (a log axis spanning less
    than a decade labels its minor ticks): within the view limits, with text."""
    low, high = min(limits), max(limits)
    pairs = [*zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=True),
             *zip(axis.get_minorticklocs(), axis.get_minorticklabels(), strict=True)]
    return [label for loc, label in pairs
            if low <= loc <= high and label.get_visible() and label.get_text()]


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels drawn on the same axis whose boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure comes back closed (pyplot let go of it)
    canvas.draw()
    renderer = canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            boxes = [(label.get_text(), label.get_window_extent(renderer))
                     for label in drawn_tick_labels(axis, limits)]
            for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
                if box_a.overlaps(box_b):
                    clashes.append((a, b))
    return clashes


def test_run_title_names_trace_load_policy_and_instances():
    assert run_title(trace="bench/traces/mixed.jsonl", rate=7.5, policy="llumnix",
                     num_instances=4) == "mixed.jsonl: 7.5 req/s, policy llumnix, 4 instances"
    assert run_title(trace="t.jsonl", concurrency=8, policy="load", num_instances=1) == (
        "t.jsonl: closed loop, concurrency 8, policy load, 1 instance")


@pytest.mark.parametrize("low,high", [(0.004, 0.005), (0.02, 0.3), (1e-3, 2.0),
                                      (1e-4, 100.0), (1e-6, 1e3)])
def test_latency_cdfs_has_the_title_and_readable_log_axes(tmp_path, low, high):
    title = run_title(trace="trace.jsonl", rate=2.0, policy="llumnix", num_instances=2)
    png = tmp_path / "cdf.png"
    fig = latency_cdfs({"a": records(low, high), "b": records(low, high, seed=1)}, png,
                       title=title)
    assert png.stat().st_size > 0
    assert fig.get_suptitle() == title
    assert overlapping_tick_labels(fig) == []  # draws it: the labels are set after
    for ax in fig.axes:
        shown = [label.get_text() for label in drawn_tick_labels(ax.xaxis, ax.get_xlim())]
        assert len(shown) >= 2, (ax.get_xlabel(), shown)  # a scale to read
        assert all("$" not in text for text in shown), shown  # plain numbers, no 10^k


def test_policy_comparison_has_the_title_and_readable_log_axes(tmp_path):
    results = []
    for policy, factor in (("llumnix", 1.0), ("load", 3.0)):
        for rate in (1.0, 2.0, 4.0, 8.0):
            results.append({"policy": policy, "rate": rate,
                            "prefill_latency_s": {"p99": 0.01 * rate ** 3 * factor},
                            "decode_latency_s": {"p99": 0.02 + 0.001 * rate * factor},
                            "e2e_latency_s": {"mean": 0.5 * rate * factor}})
    fig = policy_comparison(results, tmp_path / "p.png", title="mixed: 16 instances")
    assert fig.get_suptitle() == "mixed: 16 instances"
    assert overlapping_tick_labels(fig) == []


def test_serve_titles_its_plot_with_the_traces_rate(tmp_path):
    """`ferry bench serve --out` titles its CDFs with the trace's arrival rate, scaled by
    --time-scale (a session's later turns do not count: they come after think time)."""
    import argparse
    import json

    from ferry.bench import serve

    trace = tmp_path / "t.jsonl"
    rows = [{"arrival_s": i * 0.05, "prompt_tokens": 4, "output_tokens": 2,
             "priority": "normal"} for i in range(12)]
    rows += [{"arrival_s": 0.0, "prompt_tokens": 4, "output_tokens": 2, "priority": "normal",
              "session_id": "s", "turn": 1, "think_s": 0.1}]
    rows[0].update(session_id="s", turn=0)
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(trace=str(trace), vocab_size=1000, time_scale=1.0)
    assert serve.trace_rate(args) == pytest.approx(20.0)
    assert serve.trace_rate(argparse.Namespace(**{**vars(args), "time_scale": 0.5})) == (
        pytest.approx(40.0))

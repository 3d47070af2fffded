"""Plots of serving results (matplotlib, PNG, no display needed).

Every figure has a title naming what ran (the trace, its rate or the closed loop's
concurrency, the dispatch policy, the instances: `run_title`), and its log axes carry
plain-number tick labels, few enough not to overlap (`_log_axis`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ferry.bench.metrics import RequestRecord

METRICS = (("prefill_latency_s", "prefill latency (s)"),
           ("decode_latency_s", "decode latency per token (s)"),
           ("e2e_latency_s", "end-to-end latency (s)"))


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def run_title(*, trace: str, policy: str, num_instances: int, rate: float | None = None,
              concurrency: int | None = None) -> str:
    """What ran, in one line: trace file, load (closed-loop concurrency, else arrival rate
    in req/s), dispatch policy, instances."""
    if concurrency:
        load = f"closed loop, concurrency {concurrency}"
    elif rate is not None:
        load = f"{rate:.3g} req/s"
    else:
        load = "rate unknown"
    instances = f"{num_instances} instance{'' if num_instances == 1 else 's'}"
    return f"{Path(trace).name}: {load}, policy {policy or '?'}, {instances}"


def _log_axis(axis, low: float, high: float) -> None:
    """A log axis over [low, high] (> 0) with plain-number labels ("0.02", "5", "1e-05"),
    few enough not to overlap in a 4-inch panel: evenly spaced round values when it spans
    under a decade, 1, 2, 5 x 10^k under ~2.5 decades, 10^k beyond (every other one past
    ~7); none on the minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    if decades < 1.0:
        axis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    else:
        subs = (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
        axis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def latency_cdfs(runs: dict[str, list[RequestRecord]], path: str | Path, *, title: str):
    """CDFs of prefill / decode / e2e latency per run, and per priority when both occur;
    title (`run_title`) above the panels. The figure (closed, for reading back)."""
    plt, (fig, axes) = _figure(1, 3)
    ranges = [[math.inf, 0.0] for _ in METRICS]
    for label, records in runs.items():
        done = [r for r in records if r.finish_s is not None and r.first_token_s is not None]
        classes = sorted({r.priority for r in done})
        for priority in classes:
            subset = [r for r in done if r.priority == priority]
            name = label if len(classes) == 1 else f"{label} ({priority})"
            for ax, (attr, _), span in zip(axes[0], METRICS, ranges, strict=True):
                values = np.sort([getattr(r, attr) for r in subset])
                values = values[values > 0]  # a log axis: 1-token requests decode in 0 s
                if values.size:
                    ax.plot(values, np.linspace(0, 1, values.size), label=name)
                    span[0], span[1] = min(span[0], values[0]), max(span[1], values[-1])
    for ax, (_, xlabel), (low, high) in zip(axes[0], METRICS, ranges, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_xscale("log")
        if high > 0:
            _log_axis(ax.xaxis, low, high)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def policy_comparison(results: list[dict], path: str | Path, *, title: str):
    """Lines of P99 prefill, P99 decode and mean e2e over request rate, one per policy.
    results: dicts with "policy", "rate" and the summary fields. The figure (closed)."""
    plt, (fig, axes) = _figure(1, 3)
    panels = (("prefill_latency_s", "p99", "P99 prefill (s)"),
              ("decode_latency_s", "p99", "P99 decode (s/token)"),
              ("e2e_latency_s", "mean", "mean end-to-end (s)"))
    for policy in sorted({r["policy"] for r in results}):
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["rate"])
        for ax, (metric, stat, label) in zip(axes[0], panels, strict=True):
            ax.plot([r["rate"] for r in rows], [r[metric][stat] for r in rows], marker="o",
                    label=policy)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.set_yscale("log")
    for ax, (metric, stat, _) in zip(axes[0], panels, strict=True):
        values = [r[metric][stat] for r in results
                  if r[metric][stat] is not None and r[metric][stat] > 0]
        if values:
            _log_axis(ax.yaxis, min(values), max(values))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig

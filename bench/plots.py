"""Plots of serving results (matplotlib, PNG, no display needed)."""

from __future__ import annotations

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


def latency_cdfs(runs: dict[str, list[RequestRecord]], path: str | Path) -> None:
    """CDFs of prefill / decode / e2e latency per run, and per priority when both occur."""
    plt, (fig, axes) = _figure(1, 3)
    for label, records in runs.items():
        done = [r for r in records if r.finish_s is not None and r.first_token_s is not None]
        classes = sorted({r.priority for r in done})
        for priority in classes:
            subset = [r for r in done if r.priority == priority]
            name = label if len(classes) == 1 else f"{label} ({priority})"
            for ax, (attr, title) in zip(axes[0], METRICS, strict=True):
                values = np.sort([getattr(r, attr) for r in subset])
                if values.size:
                    ax.plot(values, np.linspace(0, 1, values.size), label=name)
                ax.set_xlabel(title)
                ax.set_xscale("log")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_comparison(results: list[dict], path: str | Path, *, title: str) -> None:
    """Lines of P99 prefill, P99 decode and mean e2e over request rate, one per policy.
    results: dicts with "policy", "rate" and the summary fields."""
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
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Every sim check's P99 TTFT, real beside simulated, as one Markdown table.

    python -m experiments.sim_check_summary LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--out JSON]

Each RUN_DIR holds a finished `experiments.sim_check` run's sim_check.json (a GPU run's,
or a CPU re-analysis of it). A row per replay: the real P99 TTFT, and the simulator's
with the cycle model, the measured step spread and the request path (the median of the
spread seeds, with their range; "no path" where the run kept no per-request times), its
ratio to real, the deterministic cycle model's ratio, then P50, preemptions, mean e2e and
prompt-cache hits, real / simulated. The last line counts the rows within 15%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.sim_check import num

WITHIN = 0.15  # the target: P99 prefill within 15% of the real worker's


def card(device: str) -> str:
    """The card's short name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    for name in ("H200", "H100", "A100", "L40S"):
        if name in device:
            return name
    return device


def simulated(row: dict) -> tuple[dict, bool]:
    """The row's best simulation (cycle + spread + path, else cycle + spread) and whether
    it has the request path."""
    if "sim_cycle_spread_path" in row:
        return row["sim_cycle_spread_path"], True
    if "sim_cycle_spread" in row:
        return row["sim_cycle_spread"], False
    raise ValueError("a run without spread seeds (re-analyse it with --spread-seeds)")


def rows_of(label: str, run_dir: Path) -> list[dict]:
    done = json.loads((run_dir / "sim_check.json").read_text())
    out = []
    for row in done["rows"]:
        sim, with_path = simulated(row)
        real = row["real"]
        out.append({
            "card": card(done["device"]), "kv_blocks": done["kv_blocks"], "run": label,
            "model": done["model"].removeprefix("random:"), "kind": row["kind"],
            "rate": row["rate"], "num": done["num"], "real": real, "sim": sim,
            "with_path": with_path, "ratio": sim["ttft_p99"] / real["ttft_p99"],
            # the real P99 over bootstrap resamples of its requests (5-95%), where the run
            # kept per-request times: how far this many requests pin P99 down
            "real_p99_interval": row.get("real_ttft_p99_interval"),
            "deterministic_ratio": row["sim_cycle"]["ttft_p99"] / real["ttft_p99"]})
    return out


def pair(real: float | None, sim: float | None, fmt: str) -> str:
    return f"{num(real, fmt)} / {num(sim, fmt)}"


def table(rows: list[dict]) -> str:
    lines = ["| card | model | KV blocks | run | trace | rate | n | real P99 | real 5-95% | "
             "sim P99 (cycle + spread + path) | seeds' range | ÷ real | deterministic ÷ real "
             "| P50 real / sim | preempt real / sim | e2e mean real / sim | cache hits real / sim |",
             "|---|---|---:|---|---|---:|---:|---:|---|---:|---|---:|---:|---|---|---|---|"]
    for r in rows:
        real, sim, interval = r["real"], r["sim"], r["real_p99_interval"]
        lines.append(
            f"| {r['card']} | {r['model']} | {r['kv_blocks']} | {r['run']} | {r['kind']} | "
            f"{r['rate']:.2f} | {r['num']} | {real['ttft_p99']:.3f} | "
            f"{'–' if interval is None else f'{interval[0]:.3f}–{interval[1]:.3f}'} | "
            f"{sim['ttft_p99']:.3f}"
            f"{'' if r['with_path'] else ' (no path)'} | {sim['ttft_p99_min']:.3f}–"
            f"{sim['ttft_p99_max']:.3f} | **{r['ratio']:.2f}** | "
            f"{r['deterministic_ratio']:.2f} | {pair(real['ttft_p50'], sim['ttft_p50'], '.3f')} | "
            f"{real['preemptions']} / {sim['preemptions']} | "
            f"{pair(real['e2e_mean'], sim['e2e_mean'], '.2f')} | "
            f"{pair(real.get('cache_hit_rate'), sim.get('cache_hit_rate'), '.1%')} |")
    within = sum(abs(r["ratio"] - 1.0) <= WITHIN for r in rows)
    outside = [r for r in rows if abs(r["ratio"] - 1.0) > WITHIN]
    inside_interval = sum(r["real_p99_interval"] is not None
                          and r["real_p99_interval"][0] <= r["sim"]["ttft_p99"]
                          <= r["real_p99_interval"][1] for r in outside)
    lines += ["", f"{within} of {len(rows)} rows within {WITHIN:.0%} on P99 TTFT; of the "
              f"{len(outside)} outside, {inside_interval} inside the real P99's 5-95%."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.runs:
        label, sep, run_dir = spec.partition("=")
        if not sep or not label or not run_dir:
            parser.error(f"{spec!r}: not LABEL=RUN_DIR")
        if not (Path(run_dir) / "sim_check.json").exists():
            parser.error(f"{run_dir}: no sim_check.json")
        try:
            rows += rows_of(label, Path(run_dir))
        except ValueError as exc:
            parser.error(f"{run_dir}: {exc}")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

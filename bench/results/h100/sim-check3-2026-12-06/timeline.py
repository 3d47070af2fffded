"""Multi-turn at 12.73 req/s: the real worker's load over time against the simulator's.

    PYTHONPATH=. python bench/results/h100/sim-check3-2026-12-06/timeline.py   (repo root,
    CPU, ~5 s)

For each 3 s of the replay: the most requests decoding in one step (D), the most decode
context (C: tokens of KV those requests hold) and the prefill tokens computed (P), from
the real worker's step log and from the simulator (the cycle model refitted in situ, no
spread) on the same regenerated trace. Writes timeline.txt beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from experiments import sim_check
from ferry.bench.sim import Simulator, load_trace
from ferry.common.config import Endpoint, EngineConfig, SchedulerConfig
from ferry.services.worker import step_log
from ferry.services.worker.latency_model import Profile, StepFeatures

HERE = Path(__file__).parent
REPLAY = 3  # sharegpt x3, then multiturn at 12.73 req/s
WINDOW_S = 3.0


def windows(points: list[tuple[float, int, int, int]], start: float, end: float) -> list[tuple]:
    """(max D, max C, sum P) of the steps ending in each window."""
    out = []
    t = start
    while t < end:
        inside = [p for p in points if t <= p[0] < t + WINDOW_S]
        out.append((t, max((p[1] for p in inside), default=0),
                    max((p[2] for p in inside), default=0), sum(p[3] for p in inside)))
        t += WINDOW_S
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    sim_check.add_arguments(parser)
    args = parser.parse_args([
        "--model", "random:llama3-8b", "--profile",
        "services/worker/profiles/llama3-8b-h200.json", "--kv-blocks", "1000", "--num", "100",
        "--kinds", "sharegpt,multiturn", "--load-fractions", "0.5,0.8,1.1",
        "--replayed", str(HERE)])
    bundled = Profile.load(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        planned = sim_check.make_traces(args, bundled.latency, Path(tmp))
        replays = sim_check.load_replays(args, planned)
        steps = [s for r in replays for s in r.steps]
        cycle = dataclasses.replace(bundled, num_blocks=args.kv_blocks,
                                    latency=step_log.fit(steps, whole_cycle=True))
        replay = replays[REPLAY]
        trace = load_trace(replay.trace)
    start = replay.steps[0]["t"] - replay.steps[0]["step_s"]
    real = [(s["t"] - start, s["D"], s["C"], s["P"]) for s in replay.steps]

    simulated: list[tuple[float, int, int, int]] = []

    class Recording(Simulator):
        def _on_step_done(self, payload) -> None:
            batch = payload[2]
            if batch is not None:
                f = StepFeatures.of(batch)
                simulated.append((self.now, f.D, f.C, f.P))
            super()._on_step_done(payload)

    endpoint = Endpoint(bind="sim", advertise="sim")
    Recording(trace, profile=cycle, num_instances=1, policy="least_load",
              kv_blocks=args.kv_blocks,
              engine_config=EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens),
              scheduler_config=SchedulerConfig(inbox=endpoint, admin=endpoint,
                                               dispatch_policy="least_load",
                                               enable_migration=False, hold_until_room=True),
              step_spread_seed=None).run()
    lines = [f"{replay.kind} at {replay.rate:.2f} req/s, {args.kv_blocks} KV blocks "
             f"({args.kv_blocks * 16} tokens); per {WINDOW_S:g} s window",
             "| t s | real max D | real max C | real P | sim max D | sim max C | sim P |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    end = max(real[-1][0], simulated[-1][0])
    for (t, rd, rc, rp), (_, sd, sc, sp) in zip(windows(real, 0.0, end),
                                                windows(simulated, 0.0, end), strict=True):
        lines.append(f"| {t:.0f} | {rd} | {rc} | {rp} | {sd} | {sc} | {sp} |")
    (HERE / "timeline.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

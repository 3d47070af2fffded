"""In-situ step samples: every engine step a worker runs, one JSON line each, with the
latency model's features (services/worker/latency_model.py StepFeatures P, A, D, C), the
measured step time and the engine's own time around it:

    {"t": wall clock at the end, "P": .., "A": .., "D": .., "C": .., "step_s": launch to
     tokens read, "engine_s": schedule + bookkeeping of the step}

`ferry worker --step-log PATH` turns it on. `ferry profile --from-step-log PATH` fits a
profile to these samples, and `python -m experiments.sim_check` also checks the simulator
against them. The samples have the shape of a profile's.

A fit to whole cycles (`fit(..., whole_cycle=True)`) takes each step as the engine really
spends it: the model step, the engine's own time, and the event loop's gap before the
next step (`add_gaps`). On an H100 (llama2-7b) that made the simulator's P99 TTFT agree
with the real worker's within 2% at every rate, where the model step alone was 23%
optimistic at the knee (bench/results/h100/sim-check-2026-12-06).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from ferry.services.worker.engine.batch import ModelBatch
from ferry.services.worker.latency_model import LatencyModel, StepFeatures

BUSY_GAP_S = 0.02  # a longer pause between two steps is idleness, not overhead


class StepLog:
    def __init__(self, path: str) -> None:
        # Line-buffered: a reader (sim_check, between replays) sees every step so far
        # (one write a step: ~7 ms apart at least, so the syscalls cost nothing).
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close)

    def record(self, batch: ModelBatch, step_s: float, engine_s: float) -> None:
        f = StepFeatures.of(batch)
        self._file.write(json.dumps({"t": round(time.time(), 6), "P": f.P, "A": f.A, "D": f.D,
                                     "C": f.C, "step_s": step_s, "engine_s": engine_s}) + "\n")

    def close(self) -> None:
        self._file.close()


def read(path: str | Path) -> list[dict]:
    """A step log's samples (plain, or gzip-compressed when the name ends in .gz)."""
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode() if str(path).endswith(".gz") else raw.decode()
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a step log ({exc})") from None


def add_gaps(steps: list[dict]) -> None:
    """Each step's gap_s: from its end to the next step's start while the engine is busy
    (None before an idle pause or at the end)."""
    for step, after in zip(steps, steps[1:], strict=False):
        gap = after["t"] - after["step_s"] - after.get("engine_s", 0.0) - step["t"]
        step["gap_s"] = gap if 0.0 <= gap < BUSY_GAP_S else None
    if steps:
        steps[-1]["gap_s"] = None


def cycle_s(sample: dict) -> float:
    """The engine's whole cycle of one step: the model step, the engine's own time, and
    the loop's gap to the next step (none before an idle pause)."""
    return sample["step_s"] + sample.get("engine_s", 0.0) + (sample.get("gap_s") or 0.0)


def features(sample: dict) -> StepFeatures:
    return StepFeatures(P=sample["P"], A=sample["A"], D=sample["D"], C=sample["C"])


def fit(samples: list[dict], *, whole_cycle: bool) -> LatencyModel:
    """The latency model of these steps: their model step times, or their whole cycles
    (samples with gap_s set by add_gaps)."""
    if not samples:
        raise ValueError("no step samples to fit")
    pairs = [(features(s), cycle_s(s) if whole_cycle else s["step_s"]) for s in samples]
    model = LatencyModel.fit(pairs)
    ratios, noise = [], []  # decode-only steps: measured / modelled; eager: measured - it
    for f, measured in pairs:
        predicted = model.step_time(f)
        if f.P:
            noise.append(measured - predicted)
        elif predicted > 0:
            ratios.append(measured / predicted)
    return dataclasses.replace(model, decode_spread=spread_quantiles(ratios),
                               prefill_noise_s=spread_quantiles(noise, digits=6))


SPREAD_QUANTILES = 41  # every 2.5%: a profile stays small, the tails are kept
MIN_SPREAD_SAMPLES = 20  # fewer steps of a kind: no spread for it (deterministic)


def spread_quantiles(values: list[float], digits: int = 4) -> tuple[float, ...]:
    """Evenly spaced quantiles (0 .. 1) of values (ratios, or seconds: digits=6)."""
    if len(values) < MIN_SPREAD_SAMPLES:
        return ()
    q = np.quantile(np.asarray(values), np.linspace(0.0, 1.0, SPREAD_QUANTILES))
    return tuple(round(float(v), digits) for v in q)


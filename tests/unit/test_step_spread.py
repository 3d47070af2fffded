"""The measured step-time spread: fitted from a worker's steps as quantiles of measured /
modelled time, kept in the profile, and drawn by the simulator from a seed."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ferry.bench.sim import Simulator
from ferry.bench.trace import generate
from ferry.services.worker import step_log
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures, bundled_profile

DECODE = StepFeatures(P=0, A=0, D=4, C=2000)
PREFILL = StepFeatures(P=128, A=128 * 128, D=4, C=2000)
TRUTH = LatencyModel(base_s=0.004, per_prefill_step_s=0.003, per_prefill_token_s=2e-5,
                     per_prefill_attn_s=0.0, per_decode_seq_s=5e-5, per_decode_context_s=1e-7)


def steps(n: int, noise: dict[bool, float], seed: int = 0) -> list[dict]:
    """n decode and n prefill steps whose times are the truth times (1 + noise * U(-1, 1))."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        for f in (dataclasses.replace(DECODE, D=1 + i % 9),
                  dataclasses.replace(PREFILL, P=32 * (1 + i % 7))):
            t = TRUTH.step_time(f) * (1 + noise[bool(f.P)] * rng.uniform(-1, 1))
            out.append({"t": float(i), "P": f.P, "A": f.A, "D": f.D, "C": f.C, "step_s": t})
    return out


def test_fit_keeps_each_kinds_spread_and_none_from_few_steps():
    model = step_log.fit(steps(400, {False: 0.0, True: 0.3}), whole_cycle=False)
    assert len(model.decode_spread) == len(model.prefill_spread) == step_log.SPREAD_QUANTILES
    assert model.decode_spread[0] == pytest.approx(1.0, abs=1e-3)  # exact decode steps
    assert model.decode_spread[-1] == pytest.approx(1.0, abs=1e-3)
    low, high = model.prefill_spread[0], model.prefill_spread[-1]
    assert 0.6 < low < 0.85 and 1.2 < high < 1.5  # +-30% around the fit (a bit low)
    assert list(model.prefill_spread) == sorted(model.prefill_spread)
    few = step_log.fit(steps(step_log.MIN_SPREAD_SAMPLES // 2, {False: 0.1, True: 0.1}),
                       whole_cycle=False)
    assert few.decode_spread == few.prefill_spread == ()


def test_spread_factor_interpolates_its_quantiles():
    model = dataclasses.replace(TRUTH, decode_spread=(0.5, 1.0, 2.0), prefill_spread=())
    assert model.spread_factor(DECODE, 0.0) == 0.5
    assert model.spread_factor(DECODE, 0.25) == pytest.approx(0.75)
    assert model.spread_factor(DECODE, 0.75) == pytest.approx(1.5)
    assert model.spread_factor(DECODE, 0.999999) == pytest.approx(2.0, rel=1e-5)
    assert model.spread_factor(PREFILL, 0.3) == 1.0  # no spread measured: the model itself


def test_profile_round_trip_keeps_the_spread(tmp_path):
    base = Profile.load(bundled_profile("tiny-cpu"))
    assert base.latency.decode_spread == ()  # timed on a grid: deterministic
    spread = dataclasses.replace(base, latency=dataclasses.replace(
        base.latency, decode_spread=(0.9, 1.0, 1.3), prefill_spread=(0.7, 1.1, 1.9)))
    spread.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").latency == spread.latency


def _simulate(profile: Profile, seed: int | None) -> dict:
    trace = [r.as_json() for r in generate("M-M", num=60, rate=30.0, seed=1,
                                           max_total_tokens=1500)]
    return Simulator(trace, profile=profile, num_instances=1, policy="least_load",
                     kv_blocks=400, step_spread_seed=seed).run()


def test_simulator_draws_the_spread_from_its_seed():
    base = Profile.load(bundled_profile("tiny-cpu"))
    spread = dataclasses.replace(base, latency=dataclasses.replace(
        base.latency, decode_spread=(0.5, 1.0, 3.0), prefill_spread=(0.5, 1.0, 3.0)))
    deterministic = _simulate(base, seed=0)  # no spread in the profile: seed irrelevant
    assert _simulate(base, seed=None)["e2e_latency_s"] == deterministic["e2e_latency_s"]
    first, again = _simulate(spread, seed=0), _simulate(spread, seed=0)
    assert first["e2e_latency_s"] == again["e2e_latency_s"]  # a seed gives one run
    assert _simulate(spread, seed=1)["e2e_latency_s"] != first["e2e_latency_s"]
    # the quantiles' mean is 1.25: steps are longer on average than the model alone
    assert first["e2e_latency_s"]["mean"] > deterministic["e2e_latency_s"]["mean"]
    assert _simulate(spread, seed=None)["e2e_latency_s"] == deterministic["e2e_latency_s"]

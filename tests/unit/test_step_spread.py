"""The measured step-time spread: fitted from a worker's steps (decode steps as quantiles
of measured / modelled time, eager steps as quantiles of measured - modelled seconds),
kept in the profile, and drawn by the simulator from a seed."""

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


def steps(n: int, decode_ratio: float, prefill_noise_s: float, seed: int = 0) -> list[dict]:
    """n decode steps whose times are the truth's * (1 + decode_ratio * U(-1, 1)) and n
    eager steps of prefills from 32 to 4096 tokens whose times are the truth's +
    prefill_noise_s * U(-1, 1): the host's noise, the same on small and large steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        decode = dataclasses.replace(DECODE, D=1 + i % 9)
        prefill = dataclasses.replace(PREFILL, P=32 * 2 ** (i % 8))
        times = (TRUTH.step_time(decode) * (1 + decode_ratio * rng.uniform(-1, 1)),
                 TRUTH.step_time(prefill) + prefill_noise_s * rng.uniform(-1, 1))
        for f, t in zip((decode, prefill), times, strict=True):
            out.append({"t": float(i), "P": f.P, "A": f.A, "D": f.D, "C": f.C, "step_s": t})
    return out


def test_fit_keeps_decode_ratios_and_eager_noise_and_none_from_few_steps():
    model = step_log.fit(steps(400, decode_ratio=0.0, prefill_noise_s=0.003),
                         whole_cycle=False)
    assert len(model.decode_spread) == len(model.prefill_noise_s) == step_log.SPREAD_QUANTILES
    assert model.decode_spread[0] == pytest.approx(1.0, abs=2e-3)  # exact decode steps
    assert model.decode_spread[-1] == pytest.approx(1.0, abs=2e-3)
    low, high = model.prefill_noise_s[0], model.prefill_noise_s[-1]
    assert -0.005 < low < -0.002 and 0.002 < high < 0.005  # +-3 ms around the (noisy) fit
    assert list(model.prefill_noise_s) == sorted(model.prefill_noise_s)
    few = step_log.fit(steps(step_log.MIN_SPREAD_SAMPLES // 2, 0.1, 0.001), whole_cycle=False)
    assert few.decode_spread == few.prefill_noise_s == ()


def test_drawn_step_time_scales_decode_steps_and_adds_to_eager_ones():
    model = dataclasses.replace(TRUTH, decode_spread=(0.5, 1.0, 2.0), prefill_noise_s=())
    decode = TRUTH.step_time(DECODE)
    assert model.drawn_step_time(DECODE, 0.0) == pytest.approx(0.5 * decode)
    assert model.drawn_step_time(DECODE, 0.25) == pytest.approx(0.75 * decode)
    assert model.drawn_step_time(DECODE, 0.75) == pytest.approx(1.5 * decode)
    assert model.drawn_step_time(DECODE, 0.999999) == pytest.approx(2.0 * decode, rel=1e-5)
    prefill = TRUTH.step_time(PREFILL)
    assert model.drawn_step_time(PREFILL, 0.3) == prefill  # no noise measured: the model
    noisy = dataclasses.replace(model, prefill_noise_s=(-0.004, 0.0, 0.010))
    assert noisy.drawn_step_time(PREFILL, 0.75) == pytest.approx(prefill + 0.005)
    big = dataclasses.replace(PREFILL, P=4096, A=4096 * 4096)
    assert noisy.drawn_step_time(big, 0.75) == pytest.approx(TRUTH.step_time(big) + 0.005)
    # never under half the modelled time, however negative the noise
    tiny = dataclasses.replace(TRUTH, base_s=0.001, per_prefill_step_s=0.0)
    assert dataclasses.replace(tiny, prefill_noise_s=(-1.0, -1.0)).drawn_step_time(
        PREFILL, 0.5) == pytest.approx(0.5 * tiny.step_time(PREFILL))


def test_profile_round_trip_keeps_the_spread(tmp_path):
    base = Profile.load(bundled_profile("tiny-cpu"))
    assert base.latency.decode_spread == ()  # timed on a grid: deterministic
    spread = dataclasses.replace(base, latency=dataclasses.replace(
        base.latency, decode_spread=(0.9, 1.0, 1.3), prefill_noise_s=(-0.002, 0.001, 0.009)))
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
        base.latency, decode_spread=(0.5, 1.0, 3.0), prefill_noise_s=(-0.001, 0.0, 0.02)))
    deterministic = _simulate(base, seed=0)  # no spread in the profile: seed irrelevant
    assert _simulate(base, seed=None)["e2e_latency_s"] == deterministic["e2e_latency_s"]
    first, again = _simulate(spread, seed=0), _simulate(spread, seed=0)
    assert first["e2e_latency_s"] == again["e2e_latency_s"]  # a seed gives one run
    assert _simulate(spread, seed=1)["e2e_latency_s"] != first["e2e_latency_s"]
    # the quantiles' mean is 1.25: steps are longer on average than the model alone
    assert first["e2e_latency_s"]["mean"] > deterministic["e2e_latency_s"]["mean"]
    assert _simulate(spread, seed=None)["e2e_latency_s"] == deterministic["e2e_latency_s"]


def test_a_bundled_profile_loads_by_name_and_a_wrong_name_lists_them():
    serving = Profile.load("llama3-8b-h200-serving")
    assert serving.device == "NVIDIA H200" and serving.num_blocks == 56596
    assert serving.latency.prefill_noise_s and serving.latency.decode_spread
    assert Profile.load(bundled_profile("tiny-cpu")).name == Profile.load("tiny-cpu").name
    with pytest.raises(ValueError, match="nor a bundled profile.*llama2-7b-h100-serving"):
        Profile.load("llama9-h900")

"""experiments/sim_check.py's pure parts: the loop gaps between steps, the whole-cycle
time, per-kind step errors, scaled profiles, and re-reading a finished run (--replayed)
without a GPU."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json

import pytest

from experiments import sim_check
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures


def step(t, step_s, engine_s=0.0, **features):
    return {"t": t, "step_s": step_s, "engine_s": engine_s,
            "P": 0, "A": 0, "D": 1, "C": 10} | features


def test_gaps_count_only_busy_pauses():
    steps = [step(1.0, 0.010), step(1.013, 0.010, 0.001), step(2.0, 0.010)]
    sim_check.add_gaps(steps)
    # the second starts at 1.013 - 0.010 - 0.001 = 1.002: 2 ms after the first ended
    assert steps[0]["gap_s"] == pytest.approx(0.002)
    assert steps[1]["gap_s"] is None  # ~1 s later: idle, not overhead
    assert steps[2]["gap_s"] is None  # the last
    assert sim_check.cycle_s(steps[0]) == pytest.approx(0.012)
    assert sim_check.cycle_s(steps[1]) == pytest.approx(0.011)


def test_step_errors_by_kind_and_the_refit_recovers_a_linear_model():
    truth = LatencyModel(base_s=0.005, per_prefill_step_s=0.002, per_prefill_token_s=1e-5,
                         per_prefill_attn_s=1e-9, per_decode_seq_s=3e-5,
                         per_decode_context_s=2e-7)
    samples = []
    for i in range(1, 60):
        for kind in ("prefill", "decode", "mixed"):
            f = StepFeatures(P=0 if kind == "decode" else 37 * i,
                             A=0 if kind == "decode" else 37 * i * 50 * i,
                             D=0 if kind == "prefill" else i % 17 + 1, C=0 if kind == "prefill"
                             else 900 * i)
            samples.append(dataclasses.asdict(f) | {"t": 0.0, "step_s": truth.step_time(f)})
    fitted = sim_check.refit(samples)
    errors = sim_check.step_errors(fitted, samples)
    assert set(errors) == {"prefill", "decode", "mixed", "all"}
    assert errors["all"]["n"] == len(samples)
    assert errors["all"]["p90"] < 1e-6
    assert sim_check.step_errors(sim_check.scale_latency(fitted, 1.1), samples
                                 )["all"]["median"] == pytest.approx(0.1)


def _parser_args(run_dir, out_dir) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sim_check.add_arguments(parser)
    return parser.parse_args(["--kinds", "M-M", "--load-fractions", "0.5", "--num", "5",
                              "--replayed", str(run_dir), "--out-dir", str(out_dir)])


def test_replayed_cuts_the_step_log_by_each_replays_step_count(tmp_path):
    args = _parser_args(tmp_path, tmp_path / "out")
    planned = sim_check.make_traces(args, Profile.load(args.profile).latency, tmp_path)
    (kind, fraction, rate, _), = planned
    real = {"ttft_p50": 0.1, "ttft_p99": 0.2, "decode_p99": 0.01, "e2e_mean": 1.0,
            "preemptions": 0, "req_per_s": 1.0, "num_steps": 2}
    (tmp_path / "sim_check.json").write_text(json.dumps(
        {"device": "test", "warm_up_steps": 1,
         "rows": [{"kind": kind, "fraction": fraction, "rate": rate, "real": real}]}))
    # a warm-up step first (--warm-up: in the log, not in any replay), then the replay's,
    # then one the worker wrote after the replay was counted
    lines = [json.dumps(step(1.0 + i, 0.01)) for i in range(4)]
    (tmp_path / "steps.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    (replay,) = sim_check.load_replays(args, planned)
    assert (replay.kind, replay.real, len(replay.steps)) == (kind, real, 2)
    assert [s["t"] for s in replay.steps] == [2.0, 3.0]
    # a log with fewer steps than the replays counted is refused
    (tmp_path / "steps.jsonl.gz").write_bytes(gzip.compress(lines[0].encode()))
    with pytest.raises(SystemExit, match="fewer than its warm-up and replays counted"):
        sim_check.load_replays(args, planned)
    (tmp_path / "steps.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    # a run made at another rate (another profile or seed) is refused
    (tmp_path / "sim_check.json").write_text(json.dumps(
        {"device": "test", "rows": [{"kind": kind, "fraction": fraction, "rate": rate * 2,
                                     "real": real}]}))
    with pytest.raises(SystemExit, match="different profile or seed"):
        sim_check.load_replays(args, planned)
    # a run that kept its trace cap, made with another one, is refused
    (tmp_path / "sim_check.json").write_text(json.dumps(
        {"device": "test", "max_total_tokens": 65536, "seed": 0,
         "rows": [{"kind": kind, "fraction": fraction, "rate": rate, "real": real}]}))
    with pytest.raises(SystemExit, match="--max-total-tokens 65536, not 4096"):
        sim_check.load_replays(args, planned)


def test_rates_apply_to_every_kind_or_to_the_one_named():
    assert sim_check.rates_of("1.5,2", "sharegpt") == [1.5, 2.0]
    spec = "sharegpt:4,multiturn:12.73,7"
    assert sim_check.rates_of(spec, "sharegpt") == [4.0, 7.0]
    assert sim_check.rates_of(spec, "multiturn") == [12.73, 7.0]
    with pytest.raises(SystemExit, match="KIND:RATE"):
        sim_check.rates_of("sharegpt:fast", "sharegpt")


def test_request_path_fit_splits_the_offset_into_the_way_out_and_the_way_in(tmp_path):
    parser = argparse.ArgumentParser()
    sim_check.add_arguments(parser)
    args = parser.parse_args(["--kinds", "M-M", "--rates", "2", "--num", "8",
                              "--kv-blocks", "400"])
    (kind, fraction, rate, trace), = sim_check.make_traces(
        args, Profile.load(args.profile).latency, tmp_path)
    profile = tmp_path / "profile.json"
    Profile.load(args.profile).save(profile)
    simulated = tmp_path / "sim.json"
    sim_check.simulate(args, trace, profile, requests_out=simulated)
    rows = json.loads(simulated.read_text())
    # The "real" run: every first token 7 ms later than simulated; the step that made it
    # ended 4 ms after the simulated one, so 3 ms of the 7 are the way out.
    start_unix = 1000.0
    real, steps = {"columns": rows["columns"], "rows": []}, []
    for row in rows["rows"]:
        got = dict(zip(rows["columns"], row, strict=True))
        steps.append(step(start_unix + got["first_token_s"] + 0.004, 0.01))
        got["first_token_s"] += 0.007
        real["rows"].append([got[c] for c in rows["columns"]])
    replay = sim_check.Replay(kind, fraction, rate, trace, {}, steps,
                              {"requests": real, "start_unix": start_unix})
    path = sim_check.fit_request_path(args, [replay], profile, tmp_path)
    assert path.out_s == pytest.approx(0.003, abs=1e-6)
    assert path.in_s == pytest.approx(0.004, abs=1e-6)
    # IN given (a run whose replays all queue): OUT still measured
    args.request_in_ms = 0.5
    given = sim_check.fit_request_path(args, [replay], profile, tmp_path)
    assert (given.in_s, given.out_s) == (pytest.approx(0.0005), pytest.approx(0.003, abs=1e-6))
    # a run that kept no request times: no path to fit
    bare = dataclasses.replace(replay, requests=None)
    assert sim_check.fit_request_path(args, [bare], profile, tmp_path) is None

"""`ferry profile --from-step-log`: a profile fitted to a worker's own steps (whole engine
cycles by default), keeping the base profile's model and KV fields; measuring flags are
refused with it."""

from __future__ import annotations

import gzip
import json

import pytest

from ferry.services.worker import profile as profile_cli
from ferry.services.worker import step_log
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures

TRUTH = LatencyModel(base_s=0.004, per_prefill_step_s=0.003, per_prefill_token_s=2e-5,
                     per_prefill_attn_s=0.0, per_decode_seq_s=5e-5, per_decode_context_s=1e-7)
GAP_S = 0.001  # the loop's pause between two busy steps


def write_step_log(path, *, gzipped: bool) -> None:
    """Busy steps back to back: each starts GAP_S after the previous one ended."""
    lines, end = [], 100.0
    for i in range(200):
        f = StepFeatures(P=64 * (i % 5), A=0, D=1 + i % 7, C=500 * (1 + i % 11))
        step_s = TRUTH.step_time(f)
        end += GAP_S + step_s
        lines.append(json.dumps({"t": end, "P": f.P, "A": f.A, "D": f.D, "C": f.C,
                                 "step_s": step_s, "engine_s": 0.0}))
    data = "\n".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gzipped else data)


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.json"
    Profile(name="base", device="H100", model={"name": "m"}, block_size=16, kv_block_bytes=4096,
            num_blocks=1000, max_model_len=4096, vocab_size=32000, latency=TRUTH,
            samples=[]).save(path)
    return path


@pytest.mark.parametrize("gzipped", [False, True])
def test_the_fit_takes_whole_cycles_and_keeps_the_base_fields(tmp_path, base, gzipped):
    log = tmp_path / ("steps.jsonl.gz" if gzipped else "steps.jsonl")
    write_step_log(log, gzipped=gzipped)
    out = tmp_path / "fitted.json"
    profile_cli.main(["--from-step-log", str(log), "--base", str(base), "--out", str(out)])
    fitted = Profile.load(out)
    assert (fitted.name, fitted.kv_block_bytes, fitted.num_blocks) == ("base-insitu", 4096, 1000)
    assert len(fitted.samples) == 200
    # whole cycles: every busy step costs GAP_S more (the last has no gap after it)
    assert fitted.latency.base_s == pytest.approx(TRUTH.base_s + GAP_S, rel=0.02)
    step_only = tmp_path / "step.json"
    profile_cli.main(["--from-step-log", str(log), "--base", str(base), "--out", str(step_only),
                      "--step-time-only"])
    assert Profile.load(step_only).latency.base_s == pytest.approx(TRUTH.base_s, rel=1e-3)


def test_measuring_flags_do_not_go_with_a_step_log(tmp_path, base, capsys):
    with pytest.raises(SystemExit):
        profile_cli.main(["--from-step-log", "x", "--base", str(base), "--model", "tiny",
                          "--out", str(tmp_path / "o.json")])
    assert "--model do not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_cli.main(["--from-step-log", "x", "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):
        profile_cli.main(["--base", str(base), "--out", str(tmp_path / "o.json")])


def test_a_file_that_is_not_a_step_log_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not a step log"):
        step_log.read(bad)
    with pytest.raises(ValueError, match="no step samples"):
        step_log.fit([], whole_cycle=True)


def test_several_logs_pooled_the_card_and_kv_named_and_a_few_samples_kept(tmp_path, base):
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    write_step_log(logs[0], gzipped=False)
    write_step_log(logs[1], gzipped=True)
    out = tmp_path / "serving.json"
    profile_cli.main(["--from-step-log", *map(str, logs), "--base", str(base), "--out",
                      str(out), "--name", "m-h100-serving", "--device-name", "NVIDIA H100",
                      "--num-blocks", "25000", "--keep-samples", "40"])
    fitted = Profile.load(out)
    assert (fitted.name, fitted.device, fitted.num_blocks) == (
        "m-h100-serving", "NVIDIA H100", 25000)
    assert len(fitted.samples) == 40  # evenly spaced over both logs' 400 steps
    # gaps are taken within each log: the pooled fit is the single log's
    assert fitted.latency.base_s == pytest.approx(TRUTH.base_s + GAP_S, rel=0.02)
    profile_cli.main(["--from-step-log", str(logs[0]), "--base", str(base), "--out",
                      str(out), "--keep-samples", "0"])
    assert Profile.load(out).samples == [] and Profile.load(out).device == "H100"


@pytest.mark.parametrize("flags, message", [
    (["--keep-samples", "5"], "--keep-samples go with --from-step-log"),
    (["--device-name", "X"], "--device-name go with --from-step-log"),
])
def test_log_flags_need_a_log(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        profile_cli.main(["--out", str(tmp_path / "o.json"), *flags])
    assert message in capsys.readouterr().err


def test_a_logs_kv_must_be_positive(tmp_path, base, capsys):
    with pytest.raises(SystemExit):
        profile_cli.main(["--from-step-log", "x", "--base", str(base), "--num-blocks", "0",
                          "--out", str(tmp_path / "o.json")])
    assert "--num-blocks" in capsys.readouterr().err

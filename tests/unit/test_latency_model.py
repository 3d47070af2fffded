import json
import random

import pytest

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures, bundled_profile
from ferry.services.worker.sim_executor import SimExecutor

TRUE = LatencyModel(base_s=0.004, per_prefill_token_s=5e-5, per_prefill_attn_s=1e-9,
                    per_decode_seq_s=2e-4, per_decode_context_s=3e-8)


def chunk(q_len, start, sample=True, seed=1):
    return SeqChunk(req_id="r", token_ids=(1,) * q_len, start_pos=start, block_ids=(0,) * 1000,
                    sample=sample, sampling=SamplingParams(seed=seed))


def test_features_split_prefill_and_decode():
    batch = ModelBatch(chunks=(chunk(10, 0), chunk(1, 99), chunk(1, 9), chunk(5, 20)))
    f = StepFeatures.of(batch)
    assert (f.P, f.D) == (15, 2)
    assert f.A == 10 * 10 + 5 * 25
    assert f.C == 100 + 10


def test_fit_recovers_known_coefficients():
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        f = StepFeatures(P=rng.choice([0, 128, 512, 2048]), A=0, D=rng.randrange(0, 256), C=0)
        f = StepFeatures(P=f.P, A=f.P * f.P // 2, D=f.D, C=f.D * rng.randrange(100, 4000))
        if f.P == 0 and f.D == 0:
            continue
        samples.append((f, TRUE.step_time(f) * rng.uniform(0.98, 1.02)))
    fitted = LatencyModel.fit(samples)
    for f, t in samples[:50]:
        assert fitted.step_time(f) == pytest.approx(t, rel=0.08)


def test_fit_separates_a_decode_in_an_eager_step_from_one_in_a_graph():
    # decodes alone (CUDA graphs) and riding with a prefill chunk (eager), where each
    # context token costs 1.8x: the fit prices both, and a mixed step comes out right
    true = LatencyModel(base_s=0.006, per_prefill_token_s=2e-5, per_prefill_attn_s=1.5e-9,
                        per_decode_seq_s=5e-5, per_decode_context_s=6e-8,
                        per_prefill_step_s=0.008, per_eager_decode_context_s=5e-8)
    rng = random.Random(1)
    samples = []
    for _ in range(400):
        p = rng.choice([0, 0, 256, 2048])
        d = rng.randrange(1, 64)
        f = StepFeatures(P=p, A=p * rng.randrange(p, 40_000) if p else 0, D=d,
                         C=d * rng.randrange(500, 20_000))
        samples.append((f, true.step_time(f) * rng.uniform(0.99, 1.01)))
    fitted = LatencyModel.fit(samples)
    assert fitted.per_eager_decode_context_s == pytest.approx(5e-8, rel=0.15)
    mixed = StepFeatures(P=2048, A=2048 * 30_000, D=48, C=48 * 15_000)
    assert fitted.step_time(mixed) == pytest.approx(true.step_time(mixed), rel=0.02)
    # a profile fitted before these terms existed loads with them 0
    saved = json.loads(bundled_profile("llama3-8b-h200").read_text())["coefficients"]
    assert "per_eager_decode_context_s" not in saved
    assert Profile.load("llama3-8b-h200").latency.per_eager_decode_context_s == 0.0


def test_profile_round_trip_and_bad_file(tmp_path):
    profile = Profile(name="t", device="cpu", model={"layers": 2}, block_size=16, kv_block_bytes=4096,
                      num_blocks=100, max_model_len=2048, vocab_size=500, latency=TRUE, samples=[])
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path) == profile
    (tmp_path / "bad.json").write_text('{"name": 1}')
    with pytest.raises(ValueError, match="not a valid Ferry profile"):
        Profile.load(tmp_path / "bad.json")


def test_sim_executor_tokens_depend_on_seed_and_position_only():
    ex = SimExecutor(TRUE, num_blocks=10, block_size=16, vocab_size=50, eos_token_ids=(3,), sleep=False)
    a = ex.execute(ModelBatch(chunks=(chunk(1, 10, seed=5), chunk(4, 0, seed=6))))
    b = ex.execute(ModelBatch(chunks=(chunk(1, 10, seed=5),)))
    assert a[0] == b[0]
    assert all(t != 3 and 0 <= t < 50 for t in a)
    assert ex.step_time(ModelBatch(chunks=(chunk(1, 10),))) == pytest.approx(
        TRUE.step_time(StepFeatures(P=0, A=0, D=1, C=11)))

"""Trace generation: length laws hit their published statistics, arrivals their rate and CV."""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pytest

from ferry.bench.trace import (
    KINDS,
    MAX_LEN,
    POWER_LAW_MEANS,
    TraceRequest,
    generate,
    main,
    power_law_pmf,
    read_jsonl,
    sample_arrivals,
    write_jsonl,
)

NUM = 50_000
# (mean, P50, P80, P95, P99) from the Llumnix paper's workload table.
DATASET_STATS = {
    ("sharegpt", "prompt"): (306, 74, 348, 1484, 3388),
    ("sharegpt", "output"): (500, 487, 781, 988, 1234),
    ("burstgpt", "prompt"): (830, 582, 1427, 2345, 3549),
    ("burstgpt", "output"): (271, 243, 434, 669, 964),
}


def lengths(trace, which):
    return np.array([getattr(r, f"{which}_tokens") for r in trace])


@pytest.fixture(scope="module")
def dataset_traces():
    return {kind: generate(kind, num=NUM, rate=10.0, seed=1) for kind in ("sharegpt", "burstgpt")}


@pytest.mark.parametrize(("kind", "which"), list(DATASET_STATS))
def test_dataset_mixes_hit_the_published_statistics(dataset_traces, kind, which):
    x = lengths(dataset_traces[kind], which)
    got = (x.mean(), *np.percentile(x, [50, 80, 95, 99]))
    for name, g, want in zip(
        ("mean", "P50", "P80", "P95", "P99"), got, DATASET_STATS[kind, which], strict=True
    ):
        assert abs(g / want - 1) < 0.10, f"{kind} {which} {name}: got {g:.0f}, want {want}"


@pytest.mark.parametrize("size", list(POWER_LAW_MEANS))
def test_power_law_pmf_has_the_exact_mean_and_range(size):
    pmf = power_law_pmf(POWER_LAW_MEANS[size])
    assert pmf.shape == (MAX_LEN,) and pmf.sum() == pytest.approx(1.0)
    assert pmf @ np.arange(1, MAX_LEN + 1) == pytest.approx(POWER_LAW_MEANS[size], rel=1e-6)
    assert np.all(np.diff(pmf) < 0)  # a power law: decreasing everywhere


@pytest.mark.parametrize("kind", ["S-S", "M-M", "L-L", "S-L", "L-S"])
def test_power_law_kinds_sample_their_means_with_a_heavy_tail(kind):
    trace = generate(kind, num=NUM, rate=10.0, seed=2)
    prompt_size, output_size = kind.split("-")
    for which, size in (("prompt", prompt_size), ("output", output_size)):
        x = lengths(trace, which)
        mean = POWER_LAW_MEANS[size]
        assert x.mean() == pytest.approx(mean, rel=0.05)
        assert 1 <= x.min() and x.max() <= MAX_LEN
        assert np.percentile(x, 50) < mean / 2  # most requests are short ...
        assert np.percentile(x, 99) > 5 * mean  # ... a few are very long


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_arrivals_have_the_rate_and_cv(cv):
    arrivals = sample_arrivals(NUM, rate=4.0, cv=cv, rng=np.random.default_rng(3))
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_cv_zero_spaces_arrivals_evenly():
    arrivals = sample_arrivals(5, rate=2.0, cv=0.0, rng=np.random.default_rng(0))
    assert arrivals.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_high_priority_fraction():
    trace = generate("S-S", num=NUM, rate=1.0, high_frac=0.1, seed=4)
    assert sum(r.priority == "high" for r in trace) / NUM == pytest.approx(0.1, abs=0.01)
    assert {r.priority for r in generate("S-S", num=100, rate=1.0, seed=4)} == {"normal"}


def test_seeded_and_streams_independent():
    base = generate("M-M", num=200, rate=2.0, seed=7)
    assert generate("M-M", num=200, rate=2.0, seed=7) == base
    assert generate("M-M", num=200, rate=2.0, seed=8) != base
    faster = generate("M-M", num=200, rate=8.0, seed=7)
    assert [(r.prompt_tokens, r.output_tokens) for r in faster] == [
        (r.prompt_tokens, r.output_tokens) for r in base
    ]
    other_kind = generate("L-S", num=200, rate=2.0, seed=7)
    assert [r.arrival_s for r in other_kind] == [r.arrival_s for r in base]


def test_max_total_tokens_caps_prompt_plus_output():
    trace = generate("L-L", num=5000, rate=1.0, seed=5, max_total_tokens=512)
    assert all(r.prompt_tokens + r.output_tokens <= 512 and r.output_tokens >= 1 for r in trace)
    assert max(r.prompt_tokens for r in trace) == 511


@pytest.mark.parametrize("kind", ["longctx", "longctx-shared", "tenants"])
def test_max_total_tokens_caps_the_cache_kinds_context(kind):
    trace = generate(kind, num=2000, rate=1.0, seed=5, max_total_tokens=8192)
    assert all(r.prefix_tokens + r.prompt_tokens + r.output_tokens <= 8192
               and r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in trace)
    # a prefix is capped by its length alone: every request naming it shares one length
    lengths = {}
    for r in trace:
        if r.prefix_id is not None:
            assert lengths.setdefault(r.prefix_id, r.prefix_tokens) == r.prefix_tokens
    longest = max(r.prefix_tokens + r.prompt_tokens for r in trace)
    uncapped = max(r.prefix_tokens + r.prompt_tokens
                   for r in generate(kind, num=2000, rate=1.0, seed=5))
    assert uncapped > 8192 and longest >= 8190  # the cap bites, and only the tail


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown trace kind"):
        generate("X-L", num=1, rate=1.0)
    with pytest.raises(ValueError, match="rate"):
        generate("S-S", num=1, rate=0.0)
    with pytest.raises(ValueError, match="high_frac"):
        generate("S-S", num=1, rate=1.0, high_frac=1.5)


def test_jsonl_round_trip_and_validation():
    trace = generate("sharegpt", num=50, rate=3.0, high_frac=0.5, seed=6)
    buf = io.StringIO()
    write_jsonl(trace, buf)
    lines = buf.getvalue().splitlines()
    assert set(json.loads(lines[0])) == {"arrival_s", "prompt_tokens", "output_tokens", "priority"}
    assert read_jsonl(lines + [""]) == trace
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl([lines[0], '{"arrival_s": 1.0, "prompt_tokens": 0, "output_tokens": 3}'])
    with pytest.raises(ValueError, match="line 1"):
        read_jsonl(["not json"])


def test_main_writes_the_trace(tmp_path, capsys):
    out = tmp_path / "trace.jsonl"
    argv = [
        "--kind",
        "M-M",
        "--rate",
        "2.0",
        "--num",
        "1000",
        "--cv",
        "1.0",
        "--high-frac",
        "0.1",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    trace = read_jsonl(out.read_text().splitlines())
    assert len(trace) == 1000 and trace == generate(
        "M-M", num=1000, rate=2.0, high_frac=0.1, seed=0
    )
    summary = json.loads(capsys.readouterr().err)
    assert summary["num_requests"] == 1000
    assert summary["duration_s"] == pytest.approx(500, rel=0.1)
    with pytest.raises(SystemExit):
        main(["--kind", "nope"])


def test_every_named_kind_generates():
    for kind in KINDS:
        [req] = generate(kind, num=1, rate=1.0)
        assert isinstance(req, TraceRequest) and req.prompt_tokens >= 1


# ---- the cache-heavy kinds and the workload built from them ---------------------------------


def test_cache_kinds_carry_prefixes_and_sessions():
    from ferry.bench.trace import CACHE_KINDS, CacheShape, generate, read_jsonl

    shape = CacheShape(tenants=20, skew=1.2, turns=4, think_s=5.0, system_tokens=300)
    for kind in CACHE_KINDS:
        trace = generate(kind, num=400, rate=20.0, seed=3, shape=shape)
        assert len(trace) == 400
        again = read_jsonl(json.dumps(r.as_json()) for r in trace)
        assert again == trace  # the JSONL round trip keeps every field
    tenants = generate("tenants", num=2000, rate=20.0, seed=3, shape=shape)
    counts = collections.Counter(r.prefix_id for r in tenants)
    assert counts.most_common(1)[0][0] == "tenant-0"  # Zipf: the first is the hottest
    sizes = {r.prefix_id: r.prefix_tokens for r in tenants}
    assert all(shape.prefix_min <= n <= shape.prefix_max for n in sizes.values())
    assert all(sizes[r.prefix_id] == r.prefix_tokens for r in tenants)  # one size each
    turns = generate("multiturn", num=400, rate=20.0, seed=3, shape=shape)
    sessions = collections.defaultdict(list)
    for r in turns:
        sessions[r.session_id].append(r.turn)
    assert all(t == list(range(len(t))) for t in sessions.values())
    assert 2.5 < len(turns) / len(sessions) < 6  # mean turns ~4
    long = generate("longctx", num=2000, rate=20.0, seed=3)
    assert min(r.prompt_tokens for r in long) >= 4096
    assert 6500 < sum(r.prompt_tokens for r in long) / 2000 < 10_000  # Mooncake-like mean


def test_the_workload_builds_the_same_prompts_everywhere():
    from ferry.bench.workload import Workload

    trace = [
        {"arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 3, "priority": "normal",
         "prefix_id": "sys", "prefix_tokens": 8},
        {"arrival_s": 0.1, "prompt_tokens": 4, "output_tokens": 3, "priority": "normal",
         "prefix_id": "sys", "prefix_tokens": 8},
        {"arrival_s": 0.2, "prompt_tokens": 6, "output_tokens": 2, "priority": "normal",
         "session_id": "s", "turn": 0, "prefix_id": "sys", "prefix_tokens": 8},
        {"arrival_s": 99.0, "prompt_tokens": 2, "output_tokens": 2, "priority": "normal",
         "session_id": "s", "turn": 1, "think_s": 1.5},
        {"arrival_s": 99.0, "prompt_tokens": 2, "output_tokens": 2, "priority": "normal",
         "session_id": "s", "turn": 2, "think_s": 0.5},
    ]
    a, b = Workload(trace, vocab_size=500), Workload(trace, vocab_size=500)
    assert a.has_structure and a.starts() == [0, 1, 2]
    p0, p1 = a.prompt(0), a.prompt(1)
    assert p0[:8] == p1[:8] and p0 == b.prompt(0) and len(p0) == 13 and len(p1) == 12
    turn0 = a.prompt(2)
    assert turn0[:8] == p0[:8]
    assert a.finished(2, turn0, [7, 7]) == (3, 1.5)
    turn1 = a.prompt(3)
    assert turn1[:16] == turn0 + [7, 7] and len(turn1) == 18  # history, then its message
    assert a.abandoned(3) == [4] and a.finished(4, [], []) is None
    # another seed, other documents: a replay finds none of an earlier one's in a cache
    assert Workload(trace, vocab_size=500, seed=1).prompt(0)[:8] != p0[:8]
    plain = Workload([{"arrival_s": 0.0, "prompt_tokens": 3, "output_tokens": 1}], vocab_size=50)
    assert not plain.has_structure

"""The sampler: (seed, position)-pure randomness, top-k / top-p sets, greedy and the
temperature -> 0 limit, and the sampled distribution itself; penalties, logit bias,
min_tokens, min_p and logprobs against plain-torch references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.sampler import (
    SamplingTensors,
    TokenHistory,
    hash32,
    process_logits,
    run_sampler,
    sample,
    token_logprobs,
    uniform_from_hash,
)

# chi-square critical values at alpha = 1e-3, by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 15: 37.70}


def _sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    st = SamplingTensors.build(params, positions, vocab_size=logits.shape[1], device="cpu")
    return sample(logits, st).tolist()


def _lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_is_lowbias32_mod_2_32():
    xs = torch.randint(
        -(2**31), 2**31 - 1, (4096,), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    got = [v & 0xFFFFFFFF for v in hash32(xs).tolist()]
    assert got == [_lowbias32(v) for v in xs.tolist()]


def test_uniforms_are_in_open_interval_and_depend_on_every_input():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int32)
    positions = torch.tensor([10, 11, 10], dtype=torch.int32)
    u = uniform_from_hash(seeds, positions, 50_000)
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert len(set(u[0].tolist())) > 49_000  # different per token id


def test_same_seed_and_position_same_token_whatever_the_batch():
    vocab = 1000
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(vocab, generator=gen)
    params = [
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.7, top_k=20, seed=7),
        SamplingParams(temperature=1.3, top_p=0.8, seed=7),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7),
    ]
    for p in params:
        for position in (0, 5, 123456):
            alone = _sample(row[None], [p], [position])
            others = torch.randn(5, vocab, generator=gen)
            batch = torch.cat([others[:2], row[None], others[2:]])
            mates = [
                SamplingParams(temperature=0.0, seed=1),
                SamplingParams(temperature=2.0, top_k=3, seed=99),
                SamplingParams(temperature=1.0, top_p=0.5, seed=7),
                SamplingParams(temperature=1.0, seed=8),
                SamplingParams(temperature=0.5, seed=7),
            ]
            together = _sample(
                batch,
                [*mates[:2], p, *mates[2:]],
                [3, position, position, position + 1, position, 0],
            )
            assert together[2] == alone[0], (p, position)


def test_randomness_varies_with_seed_and_position():
    logits = torch.zeros(1, 1000)  # uniform: every token equally likely
    p = SamplingParams(temperature=1.0, seed=3)
    by_position = {_sample(logits, [p], [pos])[0] for pos in range(50)}
    by_seed = {
        _sample(logits, [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(50)
    }
    assert len(by_position) > 40 and len(by_seed) > 40


def _nucleus(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The kept set, computed the plain way: top k by probability, then the smallest
    prefix whose renormalised mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if top_k:
        order = order[:top_k]
    kept_probs = probs[order] / probs[order].sum()
    kept, mass = [], 0.0
    for token, prob in zip(order, kept_probs.tolist(), strict=True):
        kept.append(token)
        mass += prob
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (40, 1.0), (0, 0.5), (0, 0.9), (30, 0.8)])
def test_never_samples_outside_the_kept_set(top_k, top_p):
    vocab, num_rows = 500, 400
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(top_k)) * 3
    params = [
        SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=s) for s in range(num_rows)
    ]
    tokens = _sample(logits, params, list(range(num_rows)))
    hits = 0
    for row, token in enumerate(tokens):
        kept = _nucleus(logits[row], 0.8, top_k, top_p)
        assert token in kept, (row, token)
        hits += len(kept) > 1
    assert hits > num_rows // 2  # the sets were not trivially a single token


def test_greedy_and_temperature_to_zero_take_the_argmax():
    vocab, num_rows = 300, 200
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(2))
    argmax = logits.argmax(dim=-1).tolist()
    for temperature in (0.0, 1e-4):
        params = [
            SamplingParams(temperature=temperature, top_p=0.9, seed=s) for s in range(num_rows)
        ]
        assert _sample(logits, params, list(range(num_rows))) == argmax
    hot = [SamplingParams(temperature=1.0, seed=s) for s in range(num_rows)]
    assert _sample(logits, hot, list(range(num_rows))) != argmax
    # Greedy rows mixed with sampled rows keep their argmax.
    mixed = [SamplingParams(temperature=0.0 if i % 2 else 5.0, seed=i) for i in range(num_rows)]
    got = _sample(logits, mixed, [0] * num_rows)
    assert got[1::2] == argmax[1::2] and got[0::2] != argmax[0::2]


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.7), (1.2, 5, 0.8)],
)
def test_distribution_matches_softmax(temperature, top_k, top_p):
    """Over many positions of one seed, token frequencies follow softmax(logits / T)
    renormalised over the kept set (chi-square, alpha = 1e-3)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    num = 40_000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)] * num
    tokens = torch.tensor(_sample(logits.expand(num, -1).contiguous(), params, list(range(num))))
    kept = sorted(_nucleus(logits, temperature, top_k, top_p))
    probs = torch.softmax(logits[kept].double() / temperature, dim=-1)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[[t for t in range(8) if t not in kept]].sum() == 0
    assert _chi2(counts[kept], probs) < CHI2_CRIT[len(kept) - 1]


def test_consecutive_positions_are_independent():
    """Pairs (token at p, token at p+1) of a uniform 4-token vocab are uniform on 16."""
    num = 40_000
    params = [SamplingParams(temperature=1.0, seed=5)] * num
    tokens = torch.tensor(_sample(torch.zeros(num, 4), params, list(range(num))))
    pairs = tokens[:-1] * 4 + tokens[1:]
    counts = torch.bincount(pairs, minlength=16).double()
    assert _chi2(counts, torch.full((16,), 1 / 16, dtype=torch.float64)) < CHI2_CRIT[15]


def test_build_rejects_rows_without_seed():
    with pytest.raises(ValueError, match="seed"):
        SamplingTensors.build([SamplingParams()], [0], vocab_size=10, device="cpu")


# ---- penalties, bias, min_tokens, min_p, logprobs ---------------------------------------

EOS = 1


def _reference_logits(row: torch.Tensor, p: SamplingParams, prompt: list[int],
                      output: list[int]) -> torch.Tensor:
    """vLLM's processing of one row, written the plain way (a loop over the listed tokens)."""
    x = row.clone()
    for token, bias in zip(p.logit_bias_token_ids, p.logit_bias_values, strict=True):
        x[token] += bias
    if len(output) < p.min_tokens:
        for token in (*p.stop_token_ids, *(() if p.ignore_eos else (EOS,))):
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        r = p.repetition_penalty
        x[token] = x[token] / r if x[token] > 0 else x[token] * r
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token)
        x[token] -= p.presence_penalty
    return x


def _build(params, positions, histories, vocab):
    return SamplingTensors.build(params, positions, vocab_size=vocab, device="cpu",
                                 histories=histories, eos_token_ids=(EOS,))


def _random_case(seed: int, num_rows: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    params, histories = [], []
    for row in range(num_rows):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        kind = row % 4
        bias_ids = tuple(rng.sample(range(vocab), 3)) if kind == 3 else ()
        params.append(SamplingParams(
            max_tokens=64, temperature=rng.choice([0.0, 0.7, 1.0]), seed=row,
            presence_penalty=rng.uniform(-2, 2) if kind in (0, 1) else 0.0,
            frequency_penalty=rng.uniform(-2, 2) if kind == 0 else 0.0,
            repetition_penalty=rng.uniform(0.5, 2.0) if kind in (0, 2) else 1.0,
            min_tokens=50 if kind == 2 else 0, stop_token_ids=(5,) if kind == 2 else (),
            logit_bias_token_ids=bias_ids,
            logit_bias_values=tuple(rng.uniform(-100, 100) for _ in bias_ids)))
        histories.append(TokenHistory(prompt, output))
    return logits, params, histories


def test_penalties_bias_and_min_tokens_match_a_plain_reference():
    vocab = 64
    logits, params, histories = _random_case(0, 24, vocab)
    st = _build(params, list(range(24)), histories, vocab)
    got = process_logits(logits, st)
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        want = _reference_logits(logits[row], p, list(h.prompt_token_ids),
                                 list(h.output_token_ids))
        torch.testing.assert_close(got[row], want, rtol=1e-6, atol=1e-5, msg=f"row {row}")
    assert torch.equal(logits, _random_case(0, 24, vocab)[0])  # the input is left alone


def test_penalized_rows_sample_the_same_alone_or_in_any_batch():
    vocab = 200
    logits, params, histories = _random_case(1, 16, vocab)
    together = run_sampler(logits, _build(params, [7] * 16, histories, vocab)).token_ids
    for row in range(16):
        alone = run_sampler(logits[row : row + 1],
                            _build(params[row : row + 1], [7], histories[row : row + 1], vocab))
        assert alone.token_ids.item() == together[row].item()


def test_greedy_takes_the_argmax_after_penalties():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 1.0]])
    history = [TokenHistory([0], [2, 2])]

    def greedy(**kw):
        p = SamplingParams(temperature=0.0, seed=0, **kw)
        return run_sampler(logits, _build([p], [3], history, 5)).token_ids.item()

    assert greedy() == 2
    assert greedy(repetition_penalty=2.0) == 3  # 5 / 2 < 4
    assert greedy(frequency_penalty=0.6) == 3  # 5 - 2 * 0.6 < 4
    assert greedy(presence_penalty=0.6) == 2  # 5 - 0.6 > 4
    assert greedy(presence_penalty=1.5) == 3


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached():
    vocab = 10
    logits = torch.zeros(1, vocab)
    logits[0, EOS], logits[0, 7] = 50.0, 40.0

    def token(num_out, **kw):
        p = SamplingParams(max_tokens=9, temperature=1.0, seed=3, min_tokens=3, **kw)
        history = [TokenHistory([2], [4] * num_out)]
        return run_sampler(logits, _build([p], [5], history, vocab)).token_ids.item()

    assert token(2) == 7 and token(3) == EOS
    assert token(2, stop_token_ids=(7,)) not in (EOS, 7)
    assert token(2, ignore_eos=True) == EOS  # EOS is no stop for this request


def test_logit_bias_moves_tokens_in_and_out():
    vocab = 50
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4))
    top, low = logits.argmax().item(), logits.argmin().item()
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, seed=1, logit_bias_token_ids=(low,),
                           logit_bias_values=(100.0,))
        assert run_sampler(logits, _build([p], [0], [None], vocab)).token_ids.item() == low
        p = SamplingParams(temperature=0.0, seed=1, logit_bias_token_ids=(top,),
                           logit_bias_values=(-100.0,))
        assert run_sampler(logits, _build([p], [0], [None], vocab)).token_ids.item() != top


@pytest.mark.parametrize(("temperature", "min_p"), [(1.0, 0.1), (0.5, 0.05), (1.5, 0.3)])
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one(temperature, min_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    kept = [t for t in range(8) if probs[t] >= min_p * probs.max()]
    num = 40_000
    params = [SamplingParams(temperature=temperature, min_p=min_p, seed=12)] * num
    tokens = torch.tensor(_sample(logits.expand(num, -1).contiguous(), params, list(range(num))))
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[[t for t in range(8) if t not in kept]].sum() == 0
    assert _chi2(counts[kept], probs[kept] / probs[kept].sum()) < CHI2_CRIT[len(kept) - 1]


def test_penalized_draws_follow_softmax_of_the_penalized_logits():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    p = SamplingParams(temperature=0.8, seed=9, presence_penalty=0.5, frequency_penalty=0.3,
                       repetition_penalty=1.3)
    history = TokenHistory([1, 4], [0, 0, 2])
    want = torch.softmax(_reference_logits(logits, p, [1, 4], [0, 0, 2]).double() / 0.8, -1)
    num = 40_000
    st = _build([p] * num, list(range(num)), [history] * num, 6)
    tokens = run_sampler(logits.expand(num, -1).contiguous(), st).token_ids
    assert _chi2(torch.bincount(tokens, minlength=6).double(), want) < CHI2_CRIT[5]


def test_logprobs_are_the_model_raw_distribution():
    vocab, num_rows = 100, 6
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(5)) * 2
    params = [SamplingParams(temperature=t, seed=i, logprobs=k, top_k=5, presence_penalty=1.0)
              for i, (t, k) in enumerate([(0.0, 0), (0.7, 3), (1.2, 20), (1.0, None),
                                          (0.3, 1), (2.0, 5)])]
    histories = [TokenHistory([1, 2], [3, 4])] * num_rows
    st = _build(params, list(range(num_rows)), histories, vocab)
    out = run_sampler(logits, st)
    rows = token_logprobs(out, st, params)
    reference = torch.log_softmax(logits.double(), dim=-1)  # no temperature, no penalty
    for row, p in enumerate(params):
        if p.logprobs is None:
            assert rows[row] is None
            continue
        lp = rows[row]
        token = out.token_ids[row].item()
        assert lp.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        want = reference[row].topk(p.logprobs)
        assert list(lp.top_token_ids) == want.indices.tolist()
        assert list(lp.top_logprobs) == pytest.approx(want.values.tolist(), abs=1e-5)
        assert sum(math.exp(v) for v in lp.top_logprobs) <= 1.0 + 1e-6
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)


def test_sampling_params_check_the_new_fields():
    good = SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.1,
                          min_p=1.0, min_tokens=16, logit_bias_token_ids=(1, 2),
                          logit_bias_values=(-100, 100), logprobs=20)
    good.validate()
    for bad, match in [
        ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"), ({"min_tokens": 17}, "min_tokens"),
        ({"logit_bias_token_ids": (1,), "logit_bias_values": ()}, "logit_bias"),
        ({"logit_bias_token_ids": (1, 1), "logit_bias_values": (1, 2)}, "logit_bias"),
        ({"logit_bias_token_ids": (1,), "logit_bias_values": (101,)}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**{**{"max_tokens": 16}, **bad}).validate()


def test_stop_ids_past_the_vocabulary_are_no_error():
    p = SamplingParams(temperature=0.0, seed=0, min_tokens=2, stop_token_ids=(10**6,))
    st = _build([p], [3], [TokenHistory([1], [])], 10)
    assert 0 <= run_sampler(torch.zeros(1, 10), st).token_ids.item() < 10

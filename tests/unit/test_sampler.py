"""The sampler: (seed, position)-pure randomness, top-k / top-p sets, greedy and the
temperature -> 0 limit, and the sampled distribution itself."""

from __future__ import annotations

import pytest
import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.sampler import SamplingTensors, hash32, sample, uniform_from_hash

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

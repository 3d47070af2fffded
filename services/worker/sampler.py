"""Batched sampling with randomness that is a pure function of (seed, position).

Each row of a logits batch has its own temperature, top-k, top-p and seed. A sampled
row draws token

    argmax_v  logits[v] / T + gumbel(seed, position, v)     over the top-k/top-p set

(the Gumbel-max trick: an exact draw from softmax(logits / T) restricted to that set).
The Gumbel noise comes from a counter-based integer hash of (seed, position, token id),
computed with int32 tensor ops; no generator state exists anywhere. So a request draws
the same token at a position whatever else shares its batch, and after preemption,
migration or replay. Temperature 0 rows take the argmax.

Everything runs on the logits' device with no host sync; the caller reads the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ferry.common.sampling import SamplingParams

# lowbias32 (Chris Wellons' hash-prospector): x ^= x >> 16; x *= M1; x ^= x >> 15;
# x *= M2; x ^= x >> 16, all mod 2^32. Multipliers as signed int32 (int32 products wrap).
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)
_TOKEN_SALT = 0x2545F491  # keeps token keys apart from row keys
_POSITION_SALT = 0x68E31DA4 - (1 << 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingTensors:
    """Per-row sampling parameters of one step, on the logits' device."""

    temperatures: torch.Tensor  # [n] float32, 0 = greedy
    top_ps: torch.Tensor  # [n] float32, in (0, 1]; 1 = off
    top_ks: torch.Tensor  # [n] int32, in [1, vocab]; vocab = off
    seeds: torch.Tensor  # [n] int32, in [0, 2^31)
    positions: torch.Tensor  # [n] int32, position of the token being sampled
    # Host flags over the sampled (temperature > 0) rows: picking a path needs no sync.
    all_greedy: bool
    any_top_k: bool
    max_top_k: int  # largest top-k of a sampled row (vocab if one has it off)
    any_top_p: bool

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        positions: Sequence[int],
        *,
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingTensors:
        """params[i] and positions[i] describe row i. Every seed must be set."""
        if len(params) != len(positions):
            raise ValueError("one position per row is needed")
        if any(p.seed is None for p in params):
            raise ValueError("every row needs a seed (the engine resolves them)")
        top_ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        sampled_top_ks = [k for p, k in zip(params, top_ks, strict=True) if not p.is_greedy]
        pin = torch.device(device).type == "cuda"
        floats = torch.tensor(
            [[float(p.temperature) for p in params], [float(p.top_p) for p in params]],
            dtype=torch.float32,
            pin_memory=pin,
        ).to(device, non_blocking=True)
        ints = torch.tensor(
            [top_ks, [int(p.seed) for p in params], list(positions)],  # type: ignore[arg-type]
            dtype=torch.int32,
            pin_memory=pin,
        ).to(device, non_blocking=True)
        return cls(
            temperatures=floats[0],
            top_ps=floats[1],
            top_ks=ints[0],
            seeds=ints[1],
            positions=ints[2],
            all_greedy=not sampled_top_ks,
            any_top_k=any(k < vocab_size for k in sampled_top_ks),
            max_top_k=max(sampled_top_ks, default=vocab_size),
            any_top_p=any(p.top_p < 1.0 for p in params if not p.is_greedy),
        )


def sample(
    logits: torch.Tensor,  # [n, vocab] float32
    st: SamplingTensors,
) -> torch.Tensor:  # [n] int64 token ids
    greedy_ids = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy_ids
    vocab_size = logits.shape[1]
    # Greedy rows run through the sampled path too (with T = 1), then take argmax.
    temperatures = torch.where(st.temperatures > 0, st.temperatures, 1.0)
    scores = logits / temperatures[:, None]
    if st.any_top_p:
        scores = _mask_top_k_top_p(scores, st.top_ks, st.top_ps, st.max_top_k)
    elif st.any_top_k:
        scores = _mask_top_k(scores, st.top_ks, st.max_top_k)
    scores += gumbel_noise(st.seeds, st.positions, vocab_size)
    return torch.where(st.temperatures > 0, scores.argmax(dim=-1), greedy_ids)


def _mask_top_k(
    scores: torch.Tensor,  # [n, vocab] float32
    top_ks: torch.Tensor,  # [n] int32 in [1, vocab]
    max_top_k: int,
) -> torch.Tensor:  # [n, vocab], -inf outside each row's top k (ties at the k-th kept)
    top = scores.topk(max_top_k, dim=-1).values  # [n, max_top_k] descending
    # Sampled rows have k <= max_top_k; the clamp only touches greedy rows.
    kth = top.gather(1, (top_ks.clamp(max=max_top_k) - 1).long()[:, None])  # [n, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def _mask_top_k_top_p(
    scores: torch.Tensor,  # [n, vocab] float32
    top_ks: torch.Tensor,  # [n] int32 in [1, vocab]
    top_ps: torch.Tensor,  # [n] float32 in (0, 1]
    max_top_k: int,
) -> torch.Tensor:  # [n, vocab], -inf outside the kept set
    """Keep each row's top k tokens, then of those the smallest most-likely set whose
    probability reaches top_p (renormalised after top-k), as Hugging Face does. Only the
    max_top_k best tokens are sorted when every sampled row has a top-k."""
    if max_top_k < scores.shape[1]:
        sorted_scores, order = scores.topk(max_top_k, dim=-1)  # [n, K] descending
    else:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # [n, vocab]
    ranks = torch.arange(sorted_scores.shape[1], device=scores.device)
    sorted_scores.masked_fill_(ranks[None, :] >= top_ks[:, None], float("-inf"))
    probs = sorted_scores.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive: rank 0 always kept
    # top_p = 1 keeps everything even where rounding pushes the running sum past 1.
    cut = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
    sorted_scores.masked_fill_(cut, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter_(1, order, sorted_scores)


def gumbel_noise(
    seeds: torch.Tensor,  # [n] int32
    positions: torch.Tensor,  # [n] int32
    vocab_size: int,
) -> torch.Tensor:  # [n, vocab] float32, standard Gumbel, a pure function of its inputs
    u = uniform_from_hash(seeds, positions, vocab_size)
    return u.log_().neg_().log_().neg_()


def uniform_from_hash(
    seeds: torch.Tensor,  # [n] int32
    positions: torch.Tensor,  # [n] int32
    vocab_size: int,
) -> torch.Tensor:  # [n, vocab] float32 in (0, 1), 24 random bits each
    #   row_key[i]   = h(seed_i ^ h(position_i ^ POSITION_SALT))
    #   token_key[v] = h(v ^ TOKEN_SALT)
    #   bits[i, v]   = h(row_key[i] ^ token_key[v])          (h = lowbias32)
    device = seeds.device
    row_key = hash32(seeds ^ hash32(positions ^ _POSITION_SALT))  # [n]
    token_ids = torch.arange(vocab_size, dtype=torch.int32, device=device)
    token_key = hash32(token_ids ^ _TOKEN_SALT)  # [vocab]
    bits = hash32(row_key[:, None] ^ token_key[None, :])  # [n, vocab]
    mantissa = bits.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # top 24 bits
    return mantissa.float().add_(0.5).mul_(2.0**-24)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of every element, as uint32 bit patterns in int32 (a new tensor).
    Arithmetic shifts are masked to act as logical ones."""
    x = x.to(torch.int32, copy=True)
    x ^= (x >> 16) & 0xFFFF
    x *= _M1
    x ^= (x >> 15) & 0x1FFFF
    x *= _M2
    x ^= (x >> 16) & 0xFFFF
    return x

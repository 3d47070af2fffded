"""The SDPA paged attention (what the torch backend runs) against the readable reference
in attention_torch.py, on CPU: whole prompts (is_causal), chunks over cached context
(the bottom-right mask, in query tiles), decode rows batched in groups (padded, masked),
mixed steps in any order, a request with no new tokens, GQA 1/3/4/8, block sizes 1 to
32, fp32, bf16 and fp16, and random steps drawn from a seed."""

from __future__ import annotations

import random

import pytest
import torch

from ferry.kernels import attention_sdpa
from ferry.kernels.attention_sdpa import paged_attention_sdpa
from ferry.kernels.testing import make_case, reference_fp32, rel_err

# bound on ||out - ref|| / ||ref||, the reference computing in fp32 from the same inputs
REL_ERR_BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
HEADS = {"gqa1": (4, 4), "gqa3": (6, 2), "gqa4": (8, 2), "gqa8": (8, 1)}

# name -> (query_lens, seq_lens)
STEPS = {
    "prompt": ([37], [37]),
    "prompts": ([5, 64, 17], [5, 64, 17]),
    "chunk_over_context": ([20], [53]),
    "chunks_over_context": ([16, 3, 40], [16, 50, 41]),
    "decode_equal_lens": ([1, 1, 1, 1], [40, 40, 40, 40]),
    "decode_varied_lens": ([1, 1, 1, 1, 1], [1, 17, 64, 5, 33]),
    "mixed_decode_first": ([1, 1, 9, 1, 30], [20, 7, 9, 48, 45]),
    "mixed_prefill_first": ([12, 1, 1, 8], [12, 33, 2, 40]),
    "no_new_tokens": ([1, 0, 6, 1], [9, 25, 30, 14]),
}


def _check(case, dtype: torch.dtype) -> None:
    out = paged_attention_sdpa(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert rel_err(out, reference_fp32(case)) <= REL_ERR_BOUND[dtype]


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_steps_match_reference(step: str, heads: str) -> None:
    query_lens, seq_lens = STEPS[step]
    num_q_heads, num_kv_heads = HEADS[heads]
    case = make_case(query_lens=query_lens, seq_lens=seq_lens, num_q_heads=num_q_heads,
                     num_kv_heads=num_kv_heads, head_dim=32, block_size=8, dtype=torch.float32,
                     generator=torch.Generator().manual_seed(1))
    _check(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_dtypes_and_block_sizes(dtype: torch.dtype, block_size: int) -> None:
    query_lens, seq_lens = STEPS["mixed_decode_first"]
    case = make_case(query_lens=query_lens, seq_lens=seq_lens, num_q_heads=8, num_kv_heads=2,
                     head_dim=64, block_size=block_size, dtype=dtype,
                     generator=torch.Generator().manual_seed(2))
    _check(case, dtype)


def test_decode_groups_split_by_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of a few hundred tokens splits 9 decode rows into several groups, one of
    them a single row over the budget on its own."""
    token_bytes = 2 * 2 * 32 * 4  # K+V of one token: Hkv 2, D 32, fp32
    monkeypatch.setattr(attention_sdpa, "DECODE_GROUP_BYTES", 200 * token_bytes)
    seq_lens = [30, 90, 60, 300, 10, 10, 10, 10, 70]
    case = make_case(query_lens=[1] * len(seq_lens), seq_lens=seq_lens, num_q_heads=8,
                     num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                     generator=torch.Generator().manual_seed(3))
    _check(case, torch.float32)


@pytest.mark.parametrize("tile", [1, 7, 256])
def test_chunk_tiles(monkeypatch: pytest.MonkeyPatch, tile: int) -> None:
    """Chunks over cached context in query tiles: one row each, tiles off the chunk
    length and the block size, and the default tile over a 600-row chunk."""
    monkeypatch.setattr(attention_sdpa, "CHUNK_TILE", tile)
    case = make_case(query_lens=[30, 1, 600, 9], seq_lens=[45, 20, 900, 9], num_q_heads=6,
                     num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                     generator=torch.Generator().manual_seed(4))
    _check(case, torch.float32)


@pytest.mark.parametrize("seed", range(12))
def test_random_steps(seed: int) -> None:
    rng = random.Random(seed)
    num_q_heads, num_kv_heads = HEADS[rng.choice(sorted(HEADS))]
    query_lens, seq_lens = [], []
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice(["decode", "prompt", "chunk"])
        seq_len = rng.randint(1, 150)
        query_lens.append({"decode": 1, "prompt": seq_len, "chunk": rng.randint(1, seq_len)}[kind])
        seq_lens.append(seq_len)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    case = make_case(query_lens=query_lens, seq_lens=seq_lens, num_q_heads=num_q_heads,
                     num_kv_heads=num_kv_heads, head_dim=rng.choice([16, 32, 64]),
                     block_size=rng.choice([1, 4, 16]), dtype=dtype,
                     generator=torch.Generator().manual_seed(seed))
    _check(case, dtype)

"""Launch configs of the Triton attention kernels and the heuristics that pick them.

Plain Python (no triton import), so the choices can be tested anywhere and read by the
benchmark. `bench/kernels_bench.py` sweeps the fields and prints the best; move its
winners into the defaults below when they differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Shared memory the default configs plan for (an H100/H200 block may use up to 227 KiB,
# and Triton adds a little of its own). Prefill runs one big program per SM; decode wants
# three resident per SM (PROGRAMS_PER_SM) to keep enough loads in flight.
PREFILL_SMEM_BUDGET = 160 * 1024
DECODE_SMEM_BUDGET = 75 * 1024
# K/V tiles Triton's pipeliner keeps resident per loop (seen in the sm_90 TTGIR of both
# kernels at their default num_stages: a double buffer).
KV_BUFFERS = 2
DEFAULT_NUM_SMS = 132  # H100/H200; used where no CUDA device can be asked (interpreter)

# Split-K cost model (choose_num_splits), in units of one K+V tile load per program.
MAX_SPLITS = 64
PROGRAMS_PER_SM = 3  # decode programs resident per SM at the default config (72 KB smem)
STARTUP_TILES = 1  # a program's fixed cost: block table + first tile latency, q load
REDUCE_TILES = 2  # the merge kernel's launch and pass over the partial results


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeConfig:
    block_n: int = 64  # keys per tile (power of two >= 16; need not match block_size)
    num_warps: int = 4
    num_stages: int = 5  # software pipelining depth (see default_decode_config)
    num_splits: int | None = None  # None: chosen by choose_num_splits at each launch


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillConfig:
    block_m: int = 128  # rows (query token x GQA head) per tile, power of two >= 16
    block_n: int = 64  # keys per tile, power of two >= 16
    num_warps: int = 8
    num_stages: int = 3


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def fit_tiles(
    *, block_m: int, block_n: int, head_dim: int, elem_bytes: int, budget: int
) -> tuple[int, int]:
    """Halve block_n, then block_m, until the q tile plus KV_BUFFERS K and V tiles fit in
    `budget` bytes. Neither goes below 16 rows, the smallest tl.dot."""

    def smem(m: int, n: int) -> int:
        return (m + 2 * KV_BUFFERS * n) * head_dim * elem_bytes

    while smem(block_m, block_n) > budget and block_n > 16:
        block_n //= 2
    while smem(block_m, block_n) > budget and block_m > 16:
        block_m //= 2
    return block_m, block_n


def default_decode_config(*, head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """64-key tiles (bf16, D <= 128), double-buffered: num_stages 5, because the block-id
    load ahead of each tile takes pipeline stages of its own (at 3 or 4 the sm_90 TTGIR
    shows a single K/V buffer)."""
    _, block_n = fit_tiles(
        block_m=16, block_n=64, head_dim=head_dim, elem_bytes=itemsize(dtype),
        budget=DECODE_SMEM_BUDGET,
    )  # fmt: skip
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=5)


def default_prefill_config(
    *, head_dim: int, dtype: torch.dtype, group: int, max_query_len: int
) -> PrefillConfig:
    """Large tiles for long prompts; small ones when every request brings few tokens (a
    mostly-decode mixed batch), so padding rows do not multiply the work."""
    rows = next_power_of_2(max(1, max_query_len) * group)
    block_m = min(128, max(16, rows))
    if dtype == torch.float32:  # tf32x3 dots stage extra operand copies in shared memory
        block_m = min(block_m, 64)
    block_m, block_n = fit_tiles(
        block_m=block_m, block_n=64, head_dim=head_dim, elem_bytes=itemsize(dtype),
        budget=PREFILL_SMEM_BUDGET,
    )  # fmt: skip
    block_m = max(block_m, next_power_of_2(group))
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    return PrefillConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=3)


@functools.lru_cache(maxsize=4096)
def choose_num_splits(
    *, num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, block_n: int
) -> int:
    """Split count with the lowest modelled time. Programs run in waves of
    num_sms * PROGRAMS_PER_SM; each costs its tiles plus STARTUP_TILES; more than one
    split adds the merge. Ties go to fewer splits. E.g. on 132 SMs with 8 kv heads and
    64-key tiles: batch 64 x 4k keys -> 3 splits (1536 programs, 4 waves), batch 1 x 32k
    -> 47 splits (376 programs, one wave)."""
    base = max(1, num_reqs * num_kv_heads)
    max_tiles = max(1, -(-max_seq_len // block_n))
    slots = num_sms * PROGRAMS_PER_SM

    def cost(splits: int) -> int:
        waves = -(-base * splits // slots)
        tiles = -(-max_tiles // splits)
        return waves * (tiles + STARTUP_TILES) + (REDUCE_TILES if splits > 1 else 0)

    return min(range(1, min(MAX_SPLITS, max_tiles) + 1), key=lambda s: (cost(s), s))

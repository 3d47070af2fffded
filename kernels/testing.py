"""Random paged-attention problems for kernel tests and benchmarks (no pytest here).

A case is a full worker-style cache, [num_blocks, num_layers, 2, block_size, Hkv, D],
filled with noise, of which the kernels see one layer's strided views. Each request gets
a shuffled set of physical blocks; block-table entries past a request's last block hold
an id far outside the cache, so a kernel that reads them faults instead of passing.
The new tokens' K/V are returned apart, for the caller to write with the backend's
write_kv before attention, as a worker step does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ferry.kernels.kv_layout import allocate_kv_cache, layer_view
from ferry.kernels.metadata import AttentionMetadata

INVALID_BLOCK_ID = 1 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class PagedCase:
    q: torch.Tensor  # [T, Hq, D]
    k_new: torch.Tensor  # [T, Hkv, D] keys of the step's tokens (not yet in the cache)
    v_new: torch.Tensor  # [T, Hkv, D]
    kv_cache: torch.Tensor  # [num_blocks, num_layers, 2, block_size, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], strided view of `layer`
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata
    scale: float


def make_metadata(
    *,
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    block_size: int,
) -> AttentionMetadata:
    """Metadata for a step in which request b adds query_lens[b] tokens and ends at
    seq_lens[b] tokens, with its blocks listed in block_tables[b]."""
    device = block_tables.device
    starts = [0]
    slots: list[torch.Tensor] = []
    for b, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        assert 0 <= q_len <= seq_len, (q_len, seq_len)
        starts.append(starts[-1] + q_len)
        pos = torch.arange(seq_len - q_len, seq_len, device=device)
        blocks = block_tables[b].long()[pos // block_size]
        slots.append(blocks * block_size + pos % block_size)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        slot_mapping=torch.cat(slots)
        if slots
        else torch.zeros(0, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )


def make_case(
    *,
    query_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    num_layers: int = 2,
    layer: int = 1,
    spare_blocks: int = 3,
    generator: torch.Generator | None = None,
) -> PagedCase:
    """A random step: request b has seq_lens[b] - query_lens[b] cached tokens and adds
    query_lens[b] new ones. `spare_blocks` unused blocks per request sit in the cache."""
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_req, default=0) + 1
    num_blocks = sum(blocks_per_req) + spare_blocks * len(seq_lens) + 1
    # with a generator, draw on its device (reproducible); without, on `device` (fast)
    gen_device = generator.device if generator is not None else torch.device(device)

    def randn(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=generator, device=gen_device)
        return x.to(device=device, dtype=dtype)

    kv_cache = allocate_kv_cache(
        num_blocks=num_blocks,
        num_layers=num_layers,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    kv_cache.copy_(randn(*kv_cache.shape))
    k_cache, v_cache = layer_view(kv_cache, layer)

    perm = torch.randperm(num_blocks, generator=generator, device=gen_device).to(device)
    block_tables = torch.full((len(seq_lens), max_blocks), INVALID_BLOCK_ID, dtype=torch.int32)
    block_tables = block_tables.to(device)
    next_block = 0
    for b, n in enumerate(blocks_per_req):
        block_tables[b, :n] = perm[next_block : next_block + n].to(torch.int32)
        next_block += n

    meta = make_metadata(
        query_lens=query_lens, seq_lens=seq_lens, block_tables=block_tables, block_size=block_size
    )
    num_tokens = sum(query_lens)
    return PagedCase(
        q=randn(num_tokens, num_q_heads, head_dim),
        k_new=randn(num_tokens, num_kv_heads, head_dim),
        v_new=randn(num_tokens, num_kv_heads, head_dim),
        kv_cache=kv_cache,
        k_cache=k_cache,
        v_cache=v_cache,
        meta=meta,
        scale=head_dim**-0.5,
    )


def reference_fp32(case: PagedCase) -> torch.Tensor:
    """The torch reference in fp32 from the case's (low-precision) inputs: [T, Hq, D]."""
    from ferry.kernels.attention_torch import paged_attention_torch

    return paged_attention_torch(
        case.q.float(), case.k_cache.float(), case.v_cache.float(), case.meta, case.scale
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives NaN (which fails every bound)."""
    out64, ref64 = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64))

"""The worker's KV cache: one allocation, block-major.

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

One block's keys and values for every layer are contiguous, so a migration moves a
set of blocks with one indexed copy (`kv_cache[block_ids]`). Attention kernels see a
per-layer strided view:

    k_cache, v_cache = layer_view(kv_cache, layer)   # each [num_blocks, block_size, Hkv, D]
    stride(0) = num_layers * 2 * block_size * Hkv * D  (block stride)
"""

from __future__ import annotations

import torch


def allocate_kv_cache(
    *,
    num_blocks: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    return torch.zeros(
        (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
    )


def bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


def layer_view(kv_cache: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache) of one layer, each [num_blocks, block_size, Hkv, D] (strided)."""
    return kv_cache[:, layer, 0], kv_cache[:, layer, 1]

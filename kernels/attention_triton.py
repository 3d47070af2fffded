"""Triton attention backend: the cache write, and paged attention that sends decode-only
steps to the split-K decode kernel and everything else (prefill, chunked prefill, mixed
prefill + decode batches) to the prefill kernel. Same contract as attention_torch.py.

Every launch uses host-side ints and shapes only (no .item(), no host sync), so a step
can be captured in a CUDA graph. Scratch for split-K comes from the caching allocator
(the graph's private pool while capturing).
"""

from __future__ import annotations

import torch

from ferry.kernels.cache_ops_triton import write_kv_triton
from ferry.kernels.decode_triton import paged_decode
from ferry.kernels.metadata import AttentionMetadata
from ferry.kernels.prefill_triton import paged_prefill


def paged_attention_triton(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, Hq, D]; allocated when None
) -> torch.Tensor:  # [T, Hq, D]
    if meta.is_decode_only and q.shape[0] == meta.num_reqs:
        return paged_decode(
            q,
            k_cache,
            v_cache,
            meta.seq_lens,
            meta.block_tables,
            max_seq_len=meta.max_seq_len,
            scale=scale,
            out=out,
        )
    return paged_prefill(q, k_cache, v_cache, meta, scale, out=out)


__all__ = ["paged_attention_triton", "write_kv_triton"]

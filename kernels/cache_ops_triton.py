"""Cache write: scatter the new tokens' keys and values into their slots of the paged cache.

    slot_mapping[t] = block_id * block_size + offset      (slot < 0: padding, skipped)
    k[t, h, :]  ->  k_cache[block_id, offset, h, :]        (v alike)

One program per token moves all of its Hkv * D keys and values. The caches are per-layer
strided views (block stride = num_layers * 2 * block_size * Hkv * D), so addresses come
from their strides, never from a contiguous block dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (strided layer view)
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (same strides as k_cache)
    slot_mapping_ptr,  # [T] int64
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HEADS_PAD: tl.constexpr,  # next power of two >= num_kv_heads
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # int32 slots would overflow
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    src_k = token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = (
        block_id * stride_cache_block
        + offset * stride_cache_tok
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    k = tl.load(k_ptr + src_k, mask=mask)
    v = tl.load(v_ptr + src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor,  # [T, Hkv, D] keys of the new tokens
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset; < 0 skips
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"shapes do not match: k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if head_dim & (head_dim - 1):
        raise ValueError(f"write_kv_triton needs a power-of-two head_dim, got {head_dim}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides (views of one allocation)")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} != [{num_tokens}]")
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1:
        raise ValueError("the cache's head_dim dimension must be contiguous")
    heads_pad = triton.next_power_of_2(num_kv_heads)
    # one warp moves 512 bytes per pass at 16 bytes a thread; fewer warps for small rows
    row_bytes = heads_pad * head_dim * k_cache.element_size()
    num_warps = max(1, min(4, row_bytes // 512))
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HEADS_PAD=heads_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=num_warps,
    )

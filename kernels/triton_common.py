"""Pieces shared by the Triton attention kernels: reading a KV tile through the block
table, the tensor-core dot, and the host-side checks every launcher runs.

How a kernel finds a key (values alike), for logical position p of request b:

    block_tables[b, p // BLOCK_SIZE] = physical block id
    p % BLOCK_SIZE                   = slot inside that block
    k_cache[block, slot, h, d] at     block * stride_block + slot * stride_tok
                                      + h * stride_head + d

    kv_cache (one allocation):  [num_blocks, num_layers, 2, BLOCK_SIZE, Hkv, D]
    per-layer view k_cache:     [num_blocks, BLOCK_SIZE, Hkv, D]
                                 stride_block = num_layers * 2 * BLOCK_SIZE * Hkv * D
                                 stride_tok = Hkv * D, stride_head = D, stride_d = 1

A tile of BLOCK_N positions may span several physical blocks (BLOCK_N > BLOCK_SIZE) or
part of one (BLOCK_N < BLOCK_SIZE): each row looks its block up on its own. Each row is
D contiguous elements, so the loads stay 16 bytes wide. Block ids are widened to int64
before they meet the block stride: a real cache holds more than 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


@triton.jit
def kv_tile_offsets(
    block_table_row_ptr,  # [max_blocks] int32, this request's row of block_tables
    tile_start,  # first logical position of the tile
    seq_len,  # positions >= seq_len are masked
    kv_head,
    stride_block,
    stride_tok,
    stride_head,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets [BLOCK_N] (int64) of the tile's rows in k_cache/v_cache for one kv
    head, and the mask [BLOCK_N] of rows inside the sequence."""
    pos = tile_start + tl.arange(0, BLOCK_N)
    in_seq = pos < seq_len
    block_id = tl.load(block_table_row_ptr + pos // BLOCK_SIZE, mask=in_seq, other=0)
    row = block_id.to(tl.int64) * stride_block + (pos % BLOCK_SIZE) * stride_tok
    return row + kv_head * stride_head, in_seq


@triton.jit
def mma(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_MODE comes from `dot_mode` below."""
    if DOT_MODE == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == "tf32x3":
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


def check_attention_inputs(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
) -> None:
    """Raise ValueError with the reason when the Triton kernels cannot take these inputs."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [T, Hq, D] and k_cache, v_cache [num_blocks, block_size, Hkv, D]; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    head_dim = q.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if head_dim & (head_dim - 1) or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"triton attention needs a power-of-two head_dim in [{MIN_HEAD_DIM}, "
            f"{MAX_HEAD_DIM}] (tiles are powers of two); got {head_dim}"
        )
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q and the caches must share one of {SUPPORTED_DTYPES}; got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache and v_cache must share strides (views of one allocation); got "
            f"{k_cache.stride()} and {v_cache.stride()}"
        )


def dot_mode(dtype: torch.dtype, device: torch.device) -> str:
    """How `mma` multiplies tiles of this dtype:
    "native"  bf16/fp16 on the GPU: tensor cores, fp32 accumulation;
    "tf32x3"  fp32 on the GPU: three tf32 products, about fp32 accuracy ("ieee" would
              drop to FMA loops that spill registers);
    "upcast"  the CPU interpreter (CPU tensors reach a Triton kernel only there): fp32
              numpy matmul, because its bf16 dot multiplies raw bit patterns (Triton
              issue #11584)."""
    if device.type == "cpu":
        return "upcast"
    return "tf32x3" if dtype == torch.float32 else "native"

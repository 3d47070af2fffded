"""Split-K paged decode: one new query token per request, KV read through the block table.

Decode is bound by reading the KV cache, so the kernel is shaped around that read:

- GQA grouping: one program serves all GROUP = Hq / Hkv query heads of a kv head, so
  each K/V tile is loaded once. The group is padded to 16 rows for tl.dot; padding rows
  cost tensor-core slots, not bytes.
- Split-K: request b's KV tiles are cut into num_splits contiguous ranges, one program
  each, so a small batch still fills every SM. A second kernel merges the partial
  results by their log-sum-exp. With one split the first kernel writes `out` itself.

    grid (Hkv, B, num_splits); num_tiles = cdiv(seq_len, BLOCK_N)
    tiles_per_split = cdiv(num_tiles, num_splits)

    tiles  | 0 1 2 | 3 4 5 | 6 7 8 | 9 . . |
    split  |   0   |   1   |   2   |   3   |   (split 3 has no tiles: lse = -inf)

The split count is fixed on the host, but each request's split length comes from its
device-side seq_len, so a CUDA graph captured at one length stays right at any other.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ferry.kernels.triton_common import check_attention_inputs, dot_mode, kv_tile_offsets, mma
from ferry.kernels.triton_configs import (
    DEFAULT_NUM_SMS,
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
)

LOG2E = 1.4426950408889634


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# Ints that vary with the batch are not specialized: each new "== 1" or "% 16 == 0"
# pattern would compile a new variant (~1 s) in the middle of serving.
@triton.jit(do_not_specialize=["num_splits", "stride_qb", "stride_ob", "stride_oh",
                               "stride_os", "stride_lb", "stride_lh", "stride_bt"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (strided layer view)
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (same strides as k_cache)
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    out_ptr,  # SINGLE_SPLIT: [B, Hq, D] (q's dtype); else partial out [B, Hq, S, D] fp32
    lse_ptr,  # [B, Hq, S] fp32, log2-sum-exp2 of each split's scores (unused if SINGLE_SPLIT)
    scale_log2e,  # softmax scale * log2(e): the softmax runs in base 2
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_os,  # out's split stride (0 when SINGLE_SPLIT)
    stride_lb,
    stride_lh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    # kv heads vary fastest: programs running side by side read the interleaved head rows
    # of the same cache blocks
    kv_head = tl.program_id(0)
    req = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + req)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    # rows: the GROUP query heads of this kv head, padded with zero rows to GROUP_PAD
    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q_offs = req.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    block_table_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile in range(tile_begin, tile_end):
        rows_kv, in_seq = kv_tile_offsets(
            block_table_row,
            tile * BLOCK_N,
            seq_len,
            kv_head,
            stride_cache_block,
            stride_cache_tok,
            stride_cache_head,
            BLOCK_N,
            BLOCK_SIZE,
        )
        kv_offs = rows_kv[:, None] + dims[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=in_seq[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_cache_ptr + kv_offs, mask=in_seq[:, None], other=0.0)  # [BLOCK_N, D]
        s = mma(q, tl.trans(k), DOT_MODE) * scale_log2e  # [GROUP_PAD, BLOCK_N]
        s = tl.where(in_seq[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new

    # an empty split (or seq_len 0) leaves l_i = 0 and m_i = -inf: zeros and lse = -inf
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_offs = req.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(out_ptr + out_offs + split * stride_os, out, mask=row_valid[:, None])
        lse = m_i + tl.log2(l_safe)
        lse_offs = req.to(tl.int64) * stride_lb + heads * stride_lh + split
        tl.store(lse_ptr + lse_offs, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits", "stride_pb", "stride_ph", "stride_ps",
                               "stride_lb", "stride_lh", "stride_ob", "stride_oh"])
def _decode_reduce_kernel(
    part_out_ptr,  # [B, Hq, S, D] fp32, each split's normalized output
    lse_ptr,  # [B, Hq, S] fp32, each split's log2-sum-exp2
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    SPLITS_PAD: tl.constexpr,  # next power of two >= num_splits
    HEAD_DIM: tl.constexpr,
):
    """out = sum_s 2^(lse_s - lse) * part_out_s, with lse = log2 sum_s 2^lse_s."""
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    in_range = splits < num_splits
    lse = tl.load(
        lse_ptr + req * stride_lb + head * stride_lh + splits, mask=in_range, other=float("-inf")
    )
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0: all splits empty
    weight = tl.exp2(lse - lse_max)  # [SPLITS_PAD]; empty splits weigh 0
    part_offs = req * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :]
    part = tl.load(part_out_ptr + part_offs, mask=in_range[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + req * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D], one query token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    seq_lens: torch.Tensor,  # [B] int32, KV length including the new token
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    *,
    max_seq_len: int,  # host-side bound on seq_lens, only used to pick the split count
    scale: float,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,  # [B, Hq, D], written in full
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each request's single new token over its whole paged KV. Launches
    only (no host sync), so it can be captured in a CUDA graph. A request with
    seq_len 0 (batch padding) gets zeros."""
    check_attention_inputs(q, k_cache, v_cache)
    num_reqs, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if seq_lens.shape != (num_reqs,) or block_tables.shape[0] != num_reqs:
        raise ValueError(
            f"decode expects one query row per request: q has {num_reqs} rows, seq_lens "
            f"{tuple(seq_lens.shape)}, block_tables {tuple(block_tables.shape)}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs a contiguous last dimension")
    config = config or default_decode_config(head_dim=head_dim, dtype=q.dtype)
    num_splits = config.num_splits or choose_num_splits(
        num_reqs=num_reqs,
        num_kv_heads=num_kv_heads,
        max_seq_len=max_seq_len,
        num_sms=_num_sms(q.device),
        block_n=config.block_n,
    )
    if out is None:
        out = torch.empty((num_reqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    if num_reqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    single = num_splits == 1
    if single:
        part_out, lse = out, out  # lse is unused by the kernel
        stride_os, stride_lb, stride_lh = 0, 0, 0
    else:
        part_out = torch.empty(
            (num_reqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((num_reqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        stride_os, stride_lb, stride_lh = part_out.stride(2), lse.stride(0), lse.stride(1)
    _decode_split_kernel[(num_kv_heads, num_reqs, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        part_out,
        lse,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        part_out.stride(0),
        part_out.stride(1),
        stride_os,
        stride_lb,
        stride_lh,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size,
        SINGLE_SPLIT=single,
        DOT_MODE=dot_mode(q.dtype, q.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_reqs, num_q_heads)](
            part_out,
            lse,
            out,
            num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=4 if head_dim * triton.next_power_of_2(num_splits) <= 4096 else 8,
        )
    return out

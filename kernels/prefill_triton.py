"""Paged prefill / chunked prefill / mixed-batch attention (flash-attention style).

Each program owns one q tile of one request and one kv head, and streams that request's
keys and values through the block table with an online softmax. The tile's rows are
(query token, query head) pairs of the kv head's GQA group, so every K/V tile read
serves all GROUP heads at once:

    row r of a tile:  token = q_tile_start + r // GROUP      (BLOCK_Q = BLOCK_M // GROUP)
                      head  = kv_head * GROUP + r % GROUP
    rows r >= BLOCK_Q * GROUP (GROUP not a power of two) are padding

Query token i of request b sits at absolute position ctx_len + i, ctx_len = seq_len -
q_len (the part already cached, possibly written by earlier chunks). Keys of one q tile:

    positions  0 .................. full_end ............ kv_end
               | every row sees all | causal mask needed |
    full_end = (ctx_len + q_tile_start + 1) rounded down to BLOCK_N
    kv_end   = min(seq_len, ctx_len + q_tile_start + BLOCK_Q)

Programs are laid out without host-side bookkeeping: request b owns tiles
[query_start_loc[b] // BLOCK_Q + b, query_start_loc[b+1] // BLOCK_Q + b + 1), which over-
covers its cdiv(q_len, BLOCK_Q) tiles; a program finds its request by binary search and
leaves if its tile is past q_len. The grid, T // BLOCK_Q + B tiles by Hkv, depends on
host ints only, so the launch needs no sync. Decode rows (q_len 1) are one-token tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ferry.kernels.metadata import AttentionMetadata
from ferry.kernels.triton_common import check_attention_inputs, dot_mode, kv_tile_offsets, mma
from ferry.kernels.triton_configs import PrefillConfig, default_prefill_config

LOG2E = 1.4426950408889634


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile_id, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= tile_id (binary search)."""
    lo = 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if mid_first_tile <= tile_id:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, D]
    acc,  # [BLOCK_M, D] fp32
    m_i,  # [BLOCK_M] fp32, running max of base-2 scores
    l_i,  # [BLOCK_M] fp32, running sum of exp2(score - m_i)
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    kv_start,
    seq_len,
    q_pos,  # [BLOCK_M] absolute position of each row's query token
    kv_head,
    scale_log2e,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    CAUSAL: tl.constexpr,  # apply key <= query; False for tiles every row fully sees
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    rows_kv, in_seq = kv_tile_offsets(
        block_table_row,
        kv_start,
        seq_len,
        kv_head,
        stride_cache_block,
        stride_cache_tok,
        stride_cache_head,
        BLOCK_N,
        BLOCK_SIZE,
    )
    kv_offs = rows_kv[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=in_seq[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_cache_ptr + kv_offs, mask=in_seq[:, None], other=0.0)  # [BLOCK_N, D]
    s = mma(q, tl.trans(k), DOT_MODE) * scale_log2e  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        k_pos = kv_start + tl.arange(0, BLOCK_N)
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_MODE)
    return acc, m_new, l_i


# Ints that vary from step to step are not specialized (Triton otherwise compiles a new
# variant, ~1 s on an H100, the first time one of them is 1 or a multiple of 16).
@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (strided layer view)
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (same strides as k_cache)
    out_ptr,  # [T, Hq, D]
    query_start_loc_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32, KV length after this step
    block_tables_ptr,  # [B, max_blocks] int32
    scale_log2e,  # softmax scale * log2(e): the softmax runs in base 2
    num_reqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_Q: tl.constexpr,  # query tokens per tile = BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    HEAD_DIM: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    # the last tiles of a request see the most keys: start them first
    tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, tile_id, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile_start = (tile_id - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (q_in_tile < BLOCK_Q) & (q_tile_start + q_in_tile < q_len)
    tokens = (q_start + q_tile_start + q_in_tile).to(tl.int64)
    q_pos = ctx_len + q_tile_start + q_in_tile
    dims = tl.arange(0, HEAD_DIM)
    q_offs = tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    first_q_pos = ctx_len + q_tile_start
    full_end = (first_q_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, first_q_pos + BLOCK_Q)
    for kv_start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, kv_start, seq_len,
            q_pos, kv_head, scale_log2e, stride_cache_block, stride_cache_tok,
            stride_cache_head, False, BLOCK_N, BLOCK_SIZE, HEAD_DIM, DOT_MODE,
        )  # fmt: skip
    # the first masked tile holds a key every row sees (full_end <= first_q_pos), so no
    # row's max stays -inf and no NaN can appear
    for kv_start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, kv_start, seq_len,
            q_pos, kv_head, scale_log2e, stride_cache_block, stride_cache_tok,
            stride_cache_head, True, BLOCK_N, BLOCK_SIZE, HEAD_DIM, DOT_MODE,
        )  # fmt: skip

    out = acc / l_i[:, None]
    out_offs = tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill(
    q: torch.Tensor,  # [T, Hq, D], the step's query tokens, request after request
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    *,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,  # [T, Hq, D], written in full
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of every query token over its request's cached and new keys (the
    new tokens' K/V must already be in the cache). Any mix of q_len per request."""
    check_attention_inputs(q, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    if meta.block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs a contiguous last dimension")
    config = config or default_prefill_config(
        head_dim=head_dim, dtype=q.dtype, group=group, max_query_len=meta.max_query_len
    )
    if config.block_m < group:
        raise ValueError(f"block_m {config.block_m} cannot hold a GQA group of {group} heads")
    if out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    num_reqs = meta.num_reqs
    if num_tokens == 0 or num_reqs == 0:
        return out
    block_q = config.block_m // group
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        scale * LOG2E,
        num_reqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        DOT_MODE=dot_mode(q.dtype, q.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out

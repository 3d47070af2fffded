"""Paged attention through torch's scaled_dot_product_attention (SDPA): what the torch
backend runs. On CPU, SDPA is PyTorch's flash kernel, which walks K/V in tiles and never
holds a [Hq, q_len, kv_len] score matrix; on GPU it is cuDNN / flash / memory-efficient
attention. Same contract as attention_torch.py (the readable reference it is tested
against in tests/unit/test_attention_sdpa.py).

A step's requests are taken in order:

    chunk (q_len > 1)   K/V gathered from its blocks: [1, Hkv, kv_len, D]; GQA inside
                        SDPA (no copy of K/V per query head). Causal by
                        `is_causal` when the chunk is the whole sequence (q_len == kv_len),
                        else by a bottom-right mask, in tiles of CHUNK_TILE query rows:
                        query i sits at position kv_len - q_len + i and sees keys
                        0 .. kv_len - q_len + i.
    decode rows         a run of consecutive q_len == 1 requests, in groups of up to
                        DECODE_GROUP_BYTES of K/V: K/V padded to the group's longest
                        sequence [G, Hkv, max_len, D] (padding masked), each row's query
                        heads stacked as its query length: q [G, Hkv, Hq/Hkv, D].

Computes in q's dtype (the model dtype; SDPA accumulates in fp32 for bf16/fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.kernels.metadata import AttentionMetadata

# Query rows of one masked SDPA call in a chunk over cached context. A masked call
# computes every key it is given, so a tile wastes (rows^2)/2 scores past the diagonal:
# tiles keep that, and the [rows, kv_len] mask, small.
CHUNK_TILE = 256
# K+V bytes one batched decode call gathers at most: large enough that a call is not
# dominated by its overhead, small enough that the gathered K/V stays in cache.
DECODE_GROUP_BYTES = 4 << 20


def paged_attention_sdpa(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    out = torch.empty_like(q)
    q_lens, seq_lens = meta.query_lens_host, meta.seq_lens_host
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    token_bytes = 2 * num_kv_heads * head_dim * q.element_size()
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    b = 0
    while b < len(q_lens):
        if q_lens[b] != 1:
            if q_lens[b] > 0:
                rows = slice(starts[b], starts[b + 1])
                out[rows] = _chunk(q[rows], k_cache, v_cache, meta, b, scale)
            b += 1
            continue
        # [b, end): consecutive decode rows whose padded K/V fits the group budget
        end, max_len = b + 1, seq_lens[b]
        while end < len(q_lens) and q_lens[end] == 1:
            longest = max(max_len, seq_lens[end])
            if (end + 1 - b) * longest * token_bytes > DECODE_GROUP_BYTES:
                break
            end, max_len = end + 1, longest
        rows = slice(starts[b], starts[end])
        out[rows] = _decode_group(q[rows], k_cache, v_cache, meta, b, end, max_len, scale)
        b = end
    return out


def _chunk(
    q: torch.Tensor,  # [q_len, Hq, D] one request's new tokens
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    b: int,  # the request's index in the step
    scale: float,
) -> torch.Tensor:  # [q_len, Hq, D]
    q_len, kv_len = q.shape[0], meta.seq_lens_host[b]
    block_size = k_cache.shape[1]
    blocks = meta.block_tables[b, : -(-kv_len // block_size)]

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [1, Hkv, kv_len, D]
        x = cache.index_select(0, blocks).flatten(0, 1)[:kv_len]  # [kv_len, Hkv, D]
        return x.to(q.dtype).transpose(0, 1)[None]

    k, v = gather(k_cache), gather(v_cache)
    q = q.transpose(0, 1)[None]  # [1, Hq, q_len, D]
    if q_len == kv_len:  # the whole sequence: causal from position 0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)  # [1, Hq, q_len, D]
        return out[0].transpose(0, 1)
    # Over cached context, in tiles of query rows [i, end):
    #
    #   keys    0 ............ start ........................ kv_len-1
    #   q rows                 0 ....... i ..... end-1 ....... q_len-1
    #
    # row r sits at position start + r, so the tile reads keys [0, start + end), the
    # last end - i of them under a causal mask.
    out = torch.empty_like(q)
    start = kv_len - q_len
    for i in range(0, q_len, CHUNK_TILE):
        end = min(i + CHUNK_TILE, q_len)
        num_keys = start + end
        q_pos = torch.arange(start + i, num_keys, device=q.device)[:, None]
        mask = torch.arange(num_keys, device=q.device)[None, :] <= q_pos  # [end-i, num_keys]
        out[:, :, i:end] = F.scaled_dot_product_attention(
            q[:, :, i:end], k[:, :, :num_keys], v[:, :, :num_keys], attn_mask=mask,
            scale=scale, enable_gqa=True,
        )  # fmt: skip
    return out[0].transpose(0, 1)


def _decode_group(
    q: torch.Tensor,  # [G, Hq, D] one new token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    first: int,  # requests first .. end-1 of the step
    end: int,
    max_len: int,  # longest seq_len among them
    scale: float,
) -> torch.Tensor:  # [G, Hq, D]
    num_reqs, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_blocks = -(-max_len // block_size)
    seq_lens = meta.seq_lens[first:end].long()  # [G]
    # Table entries past a request's last block may be anything: read block 0 instead
    # (its keys are masked out below).
    tables = meta.block_tables[first:end, :num_blocks].long()  # [G, num_blocks]
    block_start = torch.arange(num_blocks, device=q.device) * block_size
    tables = torch.where(block_start[None, :] < seq_lens[:, None], tables, 0)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [G, Hkv, max_len, D]
        # index_select copies whole blocks: 2-3x faster here than cache[tables]
        x = cache.index_select(0, tables.flatten())  # [G * num_blocks, block_size, Hkv, D]
        x = x.view(num_reqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_len]
        return x.to(q.dtype).transpose(1, 2)

    lens = meta.seq_lens_host[first:end]
    mask = None
    if min(lens) != max_len:
        key_pos = torch.arange(max_len, device=q.device)
        mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [G, 1, 1, max_len]
    out = F.scaled_dot_product_attention(
        q.reshape(num_reqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim),
        gather(k_cache),
        gather(v_cache),
        attn_mask=mask,
        scale=scale,
    )  # [G, Hkv, Hq/Hkv, D]
    return out.reshape(num_reqs, num_q_heads, head_dim)

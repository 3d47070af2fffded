"""Reference paged attention in plain PyTorch (CPU and GPU). Every backend is tested
against this one; it favours clarity over speed (it holds the [Hq, q_len, kv_len] scores
in fp32). The torch backend runs attention_sdpa.py; write_kv_torch is its cache write."""

from __future__ import annotations

import torch

from ferry.kernels.metadata import AttentionMetadata


def write_kv_torch(
    k: torch.Tensor,  # [T, Hkv, D] keys of the new tokens
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
) -> None:
    block_size = k_cache.shape[1]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[block_ids, offsets] = k.to(k_cache.dtype)
    v_cache[block_ids, offsets] = v.to(v_cache.dtype)


def paged_attention_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    q_start = 0
    for b, (q_len, kv_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
        num_blocks = -(-kv_len // block_size)
        blocks = meta.block_tables[b, :num_blocks].long()
        # [kv_len, Hkv, D] gathered in logical order
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        k = k.repeat_interleave(group, dim=1)  # [kv_len, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[q_start : q_start + q_len].float()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale  # [Hq, q_len, kv_len]
        # query i sits at absolute position kv_len - q_len + i; it sees keys <= that.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start : q_start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        q_start += q_len
    return out

"""flash-attn backend: paged attention through flash-attn 2, where it is installed and the
cache suits it. Optional: this module imports without flash_attn, and
`unavailable_reason` says in words why it cannot serve a given config.

The constraint that matters for Ferry: upstream flash-attn 2 reads a paged cache only
when the page (block) size is a multiple of 256 ("Paged KV cache block size must be
divisible by 256" in mha_fwd_kvcache and mha_varlen_fwd). Ferry's default block is 16
tokens, so with the default config this backend declines and `auto` picks triton.
Per-layer strided views are fine: flash-attn takes the block stride from stride(0) and
needs only the head_dim to be contiguous.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ferry.kernels.metadata import AttentionMetadata

MIN_VERSION = (2, 6)  # flash_attn_varlen_func takes block_table from 2.6 on
PAGE_MULTIPLE = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def _import_problem() -> str | None:
    try:
        import flash_attn
    except ImportError as exc:  # also covers a flash_attn built for another torch
        return f"flash_attn is not importable ({exc})"
    version = getattr(flash_attn, "__version__", "0")
    if _version(version) < MIN_VERSION:
        return f"flash_attn {version} is older than 2.6, the first with paged KV in varlen"
    return None


def unavailable_reason(
    *,
    device: torch.device | str | None = None,
    block_size: int | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> str | None:
    """None when flash-attn can serve this config, else why not. Unknown fields (None)
    are not checked."""
    problem = _import_problem()
    if problem is not None:
        return problem
    if device is not None and torch.device(device).type != "cuda":
        return f"flash_attn runs on CUDA devices only, not {device}"
    if device is None and not torch.cuda.is_available():
        return "flash_attn needs a CUDA device and none is visible"
    if block_size is not None and block_size % PAGE_MULTIPLE:
        return (
            f"flash_attn's paged KV needs a block size that is a multiple of {PAGE_MULTIPLE} "
            f"tokens; this cache uses {block_size}. Use the triton backend, or a cache "
            f"allocated with block_size {PAGE_MULTIPLE}"
        )
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"flash_attn needs head_dim a multiple of 8 and at most 256, got {head_dim}"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"flash_attn takes fp16 or bf16, not {dtype}"
    return None


def write_kv_flash(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """flash-attn has no standalone cache write: the Triton one where Triton imports,
    else the torch reference (an index_put)."""
    try:
        from ferry.kernels.cache_ops_triton import write_kv_triton
    except ImportError:
        from ferry.kernels.attention_torch import write_kv_torch

        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_flash(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    reason = unavailable_reason(
        device=q.device, block_size=k_cache.shape[1], head_dim=q.shape[2], dtype=q.dtype
    )
    if reason is not None:
        raise RuntimeError(f"flash backend cannot run this step: {reason}")
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    if meta.is_decode_only and q.shape[0] == meta.num_reqs:
        out = flash_attn_with_kvcache(
            q.unsqueeze(1),  # [B, 1, Hq, D]
            k_cache,
            v_cache,
            cache_seqlens=meta.seq_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
        )
        return out.squeeze(1)
    # [B+1] int32 cumulative KV lengths, on the device (no sync)
    cu_seqlens_k = F.pad(torch.cumsum(meta.seq_lens, dim=0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q=meta.query_start_loc,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_seq_len,
        softmax_scale=scale,
        causal=True,  # bottom-right aligned: query i of a chunk sees keys <= ctx_len + i
        block_table=meta.block_tables,
    )

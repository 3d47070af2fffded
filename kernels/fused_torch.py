"""The model's element-wise steps in plain torch: the reference the Triton kernels in
fused_triton.py are checked against, and what runs on CPU.

Numerics follow transformers op for op, rounding to the model dtype wherever it does:

    add_rms_norm   residual = x + residual                       (model dtype)
                   out = weight * (fp32(residual) * rsqrt(mean(residual^2) + eps)).to(dtype)
    rope_write_kv  q|k = x1*cos - x2*sin | x2*cos + x1*sin        (cos/sin cast to dtype;
                   each product and sum rounded to dtype), then k and v into the cache
    silu_mul       silu(gate) * up                               (each rounded to dtype)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [T, hidden]
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden] a sublayer's output
    residual: torch.Tensor,  # [T, hidden] the stream before it
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, hidden], new residual [T, hidden])
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotate(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, 1, D/2] model dtype
    sin: torch.Tensor,  # [T, 1, D/2]
) -> torch.Tensor:  # [T, H, D]
    # Hugging Face's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), same roundings.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D]: q heads, then k heads, then v heads
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_len, D] fp32: cos of the D/2 frequencies, then their sin
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (strided layer view)
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset; < 0 skips
    *,
    num_heads: int,
    num_kv_heads: int,
    write_kv: Callable[..., None],  # (k, v, k_cache, v_cache, slot_mapping)
) -> torch.Tensor:  # q [T, Hq, D], rotated
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, head_dim).contiguous()
    cos, sin = cos_sin[positions].to(qkv.dtype)[:, None, :].chunk(2, dim=-1)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_mul(
    gate_up: torch.Tensor,  # [T, 2 * I]: gate, then up
) -> torch.Tensor:  # [T, I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

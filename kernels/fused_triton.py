"""The model's element-wise steps as Triton kernels: one launch each where torch takes
several (RMSNorm alone is ~8 kernels in eager torch; rotary ~14). Inside a decode CUDA
graph every launch costs a few microseconds however little it does, so at small batch
these launches, not the bytes, set the step time.

Same numerics as fused_torch.py (the reference): products and sums are taken in fp32
and rounded to the model dtype exactly where transformers rounds, so results match the
reference to the last bit but for the order of the RMSNorm sum and exp/rsqrt ulps.

    add_rms_norm   one program per row;           residual updated in place
    rope_write_kv  one program per token;         q rotated into a new [T, Hq, D] tensor,
                                                  k rotated and v copied into their slots
    silu_mul       one program per (row, column tile)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x (fp32) rounded to the model dtype (to nearest, ties to even), back in fp32: where
    torch rounds a result. bf16 is rounded on the bits: a `.to(bf16).to(fp32)` pair lets
    the compiler keep the fp32 value (measured: a quarter of rotary outputs off by an ulp)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, hidden]
    residual_ptr,  # [T, hidden], read and overwritten with x + residual (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [T, hidden]
    hidden,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = _round(x + residual.to(tl.float32), dtype)
        tl.store(residual_ptr + row * stride_residual + cols, x.to(dtype), mask=mask)
    variance = tl.sum(x * x, axis=0) / hidden
    normed = _round(x * tl.rsqrt(variance + eps), dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, _round(weight * normed, dtype).to(dtype), mask=mask)


def _launch_rms_norm(x, residual, weight, eps) -> torch.Tensor:
    num_tokens, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        hidden,
        eps,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [T, hidden]
    return _launch_rms_norm(x, None, weight, eps)


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden] a sublayer's output
    residual: torch.Tensor,  # [T, hidden] contiguous; becomes x + residual (in place)
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, hidden], residual)
    if residual.shape != x.shape or residual.stride(-1) != 1:
        raise ValueError(
            f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}, rows contiguous"
        )
    return _launch_rms_norm(x, residual, weight, eps), residual


@triton.jit
def _rotate_heads(
    src_ptr,  # this token's first head of the group, [H, D] with head stride HEAD_DIM
    dst_ptr,  # [H, D] with head stride dst_stride_head
    dst_stride_head,
    num_heads,
    cos,  # [HALF] fp32, already rounded to the model dtype
    sin,  # [HALF]
    dst_mask,  # [] bool: store at all
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    dtype = dst_ptr.dtype.element_ty
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = (heads < num_heads) & dst_mask
    src = src_ptr + heads * (2 * HALF) + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    out1 = _round(_round(x1 * c, dtype) - _round(x2 * s, dtype), dtype)
    out2 = _round(_round(x2 * c, dtype) + _round(x1 * s, dtype), dtype)
    dst = dst_ptr + heads * dst_stride_head + dims
    tl.store(dst, out1.to(dtype), mask=mask)
    tl.store(dst + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr,  # [T, (Hq + 2 * Hkv) * D]
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [max_len, D] fp32
    q_out_ptr,  # [T, Hq, D] contiguous
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] (strided layer view)
    v_cache_ptr,  # same strides as k_cache
    slot_mapping_ptr,  # [T] int64; < 0: not written
    num_heads,
    num_kv_heads,
    stride_qkv,
    stride_cos_sin,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HQ_PAD: tl.constexpr,  # next power of two >= num_heads
    HKV_PAD: tl.constexpr,  # next power of two >= num_kv_heads
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    dtype = q_out_ptr.dtype.element_ty
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, half)
    cos = _round(tl.load(cos_sin_ptr + position * stride_cos_sin + dims), dtype)
    sin = _round(tl.load(cos_sin_ptr + position * stride_cos_sin + half + dims), dtype)
    row = qkv_ptr + token * stride_qkv
    _rotate_heads(row, q_out_ptr + token * num_heads * HEAD_DIM, HEAD_DIM, num_heads,
                  cos, sin, True, HQ_PAD, half)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # int32 slots would overflow
    block_id = slot // BLOCK_SIZE
    dst = block_id * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_tok
    k_src = row + num_heads * HEAD_DIM
    _rotate_heads(k_src, k_cache_ptr + dst, stride_cache_head, num_kv_heads,
                  cos, sin, slot >= 0, HKV_PAD, half)
    heads = tl.arange(0, HKV_PAD)[:, None]
    all_dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = (heads < num_kv_heads) & (slot >= 0)
    v = tl.load(k_src + num_kv_heads * HEAD_DIM + heads * HEAD_DIM + all_dims, mask=mask)
    tl.store(v_cache_ptr + dst + heads * stride_cache_head + all_dims, v, mask=mask)


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
    write_kv: object = None,  # unused: the write is fused (kept for the reference's signature)
) -> torch.Tensor:  # q [T, Hq, D], rotated
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"qkv width {qkv.shape[1]} != ({num_heads} + 2 * {num_kv_heads}) * {head_dim}"
        )
    if head_dim & (head_dim - 1) or cos_sin.shape[1] != head_dim:
        raise ValueError(f"need a power-of-two head_dim matching cos_sin, got {head_dim}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides, head_dim contiguous")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    _rope_write_kv_kernel[(num_tokens,)](
        qkv,
        positions,
        cos_sin,
        q,
        k_cache,
        v_cache,
        slot_mapping,
        num_heads,
        num_kv_heads,
        qkv.stride(0),
        cos_sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HQ_PAD=triton.next_power_of_2(num_heads),
        HKV_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=4,
    )
    return q


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    intermediate,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + cols, mask=mask, other=0.0)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    out = _round(silu * up.to(tl.float32), dtype)
    tl.store(out_ptr + row * stride_out + cols, out.to(dtype), mask=mask)


def silu_mul(
    gate_up: torch.Tensor,  # [T, 2 * I]: gate, then up
) -> torch.Tensor:  # [T, I]
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up width {width} is odd")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    intermediate = width // 2
    out = torch.empty(num_tokens, intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate))
    _silu_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, intermediate, gate_up.stride(0), out.stride(0), BLOCK=block,
        num_warps=4,
    )
    return out

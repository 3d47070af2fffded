"""Attention backends over the block-major paged KV cache (see kv_layout.py).

Every backend offers the same two calls:
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    paged_attention(q, k_cache, v_cache, meta, scale) -> out

    backend = get_backend("auto", device="cuda", block_size=16, head_dim=128)

Names: "torch" (plain torch's scaled_dot_product_attention, CPU and GPU:
attention_sdpa.py; attention_torch.py holds the readable reference every backend is
tested against), "triton" (paged prefill + split-K decode, the default on GPU), "flash"
(flash-attn, only where importable and the block size is a multiple of 256), "auto"
(triton on CUDA when Triton imports and takes the config, else torch). Triton and flash-attn are imported only when their backend is asked for, so
this module imports on a machine with neither.

The model's element-wise steps (RMSNorm with the residual add, rotary with the cache
write, SiLU-and-multiply) come in two sets with the same calls: `fused_ops("torch")`
(the reference, CPU) and `fused_ops("triton")` (one kernel each, GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ferry.kernels.attention_sdpa import paged_attention_sdpa
from ferry.kernels.attention_torch import write_kv_torch

BACKEND_NAMES = ("torch", "triton", "flash", "auto")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionBackend:
    name: str  # "torch" | "triton" | "flash" (never "auto": that resolves to one of them)
    write_kv: Callable[..., None]  # (k, v, k_cache, v_cache, slot_mapping)
    paged_attention: Callable[..., torch.Tensor]  # (q, k_cache, v_cache, meta, scale) -> out


class BackendUnavailableError(RuntimeError):
    """The named backend exists but cannot run here; the message says why."""


def triton_unavailable_reason(
    *,
    device: torch.device | str | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> str | None:
    """None when the triton backend can serve this config, else why not. Unknown fields
    (None) are not checked."""
    from importlib.util import find_spec

    if find_spec("triton") is None:
        return "triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    cuda = torch.device(device).type == "cuda" if device is not None else None
    if cuda is False or (cuda is None and not torch.cuda.is_available()):
        where = device if device is not None else "this machine"
        return f"triton kernels need a CUDA device, not {where}"
    if head_dim is not None and (head_dim & (head_dim - 1) or not 16 <= head_dim <= 256):
        return f"triton kernels need a power-of-two head_dim in [16, 256], got {head_dim}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton kernels take fp16, bf16 or fp32, not {dtype}"
    return None


def _torch_backend() -> AttentionBackend:
    return AttentionBackend(
        name="torch", write_kv=write_kv_torch, paged_attention=paged_attention_sdpa
    )


def _triton_backend() -> AttentionBackend:
    from ferry.kernels.attention_triton import paged_attention_triton, write_kv_triton

    return AttentionBackend(
        name="triton", write_kv=write_kv_triton, paged_attention=paged_attention_triton
    )


def _flash_backend() -> AttentionBackend:
    from ferry.kernels.attention_flash import paged_attention_flash, write_kv_flash

    return AttentionBackend(
        name="flash", write_kv=write_kv_flash, paged_attention=paged_attention_flash
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FusedOps:
    name: str  # "torch" | "triton"
    rms_norm: Callable[..., torch.Tensor]  # (x, weight, eps) -> normed
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x, residual, weight,
    #                                                 eps) -> (normed, x + residual)
    rope_write_kv: Callable[..., torch.Tensor]  # (qkv, positions, cos_sin, k_cache, v_cache,
    #                  slot_mapping, *, num_heads, num_kv_heads, write_kv) -> rotated q
    silu_mul: Callable[..., torch.Tensor]  # (gate_up) -> silu(gate) * up


def fused_ops(name: str) -> FusedOps:
    """The element-wise step set called `name` ("torch" or "triton"; see the module doc)."""
    if name == "torch":
        from ferry.kernels import fused_torch as module
    elif name == "triton":
        from ferry.kernels import fused_triton as module
    else:
        raise ValueError(f"unknown fused ops {name!r}; choose torch or triton")
    return FusedOps(
        name=name,
        rms_norm=module.rms_norm,
        add_rms_norm=module.add_rms_norm,
        rope_write_kv=module.rope_write_kv,
        silu_mul=module.silu_mul,
    )


def get_backend(
    name: str,
    *,
    device: torch.device | str | None = None,
    block_size: int | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """The backend called `name`. The keyword fields describe the cache it will serve;
    each one given is checked now, so a mismatch fails at startup with the reason
    (BackendUnavailableError) instead of at the first step. ValueError for unknown names."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKEND_NAMES}")
    if name == "torch":
        return _torch_backend()
    triton_reason = triton_unavailable_reason(device=device, head_dim=head_dim, dtype=dtype)
    if name == "auto":
        return _torch_backend() if triton_reason is not None else _triton_backend()
    if name == "triton":
        if triton_reason is not None:
            raise BackendUnavailableError(f"triton backend unavailable: {triton_reason}")
        return _triton_backend()
    from ferry.kernels.attention_flash import unavailable_reason

    flash_reason = unavailable_reason(
        device=device, block_size=block_size, head_dim=head_dim, dtype=dtype
    )
    if flash_reason is not None:
        raise BackendUnavailableError(f"flash backend unavailable: {flash_reason}")
    return _flash_backend()


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "BackendUnavailableError",
    "FusedOps",
    "fused_ops",
    "get_backend",
    "triton_unavailable_reason",
]

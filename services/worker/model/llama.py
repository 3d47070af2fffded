"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over Ferry's paged KV cache.

Inputs are flattened: a step's T tokens from every request sit in one [T] vector (see
kernels/metadata.py), so there is no batch dimension and no padding. q/k/v are one
matmul (`qkv_proj`), gate/up another (`gate_up_proj`); the loader concatenates the
Hugging Face weights into them. Between the matmuls and attention, the element-wise
steps (residual add + RMSNorm, rotary + cache write, SiLU * up) are FusedOps calls: the
torch reference on CPU, one Triton kernel each on GPU (kernels/fused_*.py). Numerics
follow transformers op for op (RMSNorm in fp32 then cast; RoPE in the model dtype with
cos/sin cast to it), so fp32 logits match Hugging Face's to rounding and bf16 ones agree
as closely as two kernels can.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferry.kernels.attention_sdpa import paged_attention_sdpa
from ferry.kernels.attention_torch import write_kv_torch
from ferry.kernels.backend import FusedOps, fused_ops
from ferry.kernels.kv_layout import layer_view
from ferry.kernels.metadata import AttentionMetadata
from ferry.services.worker.model.config import ModelConfig, RopeScaling

# write_kv(k [T, Hkv, D], v [T, Hkv, D], k_cache, v_cache, slot_mapping [T]) -> None
WriteKV = Callable[..., None]
# paged_attention(q [T, Hq, D], k_cache, v_cache, meta, scale) -> [T, Hq, D]
PagedAttention = Callable[..., torch.Tensor]


@dataclass(frozen=True, slots=True)
class ModelKernels:
    """What the layers compute with: the attention backend's two calls and the
    element-wise step set (kernels.FusedOps)."""

    write_kv: WriteKV
    paged_attention: PagedAttention
    ops: FusedOps


class RMSNorm(nn.Module):
    """RMSNorm's weight and epsilon; the model applies it through its FusedOps (fused with
    the residual add where there is one)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with Llama 3.1 scaling when given:
    short wavelengths kept, long ones divided by `factor`, a smooth blend between."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_len, computed once in fp32."""

    def __init__(self, config: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        # [max_len, head_dim] fp32: cos of the D/2 frequencies, then their sin
        self.register_buffer("cos_sin", self._cos_sin(), persistent=False)

    def _cos_sin(self, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
        positions = torch.arange(self.max_len, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq[None, :]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def reset_cache(self) -> None:
        """Recompute cos/sin in place (after `to_empty` left the buffer uninitialised)."""
        self.cos_sin = self._cos_sin(self.cos_sin.device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim**-0.5
        # rows: [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
        kernels: ModelKernels,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = x.shape[0]
        k_cache, v_cache = layer_view(kv_cache, self.layer)
        q = kernels.ops.rope_write_kv(  # [T, Hq, D]; k and v land in their cache slots
            self.qkv_proj(x),
            positions,
            rotary.cos_sin,
            k_cache,
            v_cache,
            meta.slot_mapping,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            write_kv=kernels.write_kv,
        )
        out = kernels.paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        # rows: [gate (I) | up (I)]
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor, ops: FusedOps) -> torch.Tensor:  # x: [T, hidden]
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden] the previous layer's MLP output (or the embeddings)
        residual: torch.Tensor | None,  # [T, hidden] the stream before x; None: layer 0
        positions: torch.Tensor,  # [T] int64
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
        kernels: ModelKernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (MLP output, residual), each [T, hidden]
        # transformers' `x = residual + sublayer(norm(x))`, with each add fused into the
        # norm after it: the stream is x + residual, carried as two tensors.
        ops, norm = kernels.ops, self.input_layernorm
        if residual is None:
            h, residual = ops.rms_norm(x, norm.weight, norm.eps), x
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, positions, rotary, kv_cache, meta, kernels)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    """Parameter names mirror Hugging Face's without the `model.` prefix, except the
    fused `self_attn.qkv_proj` and `mlp.gate_up_proj` (see loader.py)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention: tuple[WriteKV, PagedAttention] | None = None,
        ops: FusedOps | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """attention: a backend's (write_kv, paged_attention); None: the torch backend's.
        ops: the element-wise step set; None: the torch reference.
        max_model_len: longest sequence to precompute RoPE for (config.max_model_len)."""
        super().__init__()
        self.config = config
        write_kv, paged_attention = attention or (write_kv_torch, paged_attention_sdpa)
        self.kernels = ModelKernels(write_kv, paged_attention, ops or fused_ops("torch"))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config, max_model_len or config.max_model_len)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, kv_cache, meta, self.kernels)
        if residual is None:  # no layers
            return self.kernels.ops.rms_norm(x, self.norm.weight, self.norm.eps)
        return self.kernels.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> logits [n, vocab] float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()


def build_empty_model(
    config: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    attention: tuple[WriteKV, PagedAttention] | None = None,
    ops: FusedOps | None = None,
    max_model_len: int | None = None,
) -> LlamaModel:
    """A model with uninitialised weights allocated once, straight on device in dtype
    (no init kernels, no fp32 detour); the caller fills every parameter next."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaModel(
                config, attention=attention, ops=ops, max_model_len=max_model_len
            )
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.rotary.reset_cache()
    return model.eval().requires_grad_(False)

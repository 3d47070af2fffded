"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over Ferry's paged KV cache.

Inputs are flattened: a step's T tokens from every request sit in one [T] vector (see
kernels/metadata.py), so there is no batch dimension and no padding. q/k/v are one
matmul (`qkv_proj`), gate/up another (`gate_up_proj`); the loader concatenates the
Hugging Face weights into them. Numerics follow transformers op for op (RMSNorm in fp32
then cast; RoPE applied in the model dtype with cos/sin cast to it), so fp32 logits
match Hugging Face's to rounding and bf16 ones agree as closely as two kernels can.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention_torch import paged_attention_torch, write_kv_torch
from kernels.kv_layout import layer_view
from kernels.metadata import AttentionMetadata
from services.worker.model.config import ModelConfig, RopeScaling

# write_kv(k [T, Hkv, D], v [T, Hkv, D], k_cache, v_cache, slot_mapping [T]) -> None
WriteKV = Callable[..., None]
# paged_attention(q [T, Hq, D], k_cache, v_cache, meta, scale) -> [T, Hq, D]
PagedAttention = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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

    def forward(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin[positions].to(q.dtype)[:, None, :].chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, 1, D/2]
    sin: torch.Tensor,  # [T, 1, D/2]
) -> torch.Tensor:  # [T, H, D]
    # Hugging Face's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), same roundings.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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
        write_kv: WriteKV,
        paged_attention: PagedAttention,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim).contiguous()
        q, k = rotary(positions, q, k)
        k_cache, v_cache = layer_view(kv_cache, self.layer)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, Hkv, D]
        meta: AttentionMetadata,
        write_kv: WriteKV,
        paged_attention: PagedAttention,
    ) -> torch.Tensor:  # [T, hidden]
        h = self.self_attn(
            self.input_layernorm(x), positions, rotary, kv_cache, meta, write_kv, paged_attention
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Parameter names mirror Hugging Face's without the `model.` prefix, except the
    fused `self_attn.qkv_proj` and `mlp.gate_up_proj` (see loader.py)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention: tuple[WriteKV, PagedAttention] | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """attention: a backend's (write_kv, paged_attention); None: the torch reference.
        max_model_len: longest sequence to precompute RoPE for (config.max_model_len)."""
        super().__init__()
        self.config = config
        self.write_kv, self.paged_attention = attention or (write_kv_torch, paged_attention_torch)
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
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(
                x, positions, self.rotary, kv_cache, meta, self.write_kv, self.paged_attention
            )
        return self.norm(x)

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
    max_model_len: int | None = None,
) -> LlamaModel:
    """A model with uninitialised weights allocated once, straight on device in dtype
    (no init kernels, no fp32 detour); the caller fills every parameter next."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaModel(config, attention=attention, max_model_len=max_model_len)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.rotary.reset_cache()
    return model.eval().requires_grad_(False)

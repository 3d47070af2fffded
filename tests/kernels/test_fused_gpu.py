"""kernels/fused_triton.py on a CUDA GPU against kernels/fused_torch.py, same inputs.

The Triton kernels round to the model dtype exactly where the torch reference does, so
rotary and the cache write must match bit for bit and the residual add too; RMSNorm may
differ in the last bit (its sum runs in another order) and SiLU by exp's ulp.
Shapes: llama3-8b's (Hq 32, Hkv 8, D 128, hidden 4096, I 14336) and a Qwen2-like odd
one (Hq 14, Hkv 2, D 64, hidden 896); decode-sized and prefill-sized token counts.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ferry.kernels import fused_torch
from ferry.kernels.attention_torch import write_kv_torch
from ferry.kernels.kv_layout import allocate_kv_cache, layer_view
from ferry.kernels.testing import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

SHAPES = {"llama3-8b": (32, 8, 128, 4096, 14336), "qwen2-0.5b": (14, 2, 64, 896, 4864)}
TOKENS = (1, 37, 2048)


def _fused_triton():
    from ferry.kernels import fused_triton

    return fused_triton


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rope_write_kv_bit_exact(shape: str, num_tokens: int) -> None:
    num_heads, num_kv_heads, head_dim, _, _ = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    block_size, num_blocks = 16, num_tokens // 16 + 8
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda",
                      generator=gen).bfloat16()  # fmt: skip
    angles = torch.rand(8192, head_dim // 2, device="cuda", generator=gen) * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda", generator=gen)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:num_tokens]
    slots[0] = -1  # padding: skipped
    cache = allocate_kv_cache(num_blocks=num_blocks, num_layers=3, block_size=block_size,
                              num_kv_heads=num_kv_heads, head_dim=head_dim,
                              dtype=torch.bfloat16, device="cuda")  # fmt: skip
    cache.normal_(generator=gen)
    expected_cache = cache.clone()
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, write_kv=write_kv_torch)
    keep = slots >= 0
    expected_q = fused_torch.rope_write_kv(
        qkv[keep], positions[keep], cos_sin, *layer_view(expected_cache, 1), slots[keep], **kwargs
    )
    q = _fused_triton().rope_write_kv(
        qkv, positions, cos_sin, *layer_view(cache, 1), slots, **kwargs
    )
    assert torch.equal(q[keep], expected_q)
    assert torch.equal(cache, expected_cache)


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_add_rms_norm(shape: str, num_tokens: int) -> None:
    hidden = SHAPES[shape][3]
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    residual = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).bfloat16()
    expected, expected_residual = fused_torch.add_rms_norm(x, residual, weight, 1e-5)
    out, new_residual = _fused_triton().add_rms_norm(x, residual, weight, 1e-5)
    assert new_residual.data_ptr() == residual.data_ptr()  # updated in place
    assert torch.equal(new_residual, expected_residual)
    assert rel_err(out, expected) <= 2e-3
    assert (out != expected).float().mean() <= 0.01  # at most a last-bit difference here and there
    alone = _fused_triton().rms_norm(x, weight, 1e-5)
    assert rel_err(alone, fused_torch.rms_norm(x, weight, 1e-5)) <= 2e-3


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_silu_mul(shape: str, num_tokens: int) -> None:
    intermediate = SHAPES[shape][4]
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    gate_up = torch.randn(num_tokens, 2 * intermediate, device="cuda", generator=gen).bfloat16()
    out = _fused_triton().silu_mul(gate_up)
    expected = fused_torch.silu_mul(gate_up)
    assert rel_err(out, expected) <= 2e-3
    assert (out != expected).float().mean() <= 0.01

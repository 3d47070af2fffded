"""The Triton kernels against the torch reference, on CPU, under Triton's interpreter.

Why a child process: TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e.
when kernels/*_triton.py is first imported, and other tests in this pytest process
import those modules for the GPU. So the cases below run in one child process (this
file run as a script, with TRITON_INTERPRET=1), which prints one JSON result per case;
each pytest case checks its own result.

Shapes are tiny but hit every index path: GQA 1/3/4/8 (3 pads the group), scrambled
block tables on a strided multi-layer cache, lengths off the block size, tiles smaller
and larger than a cache block, split-K with empty splits, chunked prefill over cached
context, mixed decode + prefill batches, a request with no new tokens, a padding row
(seq_len 0), and the cache write with a skipped (-1) slot. Outputs are poisoned with NaN
before each run, so an unwritten element fails the case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# bound on ||out - ref|| / ||ref||: fp32 runs the same fp32 math as the reference;
# fp16/bf16 round P and the output (bf16: 8 bits of mantissa).
REL_ERR_BOUND = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}

HEADS = {"gqa1": (4, 4), "gqa3": (6, 2), "gqa4": (8, 2), "gqa8": (8, 1)}

# name -> case; kind picks the entry point, the rest are its parameters
CASES: dict[str, dict] = {
    "write_kv": dict(
        kind="write_kv", heads="gqa4", head_dim=32, dtype="bfloat16",
        query_lens=[5, 3], seq_lens=[21, 3],
    ),
    "decode_gqa1_one_split": dict(
        kind="decode", heads="gqa1", head_dim=32, dtype="float32",
        seq_lens=[1, 17, 50], block_n=16, num_splits=1,
    ),
    "decode_gqa4_empty_splits": dict(
        kind="decode", heads="gqa4", head_dim=64, dtype="float32",
        seq_lens=[5, 40, 77, 130], block_n=16, num_splits=6,
    ),
    "decode_gqa8_default_bf16": dict(
        kind="decode", heads="gqa8", head_dim=128, dtype="bfloat16", seq_lens=[33, 100, 7],
    ),
    "decode_gqa3_tile_below_block": dict(
        kind="decode", heads="gqa3", head_dim=32, dtype="float16",
        seq_lens=[70, 3], block_size=32, block_n=16, num_splits=3,
    ),
    "decode_tile_above_block": dict(
        kind="decode", heads="gqa4", head_dim=32, dtype="float32",
        seq_lens=[150, 64], block_size=16, block_n=64, num_splits=2,
    ),
    "decode_padding_row": dict(kind="decode_padding", heads="gqa4", head_dim=32, dtype="float32"),
    "prefill_full_prompt": dict(
        kind="prefill", heads="gqa4", head_dim=32, dtype="float32",
        query_lens=[37], seq_lens=[37],
    ),
    "prefill_chunk_over_cache": dict(
        kind="prefill", heads="gqa4", head_dim=32, dtype="float32",
        query_lens=[20, 9], seq_lens=[50, 49], block_m=16, block_n=16,
    ),
    "prefill_many_tiles": dict(
        kind="prefill", heads="gqa4", head_dim=32, dtype="float32",
        query_lens=[70, 3, 33], seq_lens=[100, 3, 60], block_m=32, block_n=32,
    ),
    "prefill_gqa3_padded_rows": dict(
        kind="prefill", heads="gqa3", head_dim=32, dtype="float32",
        query_lens=[11, 4], seq_lens=[30, 4], block_m=16, block_n=16,
    ),
    "prefill_mixed_bf16": dict(
        kind="prefill", heads="gqa8", head_dim=64, dtype="bfloat16",
        query_lens=[1, 13, 1, 0, 30], seq_lens=[40, 13, 70, 20, 45],
    ),
    "prefill_block32_fp16": dict(
        kind="prefill", heads="gqa1", head_dim=64, dtype="float16",
        query_lens=[17, 5], seq_lens=[81, 5], block_size=32, block_m=32, block_n=64,
    ),
    "fused_rms_norm": dict(kind="rms_norm", heads="gqa4", head_dim=32, dtype="bfloat16"),
    "fused_add_rms_norm": dict(kind="add_rms_norm", heads="gqa4", head_dim=32, dtype="bfloat16"),
    "fused_rope_write_kv_gqa3": dict(
        kind="rope_write_kv", heads="gqa3", head_dim=32, dtype="bfloat16",
        query_lens=[5, 3], seq_lens=[21, 3],
    ),
    "fused_rope_write_kv_fp32": dict(
        kind="rope_write_kv", heads="gqa8", head_dim=64, dtype="float32",
        query_lens=[4], seq_lens=[37],
    ),
    "fused_silu_mul": dict(kind="silu_mul", heads="gqa4", head_dim=32, dtype="bfloat16"),
    "dispatch_decode_strided_q": dict(
        kind="dispatch", heads="gqa4", head_dim=64, dtype="bfloat16",
        query_lens=[1, 1, 1], seq_lens=[9, 64, 200],
    ),
    "dispatch_mixed_strided_q": dict(
        kind="dispatch", heads="gqa4", head_dim=64, dtype="bfloat16",
        query_lens=[1, 24, 1], seq_lens=[9, 40, 200],
    ),
}  # fmt: skip


# ---------------------------------------------------------------- child process side


def _patch_interpreter_for_numpy_2_4() -> None:
    """numpy >= 2.4 refuses int() of a size-1 array, which Triton 3.6's interpreter does
    for loop bounds that come from loads (triton-lang/triton#9171, fixed upstream)."""
    import numpy as np
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    interpreter._patch_lang_tensor = patched


def _run_fused_case(name: str, spec: dict) -> dict:
    """One kernels/fused_triton.py op against fused_torch.py on the same inputs."""
    import torch

    from ferry.kernels import fused_torch, fused_triton
    from ferry.kernels.attention_torch import write_kv_torch
    from ferry.kernels.kv_layout import layer_view
    from ferry.kernels.testing import make_case, rel_err

    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    dtype = getattr(torch, spec["dtype"])
    kind = spec["kind"]
    result: dict = {"bound": REL_ERR_BOUND[spec["dtype"]], "unwritten": 0}
    if kind in ("rms_norm", "add_rms_norm"):
        x = torch.randn(5, 96, generator=gen).to(dtype)  # 96: not a power of two
        weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
        if kind == "rms_norm":
            out, expected = fused_triton.rms_norm(x, weight, 1e-5), fused_torch.rms_norm(
                x, weight, 1e-5
            )
            result.update(rel_err=rel_err(out, expected))
            return result
        residual = torch.randn(5, 96, generator=gen).to(dtype)
        expected, expected_res = fused_torch.add_rms_norm(x, residual, weight, 1e-5)
        out, res = fused_triton.add_rms_norm(x, residual.clone(), weight, 1e-5)
        result.update(rel_err=max(rel_err(out, expected), rel_err(res, expected_res)))
        return result
    if kind == "silu_mul":
        gate_up = torch.randn(3, 2 * 1500, generator=gen).to(dtype)  # two column tiles
        out, expected = fused_triton.silu_mul(gate_up), fused_torch.silu_mul(gate_up)
        result.update(rel_err=rel_err(out, expected))
        return result
    # rope_write_kv: q rotated, k rotated and v copied into a strided cache, one slot skipped
    num_q_heads, num_kv_heads = HEADS[spec["heads"]]
    head_dim = spec["head_dim"]
    case = make_case(
        query_lens=spec["query_lens"], seq_lens=spec["seq_lens"], num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16, dtype=dtype, generator=gen,
    )  # fmt: skip
    num_tokens = case.k_new.shape[0]
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype)
    angles = torch.rand(64, head_dim // 2, generator=gen) * 50
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 64, (num_tokens,), generator=gen)
    slots = case.meta.slot_mapping.clone()
    slots[1] = -1
    expected_cache = case.kv_cache.clone()
    kwargs = dict(num_heads=num_q_heads, num_kv_heads=num_kv_heads, write_kv=write_kv_torch)
    keep = slots >= 0
    expected_q = fused_torch.rope_write_kv(
        qkv[keep], positions[keep], cos_sin, *layer_view(expected_cache, 1), slots[keep], **kwargs
    )
    q = fused_triton.rope_write_kv(
        qkv, positions, cos_sin, case.k_cache, case.v_cache, slots, **kwargs
    )
    exact = torch.equal(expected_cache, case.kv_cache) and torch.equal(q[keep], expected_q)
    result.update(rel_err=0.0 if exact else float("inf"))
    return result


def _run_case(name: str, spec: dict) -> dict:
    import torch

    from ferry.kernels.attention_torch import paged_attention_torch, write_kv_torch
    from ferry.kernels.attention_triton import paged_attention_triton, write_kv_triton
    from ferry.kernels.decode_triton import paged_decode
    from ferry.kernels.kv_layout import layer_view
    from ferry.kernels.prefill_triton import paged_prefill
    from ferry.kernels.testing import make_case, make_metadata, reference_fp32, rel_err
    from ferry.kernels.triton_configs import DecodeConfig, PrefillConfig

    if spec["kind"] in ("rms_norm", "add_rms_norm", "rope_write_kv", "silu_mul"):
        return _run_fused_case(name, spec)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    dtype = getattr(torch, spec["dtype"])
    num_q_heads, num_kv_heads = HEADS[spec["heads"]]
    kind = spec["kind"]
    query_lens = spec.get("query_lens") or [1] * len(spec.get("seq_lens", [3]))
    seq_lens = spec.get("seq_lens", [3])
    case = make_case(
        query_lens=[1, 1] if kind == "decode_padding" else query_lens,
        seq_lens=[20, 1] if kind == "decode_padding" else seq_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=spec["head_dim"],
        block_size=spec.get("block_size", 16),
        dtype=dtype,
        generator=gen,
    )
    result: dict = {"bound": REL_ERR_BOUND[spec["dtype"]]}

    if kind == "write_kv":
        # k and v as strided views of a fused [T, Hq + 2 Hkv, D] projection, one slot skipped
        num_tokens = case.k_new.shape[0]
        qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, spec["head_dim"]).to(dtype)
        k = qkv[:, num_q_heads : num_q_heads + num_kv_heads]
        v = qkv[:, num_q_heads + num_kv_heads :]
        slots = case.meta.slot_mapping.clone()
        slots[1] = -1
        expected = case.kv_cache.clone()
        write_kv_torch(k[slots >= 0], v[slots >= 0], *layer_view(expected, 1), slots[slots >= 0])
        write_kv_triton(k, v, case.k_cache, case.v_cache, slots)
        result.update(rel_err=0.0 if torch.equal(expected, case.kv_cache) else float("inf"))
        result.update(unwritten=0)
        return result

    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    q = case.q
    if kind == "dispatch":  # q as a strided view of a fused projection
        fused = torch.randn(q.shape[0], q.shape[1] + 4, q.shape[2]).to(dtype)
        fused[:, : q.shape[1]] = q
        q = fused[:, : q.shape[1]]
    out = torch.full_like(case.q, float("nan"))

    if kind in ("decode", "decode_padding"):
        config = None
        if "block_n" in spec:
            config = DecodeConfig(block_n=spec["block_n"], num_splits=spec["num_splits"])
        seq_lens_dev = case.meta.seq_lens
        if kind == "decode_padding":  # request 1 is batch padding: seq_len 0
            seq_lens_dev = torch.tensor([20, 0], dtype=torch.int32)
            config = DecodeConfig(block_n=16, num_splits=3)
        paged_decode(
            q, case.k_cache, case.v_cache, seq_lens_dev, case.meta.block_tables,
            max_seq_len=case.meta.max_seq_len, scale=case.scale, config=config, out=out,
        )  # fmt: skip
    elif kind == "prefill":
        config = None
        if "block_m" in spec:
            config = PrefillConfig(block_m=spec["block_m"], block_n=spec["block_n"])
        paged_prefill(q, case.k_cache, case.v_cache, case.meta, case.scale, config=config, out=out)
    else:
        paged_attention_triton(q, case.k_cache, case.v_cache, case.meta, case.scale, out=out)

    result["unwritten"] = int(out.isnan().sum())
    if kind == "decode_padding":
        head = paged_attention_torch(
            case.q[:1].float(), case.k_cache.float(), case.v_cache.float(),
            make_metadata(query_lens=[1], seq_lens=[20], block_tables=case.meta.block_tables[:1],
                          block_size=spec.get("block_size", 16)),
            case.scale,
        )  # fmt: skip
        padding_is_zero = bool((out[1] == 0).all())
        result["rel_err"] = rel_err(out[:1], head) if padding_is_zero else float("inf")
    else:
        result["rel_err"] = rel_err(out, reference_fp32(case))
    return result


def main() -> None:
    _patch_interpreter_for_numpy_2_4()
    for name, spec in CASES.items():
        try:
            result = _run_case(name, spec)
        except Exception as exc:  # reported per case, the other cases still run
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"name": name, **result}), flush=True)


# ---------------------------------------------------------------- pytest side

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line.pop("name"): line for line in lines}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results: dict[str, dict], name: str) -> None:
    result = results.get(name)
    assert result is not None, f"the child process reported nothing for {name}"
    assert "error" not in result, result["error"]
    assert result["unwritten"] == 0, f"{result['unwritten']} output elements left unwritten"
    assert result["rel_err"] <= result["bound"], result


if __name__ == "__main__":
    main()

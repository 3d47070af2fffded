"""Triton attention on a CUDA GPU against the torch reference (fp32, from the same
low-precision inputs).

Every case draws fresh random inputs (seeded by its id), on a multi-layer cache seen
through strided layer views, with shuffled block tables whose unused entries point far
outside the cache. Outputs are poisoned with NaN before each run, so an unwritten
element fails; the cache write is checked exactly, over the whole cache.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib

import pytest
import torch

from ferry.kernels.attention_torch import write_kv_torch
from ferry.kernels.kv_layout import layer_view
from ferry.kernels.testing import PagedCase, make_case, reference_fp32, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

REL_ERR_BOUND = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
GQA = {"gqa1": (8, 8), "gqa4": (32, 8), "gqa8": (32, 4)}  # (Hq, Hkv)


def _generator(case_id: str) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(case_id.encode()))


def _lengths(kind: str, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) of a batch of the given kind; lengths avoid multiples of
    the block size on purpose (random)."""

    def rand(lo: int, hi: int, n: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=gen, device="cuda").tolist()

    if kind == "decode":
        seq_lens = rand(1, 3000, 13) + [1, 17, 4097]
        return [1] * len(seq_lens), seq_lens
    if kind == "prefill":
        query_lens = rand(1, 700, 4) + [1, 129]
        return query_lens, list(query_lens)
    if kind == "chunked":  # chunks in the middle of sequences, earlier tokens only cached
        query_lens = rand(1, 300, 5)
        return query_lens, [q + c for q, c in zip(query_lens, rand(1, 2000, 5), strict=True)]
    assert kind == "mixed"  # decodes and prefill chunks in one step
    query_lens = [1, *rand(2, 400, 3), 1, 1, *rand(2, 64, 2)]
    context = rand(0, 1500, len(query_lens))
    return query_lens, [q + c for q, c in zip(query_lens, context, strict=True)]


def _make(case_id: str, kind: str, gqa: str, head_dim: int, dtype, block_size: int = 16):
    gen = _generator(case_id)
    query_lens, seq_lens = _lengths(kind, gen)
    num_q_heads, num_kv_heads = GQA[gqa]
    return make_case(
        query_lens=query_lens,
        seq_lens=seq_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        num_layers=3,
        layer=1,
        generator=gen,
    )


def _write_and_check(case: PagedCase) -> None:
    """Triton's cache write must equal the reference write bit for bit, cache-wide."""
    from ferry.kernels.attention_triton import write_kv_triton

    expected = case.kv_cache.clone()
    write_kv_torch(case.k_new, case.v_new, *layer_view(expected, 1), case.meta.slot_mapping)
    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    torch.cuda.synchronize()
    assert torch.equal(case.kv_cache, expected), "write_kv_triton differs from the reference"


def _check(case: PagedCase, out: torch.Tensor) -> float:
    unwritten = int(out.isnan().sum())
    assert unwritten == 0, f"{unwritten} output elements left unwritten"
    err = rel_err(out, reference_fp32(case))
    assert err <= REL_ERR_BOUND[case.q.dtype], err
    return err


@pytest.mark.parametrize("kind", ["decode", "prefill", "chunked", "mixed"])
@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_bf16(kind: str, gqa: str, head_dim: int) -> None:
    from ferry.kernels.attention_triton import paged_attention_triton

    case = _make(f"{kind}-{gqa}-{head_dim}", kind, gqa, head_dim, torch.bfloat16)
    _write_and_check(case)
    out = torch.full_like(case.q, float("nan"))
    paged_attention_triton(case.q, case.k_cache, case.v_cache, case.meta, case.scale, out=out)
    _check(case, out)


@pytest.mark.parametrize(
    "kind,dtype,head_dim,block_size",
    [
        ("decode", torch.float16, 128, 32),
        ("mixed", torch.float16, 64, 64),
        ("decode", torch.float32, 128, 16),
        ("chunked", torch.float32, 128, 16),
        ("decode", torch.bfloat16, 256, 16),
        ("prefill", torch.bfloat16, 256, 16),
        ("chunked", torch.bfloat16, 32, 16),
    ],
)
def test_paged_attention_other_configs(kind, dtype, head_dim, block_size) -> None:
    from ferry.kernels.attention_triton import paged_attention_triton

    case_id = f"{kind}-{dtype}-{head_dim}-{block_size}"
    case = _make(case_id, kind, "gqa4", head_dim, dtype, block_size)
    _write_and_check(case)
    out = torch.full_like(case.q, float("nan"))
    paged_attention_triton(case.q, case.k_cache, case.v_cache, case.meta, case.scale, out=out)
    _check(case, out)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_decode_any_split_count(num_splits: int) -> None:
    from ferry.kernels.decode_triton import paged_decode
    from ferry.kernels.triton_configs import DecodeConfig

    case = _make(f"splits-{num_splits}", "decode", "gqa4", 128, torch.bfloat16)
    _write_and_check(case)
    out = torch.full_like(case.q, float("nan"))
    paged_decode(
        case.q,
        case.k_cache,
        case.v_cache,
        case.meta.seq_lens,
        case.meta.block_tables,
        max_seq_len=case.meta.max_seq_len,
        scale=case.scale,
        config=DecodeConfig(num_splits=num_splits),
        out=out,
    )
    _check(case, out)


def test_decode_padding_row_gets_zeros() -> None:
    """A request with seq_len 0 (CUDA-graph batch padding) yields zeros, not NaN."""
    from ferry.kernels.decode_triton import paged_decode

    case = _make("padding", "decode", "gqa4", 128, torch.bfloat16)
    seq_lens = case.meta.seq_lens.clone()
    seq_lens[3] = 0
    out = paged_decode(
        case.q,
        case.k_cache,
        case.v_cache,
        seq_lens,
        case.meta.block_tables,
        max_seq_len=case.meta.max_seq_len,
        scale=case.scale,
    )
    assert not out.isnan().any()
    assert (out[3] == 0).all()


def test_offsets_past_2_31_elements() -> None:
    """Block ids times the block stride exceed int32 in a real cache (here 4.4 GB)."""
    from ferry.kernels.attention_triton import paged_attention_triton

    gen = _generator("large")
    case = make_case(
        query_lens=[1, 1, 1, 1],
        seq_lens=[4096, 4000, 4090, 4096],
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device="cuda",
        num_layers=32,
        layer=31,
        spare_blocks=300,
        generator=gen,
    )
    block_elems = case.k_cache.stride(0)
    assert int(case.meta.block_tables[case.meta.block_tables < 1 << 30].max()) * block_elems > 2**31
    _write_and_check_layer(case, layer=31)
    for kind in ("decode", "prefill"):
        out = torch.full_like(case.q, float("nan"))
        if kind == "decode":
            paged_attention_triton(
                case.q, case.k_cache, case.v_cache, case.meta, case.scale, out=out
            )
        else:  # same step through the prefill kernel (q_len 1 rows)
            from ferry.kernels.prefill_triton import paged_prefill

            paged_prefill(case.q, case.k_cache, case.v_cache, case.meta, case.scale, out=out)
        _check(case, out)


def _write_and_check_layer(case: PagedCase, *, layer: int) -> None:
    from ferry.kernels.attention_triton import write_kv_triton

    expected = case.kv_cache[:, layer].clone()
    k_expected, v_expected = expected[:, 0], expected[:, 1]
    write_kv_torch(case.k_new, case.v_new, k_expected, v_expected, case.meta.slot_mapping)
    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    assert torch.equal(case.kv_cache[:, layer], expected)


def test_write_kv_skips_negative_slots() -> None:
    from ferry.kernels.attention_triton import write_kv_triton

    case = _make("negative-slots", "prefill", "gqa4", 128, torch.bfloat16)
    slots = case.meta.slot_mapping.clone()
    slots[::3] = -1
    keep = slots >= 0
    expected = case.kv_cache.clone()
    write_kv_torch(case.k_new[keep], case.v_new[keep], *layer_view(expected, 1), slots[keep])
    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.kv_cache, expected)


def test_decode_cuda_graph_replay_matches_eager() -> None:
    """Capture decode at one set of lengths, replay at longer ones: the split count is
    baked in, the per-request split length is not, so replay stays exact."""
    from ferry.kernels.attention_triton import paged_attention_triton

    long_case = _make("graph", "decode", "gqa4", 128, torch.bfloat16)
    _write_and_check(long_case)
    long_meta = long_case.meta
    short_lens = [max(1, n // 3) for n in long_meta.seq_lens_host]
    q = long_case.q.clone()
    seq_lens = torch.tensor(short_lens, dtype=torch.int32, device="cuda")
    captured_meta = dataclasses.replace(
        long_meta, seq_lens=seq_lens, max_seq_len=max(short_lens), seq_lens_host=tuple(short_lens)
    )

    def step() -> torch.Tensor:
        return paged_attention_triton(
            q, long_case.k_cache, long_case.v_cache, captured_meta, long_case.scale
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()

    for lens in (short_lens, list(long_meta.seq_lens_host)):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, device="cuda", generator=_generator(str(lens[:3]))))
        graph_out.fill_(float("nan"))
        graph.replay()
        eager = step()  # same kernels and split count as captured
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager)
        replay_meta = dataclasses.replace(
            captured_meta, seq_lens_host=tuple(lens), max_seq_len=max(lens)
        )
        _check(dataclasses.replace(long_case, q=q, meta=replay_meta), graph_out)


def test_backend_selection_on_gpu() -> None:
    from ferry.kernels.backend import get_backend

    backend = get_backend("auto", device="cuda", block_size=16, head_dim=128, dtype=torch.bfloat16)
    assert backend.name == "triton"
    case = _make("backend", "mixed", "gqa4", 128, torch.bfloat16)
    backend.write_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    out = backend.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    _check(case, out)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_flash_backend_matches_reference(kind: str) -> None:
    """Runs only where flash-attn is installed; it needs 256-token blocks."""
    from ferry.kernels.attention_flash import unavailable_reason
    from ferry.kernels.backend import get_backend

    reason = unavailable_reason(device="cuda", block_size=256, head_dim=128, dtype=torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    backend = get_backend("flash", device="cuda", block_size=256, head_dim=128)
    case = _make(f"flash-{kind}", kind, "gqa4", 128, torch.bfloat16, block_size=256)
    backend.write_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    out = backend.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    _check(case, out)

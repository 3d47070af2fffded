"""Backend selection, the launch heuristics, and the test-case builder: pure logic, CPU,
no triton needed (one test hides triton from a child process on purpose)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ferry.kernels.attention_sdpa import paged_attention_sdpa
from ferry.kernels.attention_torch import write_kv_torch
from ferry.kernels.backend import BACKEND_NAMES, BackendUnavailableError, get_backend
from ferry.kernels.testing import INVALID_BLOCK_ID, make_case, reference_fp32, rel_err
from ferry.kernels.triton_configs import (
    DECODE_SMEM_BUDGET,
    KV_BUFFERS,
    PREFILL_SMEM_BUDGET,
    choose_num_splits,
    default_decode_config,
    default_prefill_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_torch_backend_runs_sdpa() -> None:
    """The torch backend runs SDPA (tests/unit/test_attention_sdpa.py checks it against
    the reference, paged_attention_torch)."""
    backend = get_backend("torch")
    assert backend.name == "torch"
    assert backend.write_kv is write_kv_torch
    assert backend.paged_attention is paged_attention_sdpa


def test_auto_on_cpu_is_torch() -> None:
    assert get_backend("auto", device="cpu").name == "torch"


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="flash"):
        get_backend("cudnn")
    assert set(BACKEND_NAMES) == {"torch", "triton", "flash", "auto"}


def test_triton_on_cpu_says_why() -> None:
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        get_backend("triton", device="cpu")


def test_triton_refuses_odd_head_dim_up_front() -> None:
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        get_backend("triton", device="cuda", head_dim=96)


def test_flash_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.kernels import attention_flash

    with pytest.raises(BackendUnavailableError, match="flash backend unavailable"):
        get_backend("flash", device="cpu")
    # as if flash_attn were installed: Ferry's 16-token blocks are still refused
    monkeypatch.setattr(attention_flash, "_import_problem", lambda: None)
    with pytest.raises(BackendUnavailableError, match="multiple of 256"):
        get_backend("flash", device="cuda", block_size=16)
    assert attention_flash.unavailable_reason(device="cuda", block_size=256, head_dim=128) is None


def test_package_imports_without_triton() -> None:
    """`ferry.kernels.backend` must import, and pick torch, on a machine without triton."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import ferry.kernels.attention_flash
        from ferry.kernels import backend as kernels
        assert kernels.get_backend("auto", device="cuda").name == "torch"
        try:
            kernels.get_backend("triton", device="cuda")
        except kernels.BackendUnavailableError as exc:
            assert "not installed" in str(exc), exc
        else:
            raise AssertionError("triton backend without triton")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "batch,context,expected",
    [(64, 4096, 3), (1, 32768, 47), (8, 100, 1), (1, 64, 1)],
)
def test_split_counts(batch: int, context: int, expected: int) -> None:
    splits = choose_num_splits(
        num_reqs=batch, num_kv_heads=8, max_seq_len=context, num_sms=132, block_n=64
    )
    assert splits == expected


def test_split_count_never_exceeds_tiles() -> None:
    for context in (1, 63, 64, 65, 1000):
        splits = choose_num_splits(
            num_reqs=1, num_kv_heads=1, max_seq_len=context, num_sms=132, block_n=64
        )
        assert 1 <= splits <= max(1, -(-context // 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_default_configs_fit_their_budgets(dtype, head_dim: int) -> None:
    elem = torch.empty((), dtype=dtype).element_size()
    decode = default_decode_config(head_dim=head_dim, dtype=dtype)
    decode_smem = (16 + 2 * KV_BUFFERS * decode.block_n) * head_dim * elem
    assert decode_smem <= DECODE_SMEM_BUDGET or decode.block_n == 16  # or at the floor
    for max_query_len in (1, 3, 16, 4096):
        for group in (1, 4, 7, 32):
            cfg = default_prefill_config(
                head_dim=head_dim, dtype=dtype, group=group, max_query_len=max_query_len
            )
            assert cfg.block_m >= group and cfg.block_m >= 16 and cfg.block_n >= 16
            smem = (cfg.block_m + 2 * KV_BUFFERS * cfg.block_n) * head_dim * elem
            at_floor = cfg.block_n == 16 and cfg.block_m == max(16, group)
            assert smem <= PREFILL_SMEM_BUDGET or at_floor


def test_prefill_tiles_shrink_for_decode_heavy_batches() -> None:
    big = default_prefill_config(head_dim=128, dtype=torch.bfloat16, group=4, max_query_len=4096)
    small = default_prefill_config(head_dim=128, dtype=torch.bfloat16, group=4, max_query_len=1)
    assert (big.block_m, small.block_m) == (128, 16)


def test_case_builder_scrambles_blocks_and_matches_slots() -> None:
    case = make_case(
        query_lens=[3, 1],
        seq_lens=[35, 17],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        generator=torch.Generator().manual_seed(0),
    )
    tables = case.meta.block_tables
    assert tables.shape == (2, 4)  # 3 blocks for 35 tokens, plus one unused column
    assert (tables[0, 3:] == INVALID_BLOCK_ID).all() and (tables[1, 2:] == INVALID_BLOCK_ID).all()
    used = torch.cat([tables[0, :3], tables[1, :2]])
    assert len(set(used.tolist())) == 5
    # the new tokens' slots: positions 32..34 of request 0 and 16 of request 1
    expected = [int(tables[0, 2]) * 16 + p for p in (0, 1, 2)] + [int(tables[1, 1]) * 16]
    assert case.meta.slot_mapping.tolist() == expected
    assert case.k_cache.stride(0) == 2 * 2 * 16 * 2 * 16  # layers * (k, v) * block elements
    assert case.meta.query_start_loc.tolist() == [0, 3, 4]


def test_reference_sees_the_written_tokens() -> None:
    """After the write, attention of a single-token prompt returns that token's value."""
    case = make_case(
        query_lens=[1], seq_lens=[1], num_q_heads=2, num_kv_heads=1, head_dim=16, generator=None
    )
    write_kv_torch(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    out = reference_fp32(case)
    assert rel_err(out, case.v_new.float().expand(1, 2, 16)) < 1e-2

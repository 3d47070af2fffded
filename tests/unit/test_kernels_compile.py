"""Compile every Triton kernel for an H100/H200 (sm_90) on a machine with no GPU.

The launchers run on small CPU tensors with the real launch path intercepted, so each
kernel is compiled with exactly the arguments, constexprs and specializations (16-byte
alignment, ints equal to 1) a GPU launch would give it. Triton's wheel carries ptxas
and cuobjdump, so the test also reads what costs no device time: shared memory against
the 227 KiB a block may use, register spills, and, on the bf16 fast paths, that the
SASS has tensor-core instructions and 16-byte async copies.

The interpreter tests prove the kernels compute the right thing; this one proves the
GPU compiler takes them and they fit the chip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted, not compiled"
    ),
]

MAX_SHARED_BYTES = 227 * 1024  # per block on sm_90


@dataclass
class Launch:
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    name: str
    shared: int  # bytes of shared memory per block
    stack: int  # bytes of local memory per thread (spills)
    sass: str


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> list[Launch]:
    """Launches of any @triton.jit kernel are recorded here instead of run."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    monkeypatch.setattr(JITFunction, "run", record)
    return launches


def compile_sm90(launch: Launch, *, dot_mode: str) -> Compiled:
    """Compile one recorded launch the way JITFunction.run would on an sm_90 device. The
    launchers saw CPU tensors and chose the interpreter's dot; `dot_mode` puts back the
    one a GPU launch would choose."""
    import triton

    try:  # Triton internals (written against 3.6): the same calls JITFunction.run makes
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend, GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton's internals differ from 3.6's: {exc}")

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    if "DOT_MODE" in kwargs:
        kwargs["DOT_MODE"] = dot_mode
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    bound = fn.signature.bind(
        *launch.args, **{k: v for k, v in kwargs.items() if k in fn.arg_names}
    )
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = bound.arguments[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(
            BaseBackend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    return _inspect(fn.__name__, kernel)


def _inspect(name: str, kernel) -> Compiled:
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    stack = int(usage.split("STACK:")[1].split()[0])
    return Compiled(name=name, shared=kernel.metadata.shared, stack=stack, sass=sass)


def _compile_all(launches: list[Launch], dtype) -> list[Compiled]:
    import torch

    mode = "tf32x3" if dtype == torch.float32 else "native"
    return [compile_sm90(launch, dot_mode=mode) for launch in launches]


def _check_fits(compiled: list[Compiled]) -> None:
    for kernel in compiled:
        assert kernel.shared <= MAX_SHARED_BYTES, (kernel.name, kernel.shared)


# (Hq, Hkv, head_dim, dtype name, block_size)
DECODE_SHAPES = [
    (32, 8, 128, "bfloat16", 16),  # llama3-8b
    (32, 32, 128, "float16", 16),  # llama2-7b (no GQA)
    (14, 2, 64, "bfloat16", 32),  # qwen2-0.5b (group 7)
    (8, 1, 256, "bfloat16", 64),
    (32, 8, 128, "float32", 16),
]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_compiles_for_sm90(capture: list[Launch], shape, num_splits: int) -> None:
    import torch

    from ferry.kernels.decode_triton import paged_decode
    from ferry.kernels.testing import make_case
    from ferry.kernels.triton_configs import default_decode_config

    num_q_heads, num_kv_heads, head_dim, dtype_name, block_size = shape
    dtype = getattr(torch, dtype_name)
    case = make_case(
        query_lens=[1, 1, 1],
        seq_lens=[40, 300, 7],
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        num_layers=4,
    )
    config = dataclasses.replace(
        default_decode_config(head_dim=head_dim, dtype=dtype), num_splits=num_splits
    )
    paged_decode(
        case.q,
        case.k_cache,
        case.v_cache,
        case.meta.seq_lens,
        case.meta.block_tables,
        max_seq_len=case.meta.max_seq_len,
        scale=case.scale,
        config=config,
    )
    assert len(capture) == (1 if num_splits == 1 else 2)  # split kernel (+ merge)
    compiled = _compile_all(capture, dtype)
    _check_fits(compiled)
    if dtype != torch.float32:
        split_kernel = compiled[0]
        assert split_kernel.stack == 0, "register spills in the decode kernel"
        assert "HMMA" in split_kernel.sass, "decode dots are not on tensor cores"
        assert "LDGSTS.E.BYPASS.128" in split_kernel.sass, (
            "K/V tiles not read by 16-byte async copies"
        )


# (Hq, Hkv, head_dim, dtype name, block_size, query_lens, seq_lens)
PREFILL_SHAPES = [
    (32, 8, 128, "bfloat16", 16, [300], [300]),  # one prompt (num_reqs 1 is specialized)
    (32, 8, 128, "bfloat16", 16, [1, 1, 2], [50, 90, 70]),  # decode-heavy mixed batch
    (14, 2, 64, "float16", 32, [33, 1], [60, 9]),
    (8, 1, 256, "bfloat16", 16, [100], [130]),
    (32, 8, 128, "float32", 16, [100], [130]),
]


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "-".join(map(str, s[:5])))
def test_prefill_compiles_for_sm90(capture: list[Launch], shape) -> None:
    import torch

    from ferry.kernels.prefill_triton import paged_prefill
    from ferry.kernels.testing import make_case

    num_q_heads, num_kv_heads, head_dim, dtype_name, block_size, query_lens, seq_lens = shape
    dtype = getattr(torch, dtype_name)
    case = make_case(
        query_lens=query_lens,
        seq_lens=seq_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        num_layers=4,
    )
    paged_prefill(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    (compiled,) = _compile_all(capture, dtype)
    _check_fits([compiled])
    if dtype != torch.float32:
        assert compiled.stack == 0, "register spills in the prefill kernel"
        assert "LDGSTS.E.BYPASS.128" in compiled.sass, "K/V tiles not read by 16-byte async copies"
        if max(query_lens) >= 64:  # large tiles: Hopper's warpgroup MMA
            assert "HGMMA" in compiled.sass, "prefill dots are not on wgmma"


@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
def test_write_kv_compiles_for_sm90(capture: list[Launch], num_kv_heads: int) -> None:
    import torch

    from ferry.kernels.cache_ops_triton import write_kv_triton
    from ferry.kernels.testing import make_case

    case = make_case(
        query_lens=[5],
        seq_lens=[20],
        num_q_heads=num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=128,
        dtype=torch.bfloat16,
    )
    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    (compiled,) = _compile_all(capture, torch.bfloat16)
    assert compiled.stack == 0
    if num_kv_heads >= 2:  # a token's row is >= 512 bytes: one warp at 16 bytes a thread
        assert "LDG.E.128" in compiled.sass and "STG.E.128" in compiled.sass, "not 16-byte accesses"
    else:
        assert "LDG.E.64" in compiled.sass, "a 256-byte row should take 8 bytes a thread"

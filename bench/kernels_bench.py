"""Attention kernel benchmark for one H100/H200: timing, a small tuning sweep, and the
correctness of every variant timed, in one call.

    python -m ferry.bench.kernels_bench --out kernels_bench.json [--no-sweep]

Cases (llama3-8b attention: 32 q heads, 8 kv heads, head_dim 128, bf16, 16-token
blocks, shuffled block tables on a multi-layer cache seen through strided views):

- decode, batch 64 x 4k context and batch 1 x 32k: time, GB/s counting every K and V
  row once plus q and out, and that as a share of 4.3 TB/s (the device-to-device copy
  rate measured on these machines; the script measures its own copy rate too);
- prefill of one 2k and one 8k prompt: TFLOP/s counting causal FLOPs 4 * T^2/2 * Hq * D;
- torch's scaled_dot_product_attention on contiguous K/V, as a sanity baseline.

Times are medians of triton.testing.do_bench (L2 flushed before each run). Decode is
also timed as CUDA-graph replays rotating over cache layers (no launch gaps, no L2
reuse), the way a serving step runs it. Each row carries ||out - ref|| / ||ref|| against
the fp32 torch reference. The sweep varies tiles, warps, pipeline stages and, for
decode, the split count, and reports the best config per case next to the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ferry.kernels.testing import PagedCase, make_case, reference_fp32, rel_err

PEAK_BYTES_PER_S = 4.3e12  # H200 device-to-device copy, read + write (KINDS.md)
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # llama3-8b
BLOCK_SIZE = 16
DTYPE = torch.bfloat16

DECODE_CASES = [(64, 4096, 2), (1, 32768, 8)]  # (batch, context, cache layers to rotate)
PREFILL_LENS = [2048, 8192]

DECODE_TILES = [(64, 4, 5), (64, 4, 3), (64, 8, 5), (32, 4, 6), (32, 4, 4), (128, 8, 5),
                (128, 8, 3), (64, 4, 7)]  # (block_n, num_warps, num_stages)  # fmt: skip
DECODE_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 47, 56, 64]
PREFILL_TILES = [
    (bm, bn, w, s)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 5)  # 3 and 4 pipeline alike (the block-id load takes a stage)
    if not (bm == 128 and w == 4)
]  # (block_m, block_n, num_warps, num_stages)


@dataclasses.dataclass
class Row:
    case: str
    variant: str
    time_us: float | None = None  # do_bench median
    gbps: float | None = None  # decode: bytes moved / time_us
    pct_peak: float | None = None  # gbps as a share of PEAK_BYTES_PER_S
    graph_us: float | None = None  # decode: CUDA-graph replay, per call
    graph_pct_peak: float | None = None
    tflops: float | None = None  # prefill: causal FLOPs / time_us
    rel_err: float | None = None  # ||out - ref|| / ||ref||, ref in fp32
    config: dict | None = None
    swept: bool = False  # a sweep point (printed in the first table)
    error: str | None = None


def _do_bench_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _graph_us(fn: Callable[[], object], calls_per_fn: int) -> float:
    import triton.testing

    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return 1e3 * ms / calls_per_fn


def _copy_bandwidth() -> float:
    """Bytes per second (read + write) of a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = _do_bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def _decode_case(batch: int, context: int, num_layers: int) -> PagedCase:
    case = make_case(
        query_lens=[1] * batch,
        seq_lens=[context] * batch,
        num_q_heads=NUM_Q_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        dtype=DTYPE,
        device="cuda",
        num_layers=num_layers,
        layer=0,
        spare_blocks=8,
    )
    from ferry.kernels.attention_triton import write_kv_triton

    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    return case


def _decode_bytes(case: PagedCase) -> int:
    itemsize = case.q.element_size()
    kv = 2 * sum(case.meta.seq_lens_host) * NUM_KV_HEADS * HEAD_DIM * itemsize
    return kv + 2 * case.q.numel() * itemsize  # + q read + out written


def _sdpa_inputs(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The case's q and keys/values gathered into contiguous [B, H, S, D] tensors."""
    meta = case.meta
    keys, values = [], []
    for b, seq_len in enumerate(meta.seq_lens_host):
        blocks = meta.block_tables[b, : math.ceil(seq_len / BLOCK_SIZE)].long()
        keys.append(case.k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1))
        values.append(case.v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1))
    return torch.stack(keys).contiguous(), torch.stack(values).contiguous(), case.q


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _bench_decode(batch: int, context: int, num_layers: int, sweep: bool) -> list[Row]:
    from ferry.kernels.decode_triton import paged_decode
    from ferry.kernels.kv_layout import layer_view
    from ferry.kernels.triton_configs import DecodeConfig, choose_num_splits, default_decode_config

    name = f"decode b{batch} x {context // 1024}k"
    case = _decode_case(batch, context, num_layers)
    meta = case.meta
    num_bytes = _decode_bytes(case)
    ref = reference_fp32(case)
    layers = [layer_view(case.kv_cache, layer) for layer in range(num_layers)]

    def call(config: DecodeConfig | None, k_cache=case.k_cache, v_cache=case.v_cache):
        return paged_decode(
            case.q, k_cache, v_cache, meta.seq_lens, meta.block_tables,
            max_seq_len=meta.max_seq_len, scale=case.scale, config=config,
        )  # fmt: skip

    def measure(variant: str, config: DecodeConfig, graph: bool = False) -> Row:
        row = Row(case=name, variant=variant, config=dataclasses.asdict(config), swept=not graph)
        try:
            row.rel_err = rel_err(call(config), ref)
            row.time_us = _do_bench_us(lambda: call(config))
            row.gbps = num_bytes / (row.time_us * 1e-6) / 1e9
            row.pct_peak = 100 * num_bytes / (row.time_us * 1e-6) / PEAK_BYTES_PER_S
            if graph:
                row.graph_us = _graph_us(
                    lambda: [call(config, k, v) for k, v in layers], calls_per_fn=num_layers
                )
                row.graph_pct_peak = 100 * num_bytes / (row.graph_us * 1e-6) / PEAK_BYTES_PER_S
        except Exception as exc:  # a config the compiler or the chip refuses
            row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return row

    default = default_decode_config(head_dim=HEAD_DIM, dtype=DTYPE)
    default_splits = choose_num_splits(
        num_reqs=batch,
        num_kv_heads=NUM_KV_HEADS,
        max_seq_len=context,
        num_sms=torch.cuda.get_device_properties(0).multi_processor_count,
        block_n=default.block_n,
    )
    rows = [measure(f"triton default {_label(default)} split{default_splits}", default, True)]
    if sweep:
        tiles = []
        for block_n, num_warps, num_stages in DECODE_TILES:
            config = DecodeConfig(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
            tiles.append(measure(f"{_label(config)} split{default_splits}", config))
        best_tile = _best(tiles)
        base = DecodeConfig(**best_tile.config) if best_tile is not None else default
        max_splits = math.ceil(context / base.block_n)
        splits = [
            measure(f"{_label(base)} split{s}", dataclasses.replace(base, num_splits=s))
            for s in DECODE_SPLITS
            if s <= max_splits
        ]
        best = _best(tiles + splits)
        if best is not None:
            config = DecodeConfig(**best.config)
            rows.append(measure(f"triton best: {best.variant}", config, graph=True))
        rows += tiles + splits

    k, v, q = _sdpa_inputs(case)
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    row = Row(case=name, variant="torch sdpa (contiguous KV)")
    try:
        row.rel_err = rel_err(_sdpa(q4, k, v, causal=False).squeeze(2), ref)
        row.time_us = _do_bench_us(lambda: _sdpa(q4, k, v, causal=False))
        row.gbps = num_bytes / (row.time_us * 1e-6) / 1e9
        row.pct_peak = 100 * row.gbps * 1e9 / PEAK_BYTES_PER_S
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    rows.append(row)
    return rows


def _bench_prefill(num_tokens: int, sweep: bool) -> list[Row]:
    from ferry.kernels.attention_triton import write_kv_triton
    from ferry.kernels.prefill_triton import paged_prefill
    from ferry.kernels.triton_configs import PrefillConfig, default_prefill_config

    name = f"prefill {num_tokens // 1024}k"
    case = make_case(
        query_lens=[num_tokens],
        seq_lens=[num_tokens],
        num_q_heads=NUM_Q_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        dtype=DTYPE,
        device="cuda",
        num_layers=2,
    )
    write_kv_triton(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    flops = 4 * num_tokens**2 / 2 * NUM_Q_HEADS * HEAD_DIM
    ref = reference_fp32(case)

    def measure(
        variant: str, fn: Callable[[], torch.Tensor], config: dict | None = None, swept=False
    ) -> Row:
        row = Row(case=name, variant=variant, config=config, swept=swept)
        try:
            row.rel_err = rel_err(fn(), ref)
            row.time_us = _do_bench_us(fn)
            row.tflops = flops / (row.time_us * 1e-6) / 1e12
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return row

    def triton_fn(config: PrefillConfig | None) -> Callable[[], torch.Tensor]:
        return lambda: paged_prefill(
            case.q, case.k_cache, case.v_cache, case.meta, case.scale, config=config
        )

    default = default_prefill_config(
        head_dim=HEAD_DIM,
        dtype=DTYPE,
        group=NUM_Q_HEADS // NUM_KV_HEADS,
        max_query_len=num_tokens,
    )
    rows = [
        measure(
            f"triton default {_label(default)}", triton_fn(default), dataclasses.asdict(default)
        )
    ]
    if sweep:
        tiles = []
        for block_m, block_n, num_warps, num_stages in PREFILL_TILES:
            config = PrefillConfig(
                block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages
            )
            tiles.append(
                measure(_label(config), triton_fn(config), dataclasses.asdict(config), swept=True)
            )
        best = _best(tiles)
        if best is not None:
            rows.append(dataclasses.replace(best, variant="triton best: " + best.variant))
            rows[-1].swept = False
        rows += tiles

    k, v, _ = _sdpa_inputs(case)  # [1, Hkv, T, D]
    q = case.q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, T, D]
    rows.append(
        measure(
            "torch sdpa (contiguous KV)",
            lambda: _sdpa(q, k, v, causal=True).squeeze(0).transpose(0, 1),
        )
    )
    return rows


def _label(config) -> str:
    fields = dataclasses.asdict(config)
    if "block_m" in fields:
        return f"m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages}"
    return f"n{config.block_n} w{config.num_warps} s{config.num_stages}"


def _best(rows: list[Row]) -> Row | None:
    """Fastest row whose output is right (bf16 bound)."""
    ok = [r for r in rows if r.error is None and r.rel_err is not None and r.rel_err <= 1e-2]
    return min(ok, key=lambda r: r.time_us) if ok else None


def _fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or a dash as wide as spec (e.g. '8.1f' -> 8)."""
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def _print_table(rows: list[Row], copy_bw: float) -> None:
    print(f"\ndevice copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s; %peak is of 4.3")
    header = (
        f"{'case':<16} {'variant':<40} {'us':>8} {'GB/s':>6} {'%peak':>6} {'graph us':>8} "
        f"{'%peak':>6} {'TFLOP/s':>7} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.error is not None:
            print(f"{r.case:<16} {r.variant:<40} ERROR {r.error[:70]}")
            continue
        print(
            f"{r.case:<16} {r.variant:<40} {_fmt(r.time_us, '8.1f')} {_fmt(r.gbps, '6.0f')} "
            f"{_fmt(r.pct_peak, '6.1f')} {_fmt(r.graph_us, '8.1f')} "
            f"{_fmt(r.graph_pct_peak, '6.1f')} {_fmt(r.tflops, '7.1f')} {_fmt(r.rel_err, '8.1e')}"
        )


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("kernels_bench needs a CUDA GPU")
    torch.manual_seed(0)
    started = time.time()
    copy_bw = _copy_bandwidth()
    rows: list[Row] = []
    for batch, context, num_layers in DECODE_CASES:
        rows += _bench_decode(batch, context, num_layers, sweep=args.sweep)
        torch.cuda.empty_cache()
    for num_tokens in PREFILL_LENS:
        rows += _bench_prefill(num_tokens, sweep=args.sweep)
        torch.cuda.empty_cache()
    _print_table([r for r in rows if r.swept], copy_bw)
    _print_table([r for r in rows if not r.swept], copy_bw)  # last: it ends the output
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bytes_per_s": copy_bw,
        "peak_bytes_per_s": PEAK_BYTES_PER_S,
        "seconds": time.time() - started,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the full results as JSON here")
    parser.add_argument(
        "--no-sweep", dest="sweep", action="store_false", help="time the defaults only"
    )
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

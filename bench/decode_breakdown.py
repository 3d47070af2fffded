"""Where a decode step's time goes, for each element-wise op set (torch vs triton), in one
run on one GPU: llama3-8b shape, bf16, random weights.

Per (ops, batch, context): the full `ModelRunner.execute` step; the host part of it
(`launch` returning, before the GPU finishes); the CUDA-graph replay alone (GPU time
between two events); what follows the graph (logits, sampling, copy back) as the rest;
and the number of kernels one replay launches (torch.profiler). Prints a table, writes
JSON (--out).

    python -m ferry.bench.decode_breakdown --out bench/results/h200/decode_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ferry.bench.engine_bench import copy_bandwidth_bytes_s, median_time


def _runner(ops: str, args):
    from ferry.services.worker.model.resolve import preset_config
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    return ModelRunner(RunnerConfig(
        model_config=preset_config(args.preset), random_on_device=True, device="cuda",
        kv_cache_gb=args.kv_cache_gb, max_num_seqs=max(args.batches), max_num_tokens=8192,
        max_model_len=8192, fused_ops=ops))  # fmt: skip


def _replay_gpu_ms(graph, repeats: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernels_per_replay(graph) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def measure(runner, ops: str, args, copy_bytes_s: float) -> list[dict]:
    import torch

    from ferry.services.worker.profile import synthetic_batch

    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = runner.block_bytes / runner.block_size
    rows = []
    for batch_size in args.batches:
        for context in args.contexts:
            batch = synthetic_batch(0, batch_size, context, block_size=runner.block_size,
                                    num_blocks=runner.num_blocks, vocab_size=runner.vocab_size)
            step_ms = median_time(lambda b=batch: runner.execute(b), args.repeats) * 1e3

            def host_only(b=batch):
                pending = runner.launch(b)
                elapsed = time.perf_counter()
                pending.result()
                return elapsed

            host = []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                host.append(host_only() - start)
            graphs = runner.graphs
            bs = graphs.padded_size(batch_size)
            bucket = next(b for b in graphs.len_buckets if b >= context)
            graph = graphs.graphs[bs, bucket]
            replay_ms = _replay_gpu_ms(graph, args.repeats)
            roof_ms = (weight_bytes + batch_size * context * kv_per_token) / copy_bytes_s * 1e3
            rows.append({
                "ops": ops, "batch": batch_size, "context": context, "step_ms": step_ms,
                "host_ms": statistics.median(host) * 1e3, "replay_ms": replay_ms,
                "rest_ms": step_ms - replay_ms, "kernels": _kernels_per_replay(graph),
                "roofline_ms": roof_ms, "ratio": step_ms / roof_ms,
            })  # fmt: skip
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"{r['ops']:>7}{r['batch']:>6}{r['context']:>6}{r['step_ms']:>9.3f}"
            f"{r['host_ms']:>9.3f}{r['replay_ms']:>10.3f}{r['rest_ms']:>9.3f}{r['kernels']:>8}"
            f"{r['roofline_ms']:>9.3f}{r['ratio']:>7.2f}")


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--ops", default="torch,triton")
    parser.add_argument("--batches", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--contexts", default="512,4096",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--kv-cache-gb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    copy_bytes_s = copy_bandwidth_bytes_s("cuda")  # the roofline's bandwidth, this card's
    print(f"{torch.cuda.get_device_name()}: copy {copy_bytes_s / 1e12:.2f} TB/s")
    print(f"{'ops':>7}{'batch':>6}{'ctx':>6}{'step ms':>9}{'host ms':>9}{'replay ms':>10}"
          f"{'rest ms':>9}{'kernels':>8}{'roof ms':>9}{'ratio':>7}")
    rows = []
    for ops in args.ops.split(","):
        runner = _runner(ops, args)
        with torch.inference_mode():
            rows += measure(runner, ops, args, copy_bytes_s)
        del runner
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "copy_bytes_s": copy_bytes_s, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

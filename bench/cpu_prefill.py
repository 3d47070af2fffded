"""CPU step times of a small model: one-chunk prefills and decode steps, split into
attention and the rest.

    python -m ferry.bench.cpu_prefill [--model random:tiny] [--out result.json]

Each prefill is one chunk of P tokens from position 0 (the whole prompt in one step);
each "chunk" is the last N tokens of a prompt of C (chunked prefill: the engine splits a
prompt longer than its step budget, 2048 tokens by default); each decode step is B
requests with one new token at context C. A step is timed through
`ModelRunner.execute` (inputs, model, logits, sampling): the best of --repeats runs
after a warm-up (the least disturbed by other work on a shared machine). "attention" is the runner's own paged-attention function timed alone on the
step's shapes (its q, KV cache and metadata) times the number of layers; "rest" is the
step minus that (projections, MLP, norms, rotary, the cache write, logits, sampling).
The runner keeps its default of one torch thread, as a worker on CPU does.

`--attention reference` runs the model with the readable reference instead
(kernels/attention_torch.py, what the torch backend ran before attention_sdpa.py), so
before and after can be compared in one run on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable

import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk

PREFILL_LENS = (500, 1000, 2000, 3000, 4000)
CHUNK_CASES = ((952, 3000), (2048, 4000))  # (N, C)
DECODE_CASES = ((1, 512), (1, 4000), (8, 512), (8, 2048), (32, 512), (32, 2048))  # (B, C)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Least wall time of fn() over `repeats` calls in seconds, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_batch(num_reqs: int, num_tokens: int, context: int, *, block_size: int) -> ModelBatch:
    """num_reqs requests, each adding num_tokens tokens that end at position context - 1,
    each on blocks of its own."""
    greedy = SamplingParams(temperature=0.0, seed=0)
    blocks_per_req = -(-context // block_size)
    chunks = tuple(
        SeqChunk(
            req_id=f"r{i}",
            token_ids=tuple((7 * i + j) % 4000 + 5 for j in range(num_tokens)),
            start_pos=context - num_tokens,
            block_ids=tuple(range(i * blocks_per_req, (i + 1) * blocks_per_req)),
            sample=True,
            sampling=greedy,
        )
        for i in range(num_reqs)
    )
    return ModelBatch(chunks=chunks)


def time_case(runner, batch: ModelBatch, repeats: int) -> dict:
    """Step time and the attention share of one batch shape."""
    from ferry.kernels.kv_layout import layer_view
    from ferry.services.worker.runner import prepare_inputs

    mc = runner.model_config
    step_s = best_time(lambda: runner.execute(batch), repeats)
    inputs = prepare_inputs(batch.chunks, block_size=runner.block_size, device=runner.device)
    num_tokens = inputs.input_ids.shape[0]
    q = torch.randn(num_tokens, mc.num_heads, mc.head_dim, dtype=runner.dtype)
    k_cache, v_cache = layer_view(runner.kv_cache, 0)
    attention = runner.model.kernels.paged_attention
    scale = mc.head_dim**-0.5
    with torch.inference_mode():
        attn_s = best_time(
            lambda: attention(q, k_cache, v_cache, inputs.meta, scale), repeats
        ) * mc.num_layers
    return {
        "step_s": step_s,
        "attention_s": attn_s,
        "rest_s": step_s - attn_s,
        "tokens_per_s": num_tokens / step_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.cpu_prefill",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny",
                        help="model directory, preset name, or random:PRESET (the default: "
                             "the tiny preset's shape, weights made in memory)")
    parser.add_argument("--prefill", type=int, nargs="*", default=list(PREFILL_LENS),
                        help="prefill lengths (tokens)")
    parser.add_argument("--chunk", nargs="*", default=[f"{n}x{c}" for n, c in CHUNK_CASES],
                        help="chunked-prefill cases TOKENSxCONTEXT")
    parser.add_argument("--decode", nargs="*", default=[f"{b}x{c}" for b, c in DECODE_CASES],
                        help="decode cases BATCHxCONTEXT")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", choices=["backend", "reference"], default="backend",
                        help="the runner's attention backend, or the readable reference")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from ferry.services.worker.entry import DEFAULT_CPU_KV_GB
    from ferry.services.worker.model.resolve import RANDOM_PREFIX, preset_config, resolve_model
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    is_random = args.model.startswith(RANDOM_PREFIX)
    runner = ModelRunner(RunnerConfig(
        model_dir=None if is_random else str(resolve_model(args.model)),
        model_config=preset_config(args.model) if is_random else None,
        device="cpu",
        kv_cache_gb=DEFAULT_CPU_KV_GB,
        cpu_threads=args.threads,
    ))
    if args.attention == "reference":
        from ferry.kernels.attention_torch import paged_attention_torch

        runner.model.kernels = dataclasses.replace(
            runner.model.kernels, paged_attention=paged_attention_torch
        )
    attention_name = runner.model.kernels.paged_attention.__name__
    mc = runner.model_config
    print(f"model {args.model}: {mc.num_layers} layers, hidden {mc.hidden_size}, heads "
          f"{mc.num_heads}/{mc.num_kv_heads} x {mc.head_dim}, {runner.dtype}, "
          f"attention {attention_name}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}", flush=True)

    rows: list[dict] = []
    header = f"{'case':<8} {'B':>3} {'tokens':>6} {'ctx':>5} {'step ms':>9} {'attn ms':>9} " \
             f"{'rest ms':>9} {'attn %':>6} {'tok/s':>8}"
    print(header, flush=True)

    def run(kind: str, num_reqs: int, num_tokens: int, context: int) -> None:
        if context > runner.max_model_len:
            print(f"skip {kind} {num_reqs}x{context}: over max_model_len {runner.max_model_len}")
            return
        if num_reqs * -(-context // runner.block_size) > runner.num_blocks:
            print(f"skip {kind} {num_reqs}x{context}: over the KV cache")
            return
        batch = make_batch(num_reqs, num_tokens, context, block_size=runner.block_size)
        row = {"case": kind, "batch": num_reqs, "tokens": num_tokens, "context": context}
        row |= time_case(runner, batch, args.repeats)
        rows.append(row)
        print(f"{kind:<8} {num_reqs:>3} {num_tokens * num_reqs:>6} {context:>5} "
              f"{row['step_s'] * 1e3:>9.1f} {row['attention_s'] * 1e3:>9.1f} "
              f"{row['rest_s'] * 1e3:>9.1f} {100 * row['attention_s'] / row['step_s']:>6.0f} "
              f"{row['tokens_per_s']:>8.0f}", flush=True)

    for num_tokens in args.prefill:
        run("prefill", 1, num_tokens, num_tokens)
    for case in args.chunk:
        num_tokens, context = (int(x) for x in case.split("x"))
        run("chunk", 1, num_tokens, context)
    for case in args.decode:
        num_reqs, context = (int(x) for x in case.split("x"))
        run("decode", num_reqs, 1, context)

    if args.out:
        result = {
            "model": args.model,
            "dtype": str(runner.dtype),
            "attention": attention_name,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "repeats": args.repeats,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

"""`ferry bench prefix-ttft`: what the engine's prefix cache saves on one device.

Model: a preset's shape (default llama3-8b) with random weights drawn on the device. Each
repetition draws a new shared prefix P (--prefix-tokens, default 7168) and two tails A, B
(--tail-tokens, default 1024), then times to the first token of prompt P+B:

    uncached   an engine with the prefix cache off (the whole prompt is prefilled)
    cached     an engine with the cache on, after P+A ran (P's blocks are cached: only B
               and the block P ends in, when P is not block-aligned, are prefilled)

Both engines run the worker's default EngineConfig (chunked prefill, 2048-token steps) on
one ModelRunner, one after the other: they share the KV memory, and every repetition uses
a new random prefix, so no engine ever finds blocks the other overwrote. The first
repetition warms up (Triton compiles) and is not counted.

It also checks that the cache changes no output: P+B's greedy tokens, and its seeded
(temperature 1) tokens, with the cache on and off. On a GPU in bf16 the cached run
prefills B's chunk against cached KV where the uncached run prefilled in other chunks, so
floating-point sums differ in order; the JSON says where outputs first differ, if they do.

Prints a table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _runner(args):
    import dataclasses

    from ferry.services.worker.model.resolve import preset_config
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    config = preset_config(args.preset)
    if args.num_layers:
        config = dataclasses.replace(config, num_layers=args.num_layers)
    prompt_len = args.prefix_tokens + args.tail_tokens
    return ModelRunner(RunnerConfig(
        model_config=config, random_on_device=True, device=args.device,
        kv_cache_gb=args.kv_cache_gb or (None if args.device.startswith("cuda") else 0.5), max_model_len=prompt_len + args.max_tokens + 16,
        max_num_tokens=max(2048, args.tail_tokens + 256)))


def timed_request(engine, req_id: str, prompt: list[int], sampling, device: str
                  ) -> tuple[float, list[int]]:
    """Run one request alone to its end: (seconds to its first token, its tokens)."""
    _sync(device)
    start = time.perf_counter()
    engine.add_request(req_id, prompt, sampling)
    first_s = None
    tokens: list[int] = []
    while req_id in engine.requests:
        for out in engine.step():
            if out.req_id == req_id and out.token_ids:
                if first_s is None:
                    first_s = time.perf_counter() - start  # step() ends by reading the tokens
                tokens.extend(out.token_ids)
    assert first_s is not None, "the request ended without a token"
    return first_s, tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or of the shorter one's end); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args: argparse.Namespace) -> dict:
    from ferry.common.config import EngineConfig
    from ferry.common.sampling import SamplingParams
    from ferry.services.worker.engine.engine import Engine

    runner = _runner(args)
    cached_engine = Engine(runner, EngineConfig(), model_identity=f"random:{args.preset}")
    plain_engine = Engine(runner, EngineConfig(enable_prefix_cache=False))
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=7, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = runner.vocab_size
    rows = []
    for rep in range(args.repeats + 1):
        rng = random.Random(rep)
        prefix = [rng.randrange(16, vocab) for _ in range(args.prefix_tokens)]
        tail_a = [rng.randrange(16, vocab) for _ in range(args.tail_tokens)]
        tail_b = [rng.randrange(16, vocab) for _ in range(args.tail_tokens)]
        prompt = prefix + tail_b
        row: dict = {"rep": rep}
        for name, sampling in (("greedy", greedy), ("seeded", seeded)):
            uncached_s, plain = timed_request(plain_engine, f"u{rep}{name}", prompt, sampling,
                                              args.device)
            timed_request(cached_engine, f"a{rep}{name}", prefix + tail_a, one, args.device)
            hits_before = cached_engine.scheduler.num_hit_tokens
            cached_s, cached = timed_request(cached_engine, f"b{rep}{name}", prompt, sampling,
                                             args.device)
            row[name] = {"uncached_ttft_s": uncached_s, "cached_ttft_s": cached_s,
                         "hit_tokens": cached_engine.scheduler.num_hit_tokens
                         - hits_before,
                         "first_difference": first_difference(plain, cached)}
        if rep > 0:  # rep 0 warms up
            rows.append(row)
        cached_engine.check_invariants()
    uncached = [r["greedy"]["uncached_ttft_s"] for r in rows]
    cached = [r["greedy"]["cached_ttft_s"] for r in rows]
    result = {
        "preset": args.preset, "device": args.device, "device_name": _device_name(args.device),
        "num_layers": runner.model_config.num_layers,
        "prefix_tokens": args.prefix_tokens, "tail_tokens": args.tail_tokens,
        "max_num_batched_tokens": EngineConfig().max_num_batched_tokens,
        "repeats": len(rows), "rows": rows,
        "uncached_ttft_s": statistics.median(uncached),
        "cached_ttft_s": statistics.median(cached),
        "speedup": statistics.median(uncached) / statistics.median(cached),
        "hit_tokens": rows[-1]["greedy"]["hit_tokens"],
        "greedy_identical": all(r["greedy"]["first_difference"] is None for r in rows),
        "seeded_identical": all(r["seeded"]["first_difference"] is None for r in rows),
    }
    return result


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def format_table(result: dict) -> str:
    lines = [
        f"{result['preset']} ({result['num_layers']} layers) on {result['device_name']}: "
        f"prompt {result['prefix_tokens']} cached + {result['tail_tokens']} new tokens, "
        f"{result['max_num_batched_tokens']}-token prefill chunks, median of "
        f"{result['repeats']}",
        f"  TTFT uncached  {result['uncached_ttft_s'] * 1e3:9.1f} ms",
        f"  TTFT cached    {result['cached_ttft_s'] * 1e3:9.1f} ms  "
        f"({result['hit_tokens']} tokens hit)",
        f"  speedup        {result['speedup']:9.2f} x",
        f"  outputs identical cache on/off: greedy {result['greedy_identical']}, "
        f"seeded {result['seeded_identical']}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda", help="cuda (cpu with --preset tiny)")
    parser.add_argument("--num-layers", type=int, default=0, help="override (quick checks)")
    parser.add_argument("--prefix-tokens", type=int, default=7168)
    parser.add_argument("--tail-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a request")
    parser.add_argument("--kv-cache-gb", type=float, default=0.0,
                        help="KV cache GiB; 0: from the free memory (GPU), 0.5 (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench prefix-ttft",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

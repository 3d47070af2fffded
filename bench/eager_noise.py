"""How much an eager (prefill or mixed) step's time spreads, alone and beside a busy
Python thread.

    python -m ferry.bench.eager_noise [--model random:llama3-8b] [--device cuda]
                                      [--repeats 50] [--out result.json]

In a serving worker, steps with prefill run eagerly (no CUDA graph) and are host-bound;
on an H100 with llama3-8b their time spread 0.79x-1.70x around the in-situ fit (p10-p90,
bench/results/h100/sim-check3-2026-12-06), where llama2-7b's eager steps had been tight.
This separates the engine from its surroundings: the same mixed step (P prefill tokens of
one new request + D decodes at context C) runs --repeats times back to back

    quiet    nothing else in the process
    gil      beside a thread that holds the GIL in pure Python between short sleeps, as
             a worker's event loop does decoding messages and hashing prompt blocks

and prints, per shape and mode, the step's p10 / p50 / p90 in ms and p90 / p10. A wide
spread when quiet points at the engine (allocations, lazily loaded kernels, Python GC);
one that only appears beside the busy thread points at GIL contention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from ferry.services.worker.profile import synthetic_batch

SHAPES = ((64, 8, 1024), (256, 16, 2048), (1024, 32, 2048))  # (P, D, C) of a mixed step


def busy_python(stop: threading.Event, hold_s: float = 0.002, rest_s: float = 0.001) -> None:
    """Hold the GIL in bytecode for hold_s, sleep rest_s, until stopped."""
    while not stop.is_set():
        end = time.perf_counter() + hold_s
        x = 0
        while time.perf_counter() < end:
            x += sum(range(64))
        time.sleep(rest_s)


def percentiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10)
    return q[0], statistics.median(values), q[-1]


def measure(runner, shape: tuple[int, int, int], repeats: int, sync) -> list[float]:
    prefill, decodes, context = shape
    batch = synthetic_batch(prefill, decodes, context, block_size=runner.block_size,
                            num_blocks=runner.num_blocks, vocab_size=runner.vocab_size)
    runner.execute(batch)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        runner.execute(batch)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.eager_noise",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--kv-blocks", type=int, default=4096)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    import torch

    from ferry.services.worker.runner import ModelRunner, runner_config_for

    runner = ModelRunner(runner_config_for(
        args.model, device=args.device, num_blocks=args.kv_blocks,
        max_num_seqs=64, max_num_tokens=2048, max_model_len=4096))
    on_gpu = runner.device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(runner.device)

    rows = []
    for shape in SHAPES:
        for mode in ("quiet", "gil"):
            stop = threading.Event()
            thread = threading.Thread(target=busy_python, args=(stop,), daemon=True)
            if mode == "gil":
                thread.start()
            try:
                times = measure(runner, shape, args.repeats, sync)
            finally:
                stop.set()
                if mode == "gil":
                    thread.join()
            p10, p50, p90 = percentiles(times)
            rows.append({"P": shape[0], "D": shape[1], "C": shape[2], "mode": mode,
                         "p10_ms": p10 * 1e3, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
                         "spread": p90 / p10})
    name = torch.cuda.get_device_name(runner.device) if on_gpu else "cpu"
    print(f"eager step spread: {args.model} on {name}; {args.repeats} steps a row")
    print(f"{'P':>5} {'D':>3} {'C':>5} {'mode':>6} {'p10 ms':>8} {'p50 ms':>8} "
          f"{'p90 ms':>8} {'p90/p10':>8}")
    for r in rows:
        print(f"{r['P']:>5} {r['D']:>3} {r['C']:>5} {r['mode']:>6} {r['p10_ms']:>8.2f} "
              f"{r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['spread']:>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "model": args.model, "repeats": args.repeats,
                       "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

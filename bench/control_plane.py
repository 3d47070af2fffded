"""`python -m ferry.bench.control_plane`: how many requests per second the control plane
(gateway + scheduler + workers, their ZMQ hops and codecs) carries, through the SDK and
through HTTP, and the latency it adds to one request.

A real `ferry up --executor sim` cluster whose latency model makes every step take
~0.1 ms, so what is measured is Ferry's own overhead, not model compute. Each request:
8 prompt tokens, `--max-tokens` output tokens (default 1), non-streaming.

- added latency: p50 of one request at a time on the idle cluster, minus the modelled
  step times it went through;
- throughput: `--concurrency` requests kept in flight for `--seconds`, completed req/s.

`--keys`: the same with cluster keys (CURVE and sender checks on every internal socket),
to show what trust costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from ferry.services.worker.latency_model import LatencyModel, Profile

STEP_S = 1e-4  # the modelled step time


def write_profile(path: Path) -> None:
    Profile(name="near-zero", device="none", model={}, block_size=16, kv_block_bytes=1,
            num_blocks=4096, max_model_len=4096, vocab_size=4096,
            latency=LatencyModel(base_s=STEP_S, per_prefill_token_s=0.0, per_prefill_attn_s=0.0,
                                 per_decode_seq_s=0.0, per_decode_context_s=0.0),
            samples=[]).save(path)


async def sdk_latency(addr: str, n: int, max_tokens: int) -> list[float]:
    from ferry import AsyncClient

    async with AsyncClient(addr) as client:
        await client.generate(prompt_token_ids=list(range(20, 28)), max_tokens=max_tokens)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await client.generate(prompt_token_ids=list(range(20, 28)), max_tokens=max_tokens,
                                  ignore_eos=True)
            times.append(time.perf_counter() - start)
    return times


async def sdk_throughput(addr: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    from ferry import AsyncClient

    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(client) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                await client.generate(prompt_token_ids=list(range(20, 28)),
                                      max_tokens=max_tokens, ignore_eos=True)
                done += 1
            except Exception:
                errors += 1

    async with AsyncClient(addr, timeout_s=30) as client:
        start = time.perf_counter()
        await asyncio.gather(*[loop(client) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return {"req_per_s": done / elapsed, "completed": done, "errors": errors}


async def http_latency(base: str, n: int, max_tokens: int) -> list[float]:
    import aiohttp

    body = {"prompt": list(range(20, 28)), "max_tokens": max_tokens, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        times = []
        for _ in range(n + 1):
            start = time.perf_counter()
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 200
            times.append(time.perf_counter() - start)
    return times[1:]


async def http_throughput(base: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    import aiohttp

    body = {"prompt": list(range(20, 28)), "max_tokens": max_tokens, "ignore_eos": True}
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(session) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*[loop(session) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return {"req_per_s": done / elapsed, "completed": done, "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--keys", action="store_true",
                        help="CURVE on the internal sockets (keys made for the run)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from ferry.bench.local_cluster import start_cluster  # the launcher the e2e tests use too

    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "near-zero.json"
        write_profile(profile)
        env = {}
        if args.keys:
            from ferry.common.security import ROLES, init_keys

            init_keys(Path(tmp) / "keys", [(role, role, "") for role in ROLES])
            env["FERRY_KEYS_DIR"] = str(Path(tmp) / "keys")
        cluster = start_cluster(Path(tmp), workers=args.workers, extra=(
            "--executor", "sim", "--sim-profile", str(profile),
            "--gateway-arg=--max-inflight=4096", "--worker-arg=--report-interval=0.05"),
            env=env)
        try:
            steps = args.max_tokens  # one prefill step gives token 1, then one per token
            sdk_lat = asyncio.run(sdk_latency(cluster.sdk_addr, args.latency_samples,
                                              args.max_tokens))
            http_lat = asyncio.run(http_latency(cluster.base_url, args.latency_samples,
                                                args.max_tokens))
            sdk_tp = asyncio.run(sdk_throughput(cluster.sdk_addr, args.concurrency,
                                                args.seconds, args.max_tokens))
            http_tp = asyncio.run(http_throughput(cluster.base_url, args.concurrency,
                                                  args.seconds, args.max_tokens))
        finally:
            cluster.stop()
    result = {
        "workers": args.workers, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "internal_sockets": "curve" if args.keys else "plain",
        "modelled_step_s": STEP_S,
        "sdk": {**sdk_tp, "added_latency_ms_p50":
                (statistics.median(sdk_lat) - steps * STEP_S) * 1e3},
        "http": {**http_tp, "added_latency_ms_p50":
                 (statistics.median(http_lat) - steps * STEP_S) * 1e3},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"control plane, {args.workers} sim workers (step {STEP_S * 1e3:.1f} ms), "
          f"{args.concurrency} in flight, {args.max_tokens} output token(s), internal "
          f"sockets {result['internal_sockets']}:")
    for name in ("sdk", "http"):
        r = result[name]
        print(f"  {name:<4} {r['req_per_s']:8.0f} req/s   added latency p50 "
              f"{r['added_latency_ms_p50']:6.2f} ms   errors {r['errors']}")


if __name__ == "__main__":
    main()

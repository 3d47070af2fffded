"""`python -m ferry.bench.gateway_input`: what hostile or careless input costs everyone
else at the gateway (DESIGN §7, "input hygiene").

A real `ferry up --executor sim` cluster (the tiny model's tokenizer, max_model_len 4096;
steps of ~0.1 ms, so what is measured is the gateway). While small HTTP completions and
SDK generates run one after another, it sends:

- one 10 MB prompt over HTTP, then 4 at once: how long until they are answered, and the
  slowest small request meanwhile (the loop blocked: every client waits);
- a body with a lone surrogate escape ("\\ud800") and one nested 100k levels deep: the
  status they get;
- `--idle-connections` TCP connections that send nothing: how many are still open after
  `--idle-wait-s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

PROSE = "the quick brown fox jumps over the lazy dog, hello world! "
SMALL = {"prompt": list(range(20, 28)), "max_tokens": 4, "ignore_eos": True}


async def probe_http(base: str, stop: asyncio.Event, out: list[float]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            start = time.perf_counter()
            async with session.post(f"{base}/v1/completions", json=SMALL) as resp:
                await resp.read()
            out.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)


async def probe_sdk(addr: str, stop: asyncio.Event, out: list[float]) -> None:
    from ferry import AsyncClient

    async with AsyncClient(addr, timeout_s=120) as client:
        while not stop.is_set():
            start = time.perf_counter()
            await client.generate(prompt_token_ids=SMALL["prompt"], max_tokens=4, ignore_eos=True)
            out.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)


async def post(base: str, data: bytes) -> tuple[int, float]:
    import aiohttp

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
            f"{base}/v1/completions", data=data,
            headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - start


async def under_probes(base: str, sdk_addr: str, bodies: list[bytes]) -> dict:
    """Send `bodies` at once while both probes run; statuses, answer times, and the
    slowest probe request meanwhile."""
    stop, http_lat, sdk_lat = asyncio.Event(), [], []
    probes = [asyncio.ensure_future(probe_http(base, stop, http_lat)),
              asyncio.ensure_future(probe_sdk(sdk_addr, stop, sdk_lat))]
    await asyncio.sleep(0.5)
    http_lat.clear()
    sdk_lat.clear()
    results = await asyncio.gather(*[post(base, body) for body in bodies])
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*probes)
    return {
        "statuses": [status for status, _ in results],
        "answered_after_s": round(max(t for _, t in results), 3),
        "slowest_small_http_s": round(max(http_lat), 3),
        "slowest_small_sdk_s": round(max(sdk_lat), 3),
    }


async def idle_connections(port: int, num: int, wait_s: float) -> int:
    """How many of `num` silent connections the server still holds after wait_s."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(num)]
    await asyncio.sleep(wait_s)
    still_open = 0
    for reader, writer in conns:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.01) == b""
        except TimeoutError:
            closed = False  # nothing to read and no EOF: open
        except ConnectionError:
            closed = True
        still_open += not closed
        writer.close()
    return still_open


async def run_all(base: str, sdk_addr: str, port: int, args) -> dict:
    huge = json.dumps({"prompt": PROSE * (10_000_000 // len(PROSE))}).encode()
    out = {"one_10mb_prompt": await under_probes(base, sdk_addr, [huge]),
           "four_10mb_prompts": await under_probes(base, sdk_addr, [huge] * 4)}
    out["lone_surrogate_status"] = (await post(base, b'{"prompt": "hi \\ud800"}'))[0]
    deep = b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out["nested_100k_status"] = (await post(base, deep))[0]
    out[f"idle_connections_open_after_{args.idle_wait_s:g}s"] = await idle_connections(
        port, args.idle_connections, args.idle_wait_s)
    out["idle_connections"] = args.idle_connections
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--idle-wait-s", type=float, default=35.0)
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="passed to `ferry up --gateway-arg` (repeatable)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from ferry.bench.control_plane import write_profile
    from ferry.bench.local_cluster import start_cluster

    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "near-zero.json"
        write_profile(profile)
        extra = ["--executor", "sim", "--sim-profile", str(profile)]
        extra += [f"--gateway-arg={arg}" for arg in args.gateway_arg]
        cluster = start_cluster(Path(tmp), workers=1, extra=tuple(extra))
        try:
            result = asyncio.run(run_all(cluster.base_url, cluster.sdk_addr,
                                         cluster.http_port, args))
        finally:
            cluster.stop()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

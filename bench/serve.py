"""`ferry bench serve --trace F`: replay a trace against a running cluster.

Each trace line becomes one streaming request with `max_tokens = output_tokens` and
ignore_eos, so the lengths are the trace's. Its prompt token ids come from bench/workload.py,
as the simulator's do: `prompt_tokens` ids of its own, after its shared prefix (prefix_id)
or, for a session's later turn, after the conversation so far, the tokens the earlier turns
really generated included; a later turn is sent think_s after the turn before it finished.
Two modes:

    open loop (default)     each request at its arrival time (scaled by --time-scale)
    closed loop             --concurrency N: N clients, each sending the trace's next
                            request (a whole session, turn after turn) as soon as its
                            previous one finished (arrival times ignored): the throughput
                            the cluster sustains at N in flight

Through the SDK (default) or HTTP (`--http URL`; sessions need the SDK, which returns the
generated token ids the next turn's prompt is made of). Prints the results JSON (DESIGN §8,
plus throughput: request_throughput req/s, input_throughput and output_throughput tok/s
over the run) on stdout and a table on stderr, and writes the JSON, with plots, next to
`--out`. The JSON never holds NaN (a statistic of no request is null).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ferry.bench.metrics import RequestRecord, json_safe, request_rows, summarize, throughput
from ferry.bench.sim import load_trace
from ferry.bench.workload import Workload
from ferry.common import env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True)
    parser.add_argument("--sdk-addr", default=env.gateway_sdk_addr())
    parser.add_argument("--http", default="", help="base URL (http://host:8000/v1): use HTTP")
    parser.add_argument("--admin-addr", default=env.scheduler_admin_addr())
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="prompt ids are drawn below this")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="arrival_s and think_s are multiplied by this (0.5: twice the rate)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="closed loop: N requests in flight, each sent when one finishes "
                             "(arrival times ignored); 0: replay the arrival times")
    parser.add_argument("--max-output-tokens", type=int, default=0,
                        help="cap each request's output length (0: the trace's)")
    parser.add_argument("--max-prompt-tokens", type=int, default=0,
                        help="cap each prompt (its first N tokens: shared prefixes stay shared)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt ids (bench/workload.py; the simulator uses 0)")
    parser.add_argument("--out", default="", help="results JSON path (plots beside it)")
    parser.add_argument("--label", default="", help="name of this run in the results")
    parser.add_argument("--no-progress", action="store_true")


async def _one_sdk(client, record: RequestRecord, prompt_ids: list[int], max_tokens: int,
                   timeout_s: float) -> list[int]:
    """Stream one request; its generated token ids."""
    output: list[int] = []
    async for chunk in client.stream(prompt_token_ids=prompt_ids, max_tokens=max_tokens,
                                     temperature=0.0, ignore_eos=True,
                                     priority=record.priority, timeout_s=timeout_s):
        now = time.perf_counter()
        if chunk.token_ids and record.first_token_s is None:
            record.first_token_s = now
        output.extend(chunk.token_ids)
        record.num_output_tokens = len(output)
        if chunk.finish_reason is not None:
            record.finish_s = now
    return output


def http_body(prompt_ids: list[int], max_tokens: int, priority: str) -> dict:
    """The /v1/completions request of one trace line (bench/interop_check.py hands the
    same bodies to a third-party client)."""
    return {"prompt": prompt_ids, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "priority": priority,
            "stream_options": {"include_usage": True}}  # exact token count at the end


async def _one_http(session, url: str, record: RequestRecord, prompt_ids: list[int],
                    max_tokens: int, timeout_s: float) -> None:
    body = http_body(prompt_ids, max_tokens, record.priority)
    async with session.post(f"{url}/completions", json=body, timeout=timeout_s) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("usage"):
                record.num_output_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if record.first_token_s is None:
                    record.first_token_s = now
                if choice.get("finish_reason"):
                    record.finish_s = now


async def replay(args: argparse.Namespace) -> list[RequestRecord]:
    trace = load_trace(args.trace)
    workload = Workload(trace, vocab_size=args.vocab_size, seed=args.seed)
    if args.http and workload.has_sessions:
        raise SystemExit("this trace has multi-turn sessions: a later turn's prompt holds the "
                         "token ids the earlier turns generated, which only the SDK returns "
                         "(drop --http)")
    records: list[RequestRecord] = []
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(trace), unit="req", desc="serve")

    if args.http:
        import aiohttp

        session = aiohttp.ClientSession()
        client = None
    else:
        from ferry import AsyncClient

        client = AsyncClient(args.sdk_addr, timeout_s=args.timeout)
        session = None

    async def run_request(index: int) -> tuple[int, float] | None:
        """Send trace line index and wait for its end; its session's next turn and think
        time, or None."""
        entry = trace[index]
        prompt_ids = workload.prompt(index)
        if args.max_prompt_tokens:
            prompt_ids = prompt_ids[:args.max_prompt_tokens]
        max_tokens = entry["output_tokens"]
        if args.max_output_tokens:
            max_tokens = min(max_tokens, args.max_output_tokens)
        max_tokens = max(1, max_tokens)
        record = RequestRecord(req_id=str(index), priority=entry["priority"],
                               arrival_s=time.perf_counter(), num_prompt_tokens=len(prompt_ids))
        records.append(record)
        output: list[int] = []
        try:
            if client is not None:
                output = await _one_sdk(client, record, prompt_ids, max_tokens, args.timeout)
            else:
                await _one_http(session, args.http.rstrip("/"), record, prompt_ids, max_tokens,
                                args.timeout)
        except Exception as exc:  # record and go on: one failure must not end the run
            record.error = f"{type(exc).__name__}: {exc}"
        if progress is not None:
            progress.update(1)
        if record.error is not None:
            lost = workload.abandoned(index)  # the session ends here: its later turns never come
            if progress is not None:
                progress.update(len(lost))
            return None
        return workload.finished(index, prompt_ids, output)

    async def run_session(index: int) -> None:
        """Request index, then its session's later turns, each think_s (scaled by
        --time-scale) after the one before finished."""
        following = await run_request(index)
        while following is not None:
            index, think_s = following
            await asyncio.sleep(think_s * args.time_scale)
            following = await run_request(index)

    starts = sorted(workload.starts(), key=lambda i: trace[i]["arrival_s"])
    if getattr(args, "concurrency", 0) > 0:  # closed loop
        queue = iter(starts)

        async def client_loop() -> None:
            for index in queue:  # shared: each session is taken once
                await run_session(index)

        tasks = [asyncio.create_task(client_loop()) for _ in range(args.concurrency)]
    else:
        tasks = []
        begin = time.perf_counter()
        for index in starts:
            delay = begin + trace[index]["arrival_s"] * args.time_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run_session(index)))
    await asyncio.gather(*tasks)
    if progress is not None:
        progress.close()
    if client is not None:
        await client.close()
    if session is not None:
        await session.close()
    return records


def cluster_counts(admin_addr: str) -> dict:
    """Migrations, preemptions and instance count from the scheduler (ferry status)."""
    from ferry.common import wire
    from ferry.common.zmq_util import make_context, request

    try:
        reply = asyncio.run(request(make_context(), admin_addr, wire.StatusRequest(),
                                    timeout_s=3.0, expected=(wire.StatusReply,)))
    except TimeoutError:
        return {"num_migrations": 0, "num_preemptions": 0, "num_instances": 0,
                "num_prompt_tokens": 0, "num_prefix_hit_tokens": 0}
    live = [i for i in reply.instances if i.alive]
    return {
        "num_migrations": reply.num_migrations_committed,
        "num_migrations_aborted": reply.num_migrations_aborted,
        "num_preemptions": sum(i.load.num_preemptions for i in reply.instances),
        "num_instances": len(live),
        # prompt tokens admitted and, of those, found in a prefix cache (live instances)
        "num_prompt_tokens": sum(i.load.num_prompt_tokens for i in live),
        "num_prefix_hit_tokens": sum(i.load.num_prefix_hit_tokens for i in live),
        "dispatch_policy": reply.dispatch_policy,
    }


def trace_rate(args: argparse.Namespace) -> float | None:
    """The rate the trace's first requests (sessions' first turns) arrive at, scaled by
    --time-scale, in requests/s; None for fewer than two."""
    trace = load_trace(args.trace)
    starts = sorted(trace[i]["arrival_s"] for i in
                    Workload(trace, vocab_size=args.vocab_size).starts())
    span = (starts[-1] - starts[0]) * args.time_scale if len(starts) > 1 else 0.0
    return (len(starts) - 1) / span if span > 0 else None


def run(args: argparse.Namespace) -> dict:
    before = cluster_counts(args.admin_addr)
    start = time.perf_counter()
    start_unix = time.time()  # the same instant on the clock workers' step logs use
    records = asyncio.run(replay(args))
    duration = time.perf_counter() - start
    after = cluster_counts(args.admin_addr)
    concurrency = getattr(args, "concurrency", 0) or None
    prompt_tokens = after["num_prompt_tokens"] - before["num_prompt_tokens"]
    hit_tokens = after["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"]
    result = summarize(
        records,
        num_migrations=after["num_migrations"] - before["num_migrations"],
        num_preemptions=after["num_preemptions"] - before["num_preemptions"],
        instance_seconds=after["num_instances"] * duration,
        extra={"label": args.label or after.get("dispatch_policy", ""),
               "num_instances": after["num_instances"],
               "mode": "closed_loop" if concurrency else "trace",
               "concurrency": concurrency,
               # the share of the prompt tokens admitted found in a prefix cache (None: the
               # scheduler did not answer); a preempted request admitted again counts twice
               "cache_hit_rate": hit_tokens / prompt_tokens if prompt_tokens > 0 else None,
               **throughput(records),
               "errors": sorted({r.error for r in records if r.error})[:10],
               # request by request, seconds after the replay began; + start_unix: the
               # wall clock of a worker's --step-log lines
               "start_unix": start_unix,
               "requests": request_rows(records, origin_s=start)},
    )
    result = json_safe(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        from ferry.bench.plots import latency_cdfs, run_title

        title = run_title(trace=args.trace, rate=None if concurrency else trace_rate(args),
                          concurrency=concurrency, policy=after.get("dispatch_policy", ""),
                          num_instances=after["num_instances"])
        latency_cdfs({result["label"]: records}, out.with_suffix(".png"), title=title)
    return result


def table(result: dict) -> str:
    """The run in a few lines for people (the JSON is for scripts)."""
    def num(value, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    def p50_p99(key: str, scale: float = 1.0) -> str:
        return f"{num(result[key]['p50'], scale)} / {num(result[key]['p99'], scale)}"

    mode = (f"closed loop, concurrency {result['concurrency']}" if result["concurrency"]
            else "trace replay")
    rows = [
        ("mode", mode),
        ("requests", f"{result['num_requests']} done, {result['num_failed']} failed"),
        ("duration s", num(result["duration_s"])),
        ("throughput req/s", num(result["request_throughput"])),
        ("input tok/s", num(result["input_throughput"], digits=1)),
        ("output tok/s", num(result["output_throughput"], digits=1)),
        ("prefill p50 / p99 s", p50_p99("prefill_latency_s")),
        ("decode p50 / p99 ms", p50_p99("decode_latency_s", 1e3)),
        ("e2e p50 / p99 s", p50_p99("e2e_latency_s")),
        ("prefix cache hit rate", num(result.get("cache_hit_rate"), 100, 1) + " %"),
        ("migrations", str(result["num_migrations"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    result = run(parser.parse_args(argv))
    print(json.dumps(result, indent=1, allow_nan=False))
    print(table(result), file=sys.stderr)


if __name__ == "__main__":
    main()

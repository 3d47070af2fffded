"""`python -m ferry.bench.dispatch_cost`: the scheduler's CPU time per Dispatch of a long
prompt, with the request in one frame (as before: its inbox decoded and type-checked
every token id) and as a header plus a body frame forwarded unread (now).

Per Dispatch, on the scheduler's one thread: `decode` is what its inbox does (strict
decoding of the frames, as `Inbox.accept`), `handle` adds the placement
(`SchedulerCore.dispatch` onto one registered instance, then its Release). The worker
decodes the whole request either way (`worker`: its inbox, then the body). "before"
decodes the pre-split layout (tag 10, the request's fields in one frame) with the same
codec; both run in the same process, one after the other, on CPU time of this thread
(`time.thread_time`), the median of `--rounds` rounds of `--repeat` Dispatches each.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.common import wire
from ferry.common.codec import DEFAULT_MAX_FRAME_BYTES, Registry
from ferry.common.config import Endpoint, SchedulerConfig
from ferry.common.logging import configure
from ferry.common.prefix_hash import block_hashes
from ferry.common.sampling import SamplingParams
from ferry.services.scheduler.core import SchedulerCore

VOCAB = 128_256  # Llama 3's
BLOCK_SIZE = 16
PREFIX_SEED = 0x5EED

# The pre-split layout (DESIGN §3 before the header/body split), for the baseline only.
BEFORE = Registry()
BEFORE.struct(SamplingParams, min_fields=8)


@BEFORE.message(10)
@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchBefore:
    req_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int
    reply_addr: wire.DialAddr
    arrival_s: float
    attempt: int = 0
    prefix_hashes: tuple[int, ...] = ()

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def request(req_id: str, prompt_tokens: int, rng: random.Random) -> wire.DispatchBody:
    return wire.DispatchBody(
        req_id=req_id, attempt=0,
        prompt_token_ids=tuple(rng.randrange(VOCAB) for _ in range(prompt_tokens)),
        output_token_ids=(),
        sampling=SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, seed=1234),
        arrival_s=time.time())


def frames_of(body: wire.DispatchBody, *, before: bool) -> list[bytes]:
    hashes = tuple(block_hashes(body.prompt_token_ids, BLOCK_SIZE, parent=PREFIX_SEED))
    if before:
        return BEFORE.encode(DispatchBefore(
            req_id=body.req_id, prompt_token_ids=body.prompt_token_ids,
            output_token_ids=body.output_token_ids, sampling=body.sampling, priority=0,
            reply_addr="tcp://gateway-0:5602", arrival_s=body.arrival_s,
            attempt=body.attempt, prefix_hashes=hashes))
    return wire.encode(wire.Dispatch.of(body, priority=0, reply_addr="tcp://gateway-0:5602",
                                        prefix_hashes=hashes))


def placing_core() -> SchedulerCore:
    ep = Endpoint(bind="tcp://127.0.0.1:0", advertise="tcp://127.0.0.1:0")
    core = SchedulerCore(SchedulerConfig(inbox=ep, admin=ep, startup_grace_s=0.0,
                                         hold_until_room=False), epoch="bench")
    core.register(wire.Register(instance_id="w0", inbox_addr="tcp://worker-0:5700",
                                num_blocks=100_000, block_size=BLOCK_SIZE,
                                max_model_len=131_072, req_ids=(), prefix_seed=PREFIX_SEED),
                  0.0)
    return core


def per_op_us(op: Callable[[], Any], repeat: int, rounds: int) -> float:
    """Median over rounds of the CPU time per call, microseconds."""
    op()  # warm
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(repeat):
            op()
        samples.append((time.thread_time() - start) / repeat * 1e6)
    return statistics.median(samples)


def measure(prompt_tokens: int, repeat: int, rounds: int) -> dict:
    body = request("r0", prompt_tokens, random.Random(0))
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens}
    for before in (True, False):
        frames = frames_of(body, before=before)
        codec, cls = (BEFORE, DispatchBefore) if before else (wire.REGISTRY, wire.Dispatch)
        core = placing_core()

        def decode(frames=frames, codec=codec, cls=cls) -> Any:
            return codec.decode(frames, (cls,), DEFAULT_MAX_FRAME_BYTES)

        def handle(decode=decode, core=core, frames=frames) -> None:
            msg = decode()
            assert core.dispatch(msg, now=1.0, payload=frames) == "w0"
            core.release(wire.Release(req_id=msg.req_id, reason="finished"))

        def worker(decode=decode, before=before) -> Any:
            msg = decode()
            return msg if before else wire.decode_body(msg, DEFAULT_MAX_FRAME_BYTES)

        out["before" if before else "after"] = {
            "frame_bytes": [len(f) for f in frames[1:]],
            "scheduler_decode_us": per_op_us(decode, repeat, rounds),
            "scheduler_handle_us": per_op_us(handle, repeat, rounds),
            "worker_decode_us": per_op_us(worker, repeat, rounds),
        }
    b, a = out["before"], out["after"]
    out["scheduler_handle_speedup"] = b["scheduler_handle_us"] / a["scheduler_handle_us"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32_768, 1024])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    configure("bench", level="warning")  # the scheduler core logs each placement at info
    results = [measure(n, args.repeat, args.rounds) for n in args.prompt_tokens]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("scheduler CPU per Dispatch (µs; thread time, median of rounds):")
    for r in results:
        for when in ("before", "after"):
            m = r[when]
            print(f"  {r['prompt_tokens']:>6} tokens {when:<6} decode {m['scheduler_decode_us']:8.1f}"
                  f"  decode+place {m['scheduler_handle_us']:8.1f}   worker decode "
                  f"{m['worker_decode_us']:8.1f}   frames {m['frame_bytes']} B")
        print(f"  {r['prompt_tokens']:>6} tokens: scheduler {r['scheduler_handle_speedup']:.1f}x "
              "less CPU per Dispatch")


if __name__ == "__main__":
    main()

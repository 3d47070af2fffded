"""In-process cluster of engines + migration coordinators (and prefix pulls), without
sockets.

Messages between coordinators go through the real codec (encode -> decode) and are
delivered on the event loop; KV moves over real gloo groups. Each node steps its engine
in its own task, like the worker's step loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from ferry.common import wire
from ferry.common.config import Endpoint, EngineConfig, WorkerConfig
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.migration.coordinator import MigrationCoordinator
from ferry.services.worker.migration.kv_transfer import KVTransport
from ferry.services.worker.migration.prefix_pull import PULL_MESSAGES, PrefixPulls
from tests.unit.fakes import TokenKVExecutor

SCHEDULER = "inproc://scheduler"


class Network:
    """Routes messages by address; `drop(addr, types)` loses messages to simulate a
    dead or stalled peer."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.done: list[wire.MigrationDone] = []
        self.pulls_done: list[wire.PullDone] = []
        self.dropping: dict[str, tuple[type, ...]] = {}
        self.delay_s = 0.0

    def send(self, addr: str, msg: Any) -> None:
        decoded = wire.decode(wire.encode(msg))
        if addr == SCHEDULER:
            if isinstance(decoded, wire.MigrationDone):
                self.done.append(decoded)
            if isinstance(decoded, wire.PullDone):
                self.pulls_done.append(decoded)
            return
        if isinstance(decoded, self.dropping.get(addr, ())):
            return
        node = self.nodes[addr]
        loop = asyncio.get_running_loop()
        if self.delay_s:
            loop.call_later(self.delay_s, node.deliver, decoded)
        else:
            loop.call_soon(node.deliver, decoded)


class Node:
    def __init__(self, net: Network, name: str, *, num_blocks: int, budget: int,
                 block_size: int = 4, executor: type = TokenKVExecutor,
                 **worker_kw: Any) -> None:
        self.name = name
        self.addr = f"inproc://{name}"
        self.engine = Engine(
            executor(num_blocks=num_blocks, block_size=block_size),
            EngineConfig(max_num_batched_tokens=budget, max_num_seqs=64),
        )
        config = WorkerConfig(
            instance_id=name,
            inbox=Endpoint(bind=self.addr, advertise=self.addr),
            scheduler_addr=SCHEDULER,
            model="fake",
            **{"migration_timeout_s": 5.0, "migration_stage_limit": 4,
               "migration_last_stage_blocks": 1, "migration_verify_kv": True, **worker_kw},
        )
        kv = KVTransport(self.engine.executor.kv_cache, instance_id=name,
                         advertise_host="127.0.0.1", chunk_bytes=config.migration_chunk_bytes,
                         timeout_s=config.migration_timeout_s)
        self.coordinator = MigrationCoordinator(
            config=config, engine=self.engine, send=net.send, on_request_placed=lambda: None,
            kv=kv)
        self.pulls = PrefixPulls(config=config, engine=self.engine, kv=kv, send=net.send,
                                 run_dispatch=self.dispatch,
                                 group_locks=self.coordinator.prealloc_locks)
        self.outputs: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.step_delay_s = 0.002
        self.paused_steps = False
        self.on_output: Callable[[Node, Any], None] | None = None
        net.nodes[self.addr] = self

    def dispatch(self, msg: wire.Dispatch) -> None:
        """What the worker does with a Dispatch (forwarded, or after its prefix pull)."""
        body = wire.decode_body(msg)
        assert msg.mismatch(body) is None
        self.engine.add_request(msg.req_id, body.prompt_token_ids, body.sampling,
                                output_token_ids=body.output_token_ids, reply_addr=msg.reply_addr,
                                attempt=msg.attempt, arrival_s=body.arrival_s)

    def deliver(self, msg: Any) -> None:
        if isinstance(msg, wire.Dispatch):
            return self.dispatch(msg)
        if isinstance(msg, wire.PullPrefix):
            return self.pulls.start(msg)
        if isinstance(msg, PULL_MESSAGES):
            return self.pulls.handle(msg)
        if isinstance(msg, wire.Abort):
            self.coordinator.cancel_request(msg.req_id, reason=msg.reason)
            out = self.engine.abort(msg.req_id)
            if out is not None:
                self._record([out])
            return
        self.coordinator.handle(msg)

    async def step_loop(self) -> None:
        while True:
            if self.engine.has_unfinished() and not self.paused_steps:
                outs = self.engine.step()
                self._record(outs)
                self.coordinator.after_step(outs)
                self.engine.check_invariants()
            await asyncio.sleep(self.step_delay_s)

    def _record(self, outs) -> None:
        for out in outs:
            if self.on_output:
                self.on_output(self, out)
            self.outputs.setdefault(out.req_id, [])
            self.outputs[out.req_id].append((out.first_index, out.token_ids))
            if out.finish_reason:
                self.reasons[out.req_id] = out.finish_reason


class Gateway:
    """Merges the streams of every node like the gateway does: by index, each once."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.logprobs: dict[str, list] = {}  # req_id -> TokenLogprobs by index (if asked)
        self.finished: dict[str, str] = {}
        self.num_duplicates = 0

    def on_output(self, node: Node, out) -> None:
        got = self.tokens.setdefault(out.req_id, [])
        if out.logprobs:
            assert len(out.logprobs) == len(out.token_ids)
            logprobs = self.logprobs.setdefault(out.req_id, [])
            logprobs[out.first_index:] = out.logprobs
        for i, token in enumerate(out.token_ids, start=out.first_index):
            if i < len(got):
                assert got[i] == token, f"{out.req_id}: index {i} differs between instances"
                self.num_duplicates += 1
            else:
                assert i == len(got), f"{out.req_id}: gap before index {i}"
                got.append(token)
        if out.finish_reason:
            self.finished.setdefault(out.req_id, out.finish_reason)


_ids = itertools.count()


def migrate(net: Network, src: Node, dst: Node, req_id: str | None) -> str:
    migration_id = f"m{next(_ids)}"
    src.deliver(wire.MigrateOut(migration_id=migration_id, dst_instance_id=dst.name,
                                dst_inbox_addr=dst.addr, req_id=req_id))
    return migration_id


async def wait_pull(net: Network, pull_id: str, timeout_s: float = 10.0) -> wire.PullDone:
    for _ in range(int(timeout_s / 0.005)):
        for done in net.pulls_done:
            if done.pull_id == pull_id:
                return done
        await asyncio.sleep(0.005)
    raise AssertionError(f"pull {pull_id} did not finish")


async def wait_done(net: Network, migration_id: str, timeout_s: float = 10.0) -> wire.MigrationDone:
    for _ in range(int(timeout_s / 0.005)):
        for done in net.done:
            if done.migration_id == migration_id:
                return done
        await asyncio.sleep(0.005)
    raise AssertionError(f"migration {migration_id} did not finish")


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.002)):
        if predicate():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def seeded(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=seed, ignore_eos=True)


def reference_tokens(prompt: list[int], sampling: SamplingParams,
                     executor: type = TokenKVExecutor) -> list[int]:
    engine = Engine(executor(num_blocks=512, block_size=4),
                    EngineConfig(max_num_batched_tokens=4096))
    return engine.generate([prompt], dataclasses.replace(sampling))[0]

"""The worker process loop (services/worker/main.py) with the sim executor and real ZMQ
sockets on loopback: which copy of a request it keeps (dispatch attempts), aborts meant for
another copy, a gateway gone, and messages that must not stop it (bad addresses, a step
that takes seconds)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import torch
import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.config import Endpoint, EngineConfig, WorkerConfig
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.latency_model import LatencyModel
from ferry.services.worker.main import Worker
from ferry.services.worker.runner import PendingTokens
from ferry.services.worker.sampler import SamplerOutput
from ferry.services.worker.sim_executor import SimExecutor
from ferry.services.worker.stepper import make_stepper
from tests.e2e.test_gateway_harness import free_ports, tcp, wait_until
from tests.unit.fakes import TokenKVExecutor

STEP_S = 0.002  # every simulated step


def sim_engine(num_blocks: int = 256) -> Engine:
    latency = LatencyModel(base_s=STEP_S, per_prefill_token_s=0.0, per_prefill_attn_s=0.0,
                           per_decode_seq_s=0.0, per_decode_context_s=0.0)
    executor = SimExecutor(latency, num_blocks=num_blocks, block_size=16, vocab_size=1000,
                           sleep=False)
    return Engine(executor, EngineConfig(max_num_batched_tokens=512))


class Peers:
    """The worker's surroundings: a gateway and a scheduler inbox (PULL), and a PUSH into
    the worker's inbox."""

    def __init__(self) -> None:
        ports = free_ports(3)
        self.gateway_addr, self.scheduler_addr, self.worker_addr = (tcp(p) for p in ports)
        ctx = zmq.asyncio.Context.instance()
        self.gateway = ctx.socket(zmq.PULL)
        self.gateway.bind(self.gateway_addr)
        self.scheduler = ctx.socket(zmq.PULL)
        self.scheduler.bind(self.scheduler_addr)
        self.to_worker = ctx.socket(zmq.PUSH)
        self.to_worker.connect(self.worker_addr)
        self.tokens: dict[tuple[str, int], list] = {}  # (req_id, attempt) -> Tokens
        self.errors: dict[str, wire.RequestError] = {}  # req_id -> its RequestError
        self.reader = asyncio.get_running_loop().create_task(self.read())

    async def read(self) -> None:
        while True:
            msg = wire.decode(await self.gateway.recv_multipart())
            if isinstance(msg, wire.Tokens):
                self.tokens.setdefault((msg.req_id, msg.attempt), []).append(msg)
            elif isinstance(msg, wire.RequestError):
                self.errors[msg.req_id] = msg

    async def send(self, msg) -> None:
        await self.to_worker.send_multipart(wire.encode(msg))

    def finish_of(self, req_id: str, attempt: int) -> str | None:
        msgs = self.tokens.get((req_id, attempt), [])
        return msgs[-1].finish_reason if msgs else None

    def close(self) -> None:
        self.reader.cancel()
        for sock in (self.gateway, self.scheduler, self.to_worker):
            sock.close(linger=0)


def dispatch(peers: Peers, req_id: str, *, attempt: int = 0, max_tokens: int = 400,
             reply_addr: str | None = None) -> wire.Dispatch:
    return wire.Dispatch.of(wire.DispatchBody(
        req_id=req_id, attempt=attempt, prompt_token_ids=tuple(range(1, 33)),
        output_token_ids=(), sampling=SamplingParams(max_tokens=max_tokens, seed=1,
                                                     ignore_eos=True),
        arrival_s=time.time()), priority=0, reply_addr=reply_addr or peers.gateway_addr)


def run(body, **config_fields) -> None:
    async def main():
        peers = Peers()
        config = WorkerConfig(
            instance_id="w0", inbox=Endpoint(bind=peers.worker_addr, advertise=peers.worker_addr),
            scheduler_addr=peers.scheduler_addr, model="tiny", executor="sim",
            report_interval_s=0.05, **config_fields)
        worker = Worker(config, sim_engine())
        task = asyncio.get_running_loop().create_task(worker.run())
        try:
            await asyncio.wait_for(body(peers, worker), 30)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
            peers.close()

    asyncio.run(main())


def test_a_newer_attempt_replaces_the_copy_and_an_older_one_is_ignored():
    async def body(peers: Peers, worker: Worker) -> None:
        await peers.send(dispatch(peers, "r0", attempt=0))
        await wait_until(lambda: ("r0", 0) in peers.tokens)
        await peers.send(dispatch(peers, "r0", attempt=2))  # replayed twice meanwhile
        await wait_until(lambda: ("r0", 2) in peers.tokens)
        assert worker.engine.get("r0").attempt == 2
        await peers.send(dispatch(peers, "r0", attempt=1))  # late: ignored
        await peers.send(dispatch(peers, "r0", attempt=2))  # duplicate: ignored
        await asyncio.sleep(0.1)
        assert worker.engine.get("r0").attempt == 2 and len(worker.engine.requests) == 1
        # the replaced copy ended silently: no "abort" for anyone to deliver
        assert peers.finish_of("r0", 0) is None

    run(body)


def test_register_and_reports_carry_the_model_name_and_the_queue_time_histogram():
    async def body(peers: Peers, worker: Worker) -> None:
        register = wire.decode(await peers.scheduler.recv_multipart())
        assert isinstance(register, wire.Register)
        assert register.model_name == "tiny-test"
        bounds = register.queue_time_bounds_s
        assert bounds == worker.engine.scheduler.queue_time.bounds and len(bounds) > 4
        await peers.send(dispatch(peers, "r0", max_tokens=4))
        await wait_until(lambda: peers.finish_of("r0", 0) == "length")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            report = wire.decode(await peers.scheduler.recv_multipart())
            # the counters are totals: wait for the report that follows the 4th token
            if (isinstance(report, wire.LoadReport) and report.queue_time_counts[-1] == 1
                    and report.load.num_generation_tokens == 4):
                break
        assert len(report.queue_time_counts) == len(bounds) + 1
        assert 0 <= report.queue_time_sum_s < 5
        assert report.load.num_generation_tokens == 4

    run(body, model_name="tiny-test")


def test_the_default_model_name_is_the_gateways():
    from ferry.services.worker.entry import default_model_name

    assert default_model_name("tiny") == "tiny"
    assert default_model_name("/srv/models/Llama-3-8B/") == "Llama-3-8B"
    assert default_model_name("random:llama3-8b") == "llama3-8b"


def test_an_abort_for_another_attempt_leaves_the_copy_running():
    async def body(peers: Peers, worker: Worker) -> None:
        await peers.send(dispatch(peers, "r0", attempt=1))
        await wait_until(lambda: ("r0", 1) in peers.tokens)
        await peers.send(wire.Abort(req_id="r0", reason="stale copy", attempt=0))
        await asyncio.sleep(0.1)
        assert worker.engine.get("r0") is not None
        await peers.send(wire.Abort(req_id="r0", reason="client gone", attempt=1))
        await wait_until(lambda: worker.engine.get("r0") is None)
        assert peers.finish_of("r0", 1) == "abort"

    run(body)


def test_gateway_gone_drops_its_requests_and_frees_their_blocks():
    async def body(peers: Peers, worker: Worker) -> None:
        other = tcp(free_ports(1)[0])  # another gateway's inbox (nobody listens: fine)
        for req_id, reply in (("gw1-aa-0", None), ("gw1-aa-1", None), ("gw1-bb-0", None),
                              ("gw2-cc-0", other)):
            await peers.send(dispatch(peers, req_id, reply_addr=reply))
        await wait_until(lambda: len(worker.engine.requests) == 4)
        await peers.send(wire.GatewayGone(inbox_addr=peers.gateway_addr, req_id_prefix="gw1-aa-"))
        await wait_until(lambda: set(worker.engine.requests) == {"gw1-bb-0", "gw2-cc-0"})
        for req_id in ("gw1-bb-0", "gw2-cc-0"):
            worker.engine.abort(req_id)
        assert worker.engine.blocks.num_available == worker.engine.blocks.num_total
        assert peers.finish_of("gw1-aa-0", 0) is None  # dropped without output

    run(body)


def test_bad_addresses_never_stop_the_worker():
    """A Dispatch with a reply address no socket can dial is refused when decoded; a send
    that fails anyway (an address from configuration) is counted, not raised."""
    async def body(peers: Peers, worker: Worker) -> None:
        await peers.send(dispatch(peers, "bad", reply_addr="tcp://bad"))  # encodes unchecked
        worker._send("tcp://bad", wire.Abort(req_id="x", reason="y"))
        assert worker.num_send_failed == 1
        await peers.send(dispatch(peers, "good", max_tokens=5))
        await wait_until(lambda: peers.finish_of("good", 0) == "length")
        assert worker.recv_from_peers.num_rejected == 1 and worker.engine.get("bad") is None

    run(body)


def test_a_dispatch_body_that_is_not_its_headers_request_is_refused():
    """The scheduler places by the header and forwards the body unread: the worker decodes
    the body, and refuses (a RequestError to the gateway, for the header's attempt) one
    that is malformed or another request's; nothing of it runs, the worker serves on."""
    async def body(peers: Peers, worker: Worker) -> None:
        good = dispatch(peers, "good", attempt=1, max_tokens=5)
        request = wire.decode_body(good)

        def with_body(header_req_id: str, /, **fields) -> wire.Dispatch:
            forged = dataclasses.replace(request, **fields)
            return dataclasses.replace(good, req_id=header_req_id,
                                       body=wire.encode_body(forged))

        cases = {
            "garbage": dataclasses.replace(good, req_id="garbage", body=b"\xc1\xc1"),
            "str-token": with_body("str-token", req_id="str-token",
                                   prompt_token_ids=(1, "two") + request.prompt_token_ids[2:]),
            "other-req": with_body("other-req", req_id="someone-else"),
            "other-attempt": with_body("other-attempt", req_id="other-attempt", attempt=0),
            "longer": with_body("longer", req_id="longer",
                                prompt_token_ids=request.prompt_token_ids + (7,)),
        }
        for msg in cases.values():
            await peers.send(msg)
        await wait_until(lambda: set(peers.errors) == set(cases))
        for err in peers.errors.values():
            assert err.code == 400 and err.attempt == 1, err
            assert err.message.startswith("Dispatch body refused: "), err
        assert "malformed msgpack" in peers.errors["garbage"].message
        assert "prompt_token_ids[]: expected int" in peers.errors["str-token"].message
        assert "'someone-else' attempt 1" in peers.errors["other-req"].message
        assert "attempt 0 under the header of 'other-attempt' attempt 1" in (
            peers.errors["other-attempt"].message)
        assert "33 tokens under a header of 32" in peers.errors["longer"].message
        assert worker.engine.requests == {} and worker.recv_from_peers.num_rejected == 0
        assert worker.num_dispatch_received == len(cases)  # seen: the scheduler counts them
        await peers.send(good)
        await wait_until(lambda: peers.finish_of("good", 1) == "length")

    run(body)


class SlowCpuExecutor(TokenKVExecutor):
    """A CPU "model" whose forward pass takes `step_s` inside launch, like a long prefill."""

    device = torch.device("cpu")

    def __init__(self, step_s: float) -> None:
        super().__init__(num_blocks=64, block_size=4)
        self.step_s = step_s

    def launch(self, batch) -> PendingTokens:
        time.sleep(self.step_s)  # holds no lock the event loop needs
        return PendingTokens(SamplerOutput(torch.tensor(self.execute(batch), dtype=torch.int64)),
                             None)


def test_a_long_cpu_step_does_not_stall_the_event_loop():
    """The loop sends the heartbeats (load reports): a 1 s step must not silence them."""
    async def main():
        engine = Engine(SlowCpuExecutor(step_s=1.0), EngineConfig(max_num_batched_tokens=64))
        engine.add_request("r0", list(range(1, 9)), SamplingParams(max_tokens=1))
        ticks = []

        async def tick():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        ticker = asyncio.get_running_loop().create_task(tick())
        outputs = await make_stepper(engine).step()
        ticker.cancel()
        assert [o.req_id for o in outputs] == ["r0"]
        gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
        assert len(ticks) >= 10 and max(gaps) < 0.5, gaps

    asyncio.run(main())

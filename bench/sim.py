"""`ferry bench sim`: discrete-event simulation of a Ferry cluster on a virtual clock.

What is real: the scheduler core (dispatch policy, load accounting, migration pairing,
auto-scaling decisions), each instance's engine (local scheduler, block manager,
preemption), the per-request migration choice, and the migration protocol (the worker's
own state machines, services/worker/migration/machine.py). What is modelled: model
compute (the sim executor's latency model from a profile), and KV copy time (bytes /
bandwidth plus a per-stage overhead, from the migration benchmark) for migrations and
prefix pulls. Both use the real block managers: a migration's destination claims the
leading blocks it caches and only the rest is copied (dedup); a pull pins the source's
cached blocks for the copy, reserves the destination's, and registers them there as
cached on arrival.

Events on one heap, ordered by (time, sequence):
    arrival       a trace request reaches the scheduler (dispatch)
    step_done     an instance finished a step (tokens recorded, next step scheduled)
    report        every instance reports its load (every report_interval_s)
    rebalance     the scheduler's migration hooks run (every migration_interval_s)
    autoscale     the autoscaler decides (every second, when enabled)
    stage_done    a migration's copy stage finished, or a queued request's commit arrived
    pull_done     a prefix pull's copy finished (the request is queued at its destination)
    started       a scaled-up instance finished starting
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.bench.metrics import RequestRecord, json_safe, request_rows, stats, summarize
from ferry.bench.trace import read_jsonl
from ferry.bench.workload import Workload
from ferry.common import wire
from ferry.common.config import Endpoint, EngineConfig, SchedulerConfig
from ferry.common.logging import configure
from ferry.common.prefix_hash import block_hashes
from ferry.common.sampling import SamplingParams
from ferry.services.scheduler.autoscale import Drain, autoscale_round, make_autoscaler
from ferry.services.scheduler.core import Pending, SchedulerCore
from ferry.services.scheduler.dispatch import MIGRATING_POLICIES, POLICY_NAMES, PULL_OVERHEAD_S
from ferry.services.scheduler.provisioner import WorkerHandle
from ferry.services.worker import report
from ferry.services.worker.engine.batch import ModelBatch
from ferry.services.worker.engine.engine import Engine, RequestRejected
from ferry.services.worker.engine.request import Status
from ferry.services.worker.engine.scheduler import StepPlan
from ferry.services.worker.latency_model import Profile, StepFeatures, bundled_profile
from ferry.services.worker.migration import machine
from ferry.services.worker.migration.choice import CHOICES, pick_request
from ferry.services.worker.migration.machine import Incoming, Outgoing
from ferry.services.worker.sim_executor import SimExecutor

GATEWAY = "sim-gateway"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationCost:
    bandwidth_bytes_s: float = 300e9  # bulk KV copy rate between instances
    stage_overhead_s: float = 0.5e-3  # control round trip + launch per stage
    final_overhead_s: float = 1.0e-3  # pause -> commit on top of the last copy
    stage_limit: int = 8
    last_stage_blocks: int = 2
    max_per_instance: int = 2
    pull_overhead_s: float = PULL_OVERHEAD_S  # a prefix pull's control messages


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A request's way through the processes around the engine, which the engine's steps
    do not include: `in_s` from the client's send to the worker's inbox (gateway,
    scheduler, two ZMQ hops), `out_s` from the end of the step that made a token to the
    client (worker -> gateway -> client). A client sees both on its first token, and a
    multi-turn session's next turn leaves out_s later than the engine finished the turn.
    Measured in situ by experiments/sim_check.py (experiments/request_compare.py); zero
    unless given."""

    in_s: float = 0.0
    out_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> RequestPath:
        """'IN,OUT' in milliseconds."""
        try:
            in_ms, out_ms = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"request path {text!r}: expected IN_MS,OUT_MS") from None
        if not (0 <= in_ms < 60_000 and 0 <= out_ms < 60_000):
            raise ValueError(f"request path {text!r}: each in [0, 60000) ms")
        return cls(in_ms / 1e3, out_ms / 1e3)


@dataclass(slots=True)
class SimInstance:
    instance_id: str
    engine: Engine
    executor: SimExecutor
    started_s: float
    stopped_s: float | None = None
    busy: bool = False  # a step is in flight
    draining: bool = False
    drain_ordered_s: float | None = None  # when the autoscaler drained it
    num_dispatched: int = 0
    num_reports: int = 0
    num_migrations_in: int = 0
    num_migrations_out: int = 0
    num_pulls_in: int = 0  # prefix pulls copying into it now

    @property
    def alive(self) -> bool:
        return self.stopped_s is None


@dataclass(slots=True)
class SimMigration:
    """One migration: the protocol's two machines (migration/machine.py), driven here with
    messages delivered at once and copies timed by the cost model."""

    migration_id: str
    src: SimInstance
    dst: SimInstance
    req_id: str
    out: Outgoing  # the source's machine
    inc: Incoming | None = None  # the destination's, from its MigPrealloc on
    paused_s: float | None = None
    receiving: bool = False  # a stage is being copied: dst handles its next message after
    to_dst: list[Any] = field(default_factory=list)  # messages waiting for that


@dataclass(slots=True)
class SimPull:
    msg: wire.PullPrefix
    src: SimInstance
    dst: SimInstance
    own_block_ids: list[int]  # dst's cached leading blocks, claimed during the copy
    pinned: list[int]  # the source's blocks being read (claimed)
    body: wire.DispatchBody  # the request (the sim keeps bodies decoded)


@dataclass(order=True, slots=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(compare=False, default=None)


class Simulator:
    def __init__(
        self,
        trace: list[dict],
        *,
        profile: Profile,
        num_instances: int,
        policy: str,
        kv_blocks: int = 0,
        engine_config: EngineConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        migration: MigrationCost | None = None,
        autoscale: bool = False,
        startup_s: float = 10.0,
        report_interval_s: float = 0.05,
        ignore_priority: bool = False,
        migration_choice: str = "relief",
        step_spread_seed: int | None = 0,
        request_path: RequestPath | None = None,
        distinct_prompts: bool = False,
    ) -> None:
        self.trace = trace
        self.path = request_path or RequestPath()
        # Step times spread as the profile's measured spread says (LatencyModel
        # decode_spread / prefill_noise_s; none: deterministic), drawn from this seed.
        self.step_spread = None if step_spread_seed is None else random.Random(step_spread_seed)
        self.migration_choice = migration_choice  # the source's rule (migration/choice.py)
        self.profile = profile
        self.kv_blocks = kv_blocks or profile.num_blocks
        # Prompts from the trace's prefixes and sessions (bench/workload.py), the same the
        # load driver sends; a trace without them gets one repeated token (the lengths
        # are all that matter there), and then the prefix cache stays off (every prompt
        # would be a prefix of every longer one). distinct_prompts: such a trace gets
        # distinct prompts too, as the load driver sends them, and the prefix cache stays
        # on, as in a real worker: a preempted request's recompute then finds the blocks
        # of its own that are still cached.
        self.workload = Workload(trace, vocab_size=profile.vocab_size)
        self.real_prompts = distinct_prompts or self.workload.has_structure
        self.engine_config = engine_config or EngineConfig()
        if not self.real_prompts:
            self.engine_config = dataclasses.replace(self.engine_config,
                                                     enable_prefix_cache=False)
        self.prompts: dict[str, list[int]] = {}  # req_id -> prompt (sessions continue it)
        self.outputs: dict[str, list[int]] = {}  # req_id -> tokens made (sessions only)
        endpoint = Endpoint(bind="sim", advertise="sim")
        self.migration = migration or MigrationCost()
        self.cfg = scheduler_config or SchedulerConfig(
            inbox=endpoint, admin=endpoint, dispatch_policy=policy,
            kv_bandwidth_bytes_s=self.migration.bandwidth_bytes_s)
        self.cfg = dataclasses.replace(self.cfg, dispatch_policy=policy, autoscale=autoscale)
        # The simulated scheduler never restarts: no start-up grace to wait out.
        self.core = SchedulerCore(dataclasses.replace(self.cfg, startup_grace_s=0.0), epoch="sim")
        self.core.see_gateway(GATEWAY, 0.0)
        self.autoscaler = make_autoscaler(self.cfg) if autoscale else None
        self.startup_s = startup_s
        self.ignore_priority = ignore_priority  # schedule all as normal (labels kept)
        self.report_interval_s = report_interval_s
        self.now = 0.0
        self.events: list[Event] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.instances: dict[str, SimInstance] = {}
        self.records: dict[str, RequestRecord] = {}
        self.migrations: dict[str, SimMigration] = {}
        self.num_committed = 0
        self.num_aborted = 0
        self.num_migration_blocks = 0  # copied by committed migrations
        self.num_migration_blocks_skipped = 0  # cached at their destinations already
        self.num_pulls = 0
        self.num_pulls_ok = 0
        self.num_pull_blocks = 0
        self.pull_fail_reasons: dict[str, int] = {}
        self.num_ended = 0  # requests finished or rejected
        self.num_scale_ups = 0
        for _ in range(num_instances):
            self._start_instance()

    # ---- event plumbing -------------------------------------------------------------------

    def _at(self, time_s: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, Event(time_s, next(self._seq), kind, payload))

    def run(self) -> dict:
        for i in self.workload.starts():  # a session's later turns follow its earlier ones
            self._at(float(self.trace[i]["arrival_s"]), "arrival", (i, self.trace[i]))
        self._at(0.0, "report")
        if self.cfg.enable_migration:
            self._at(self.cfg.migration_interval_s, "rebalance")
        if self.autoscaler:
            self._at(1.0, "autoscale")
        handlers = {
            "arrival": self._on_arrival, "step_done": self._on_step_done,
            "report": self._on_report, "rebalance": self._on_rebalance,
            "autoscale": self._on_autoscale, "stage_done": self._on_stage_done,
            "pull_done": self._on_pull_done, "started": self._on_started,
            "at_scheduler": self._on_at_scheduler,
        }
        while self.events and self.num_ended < len(self.trace):
            event = heapq.heappop(self.events)
            self.now = event.time
            handlers[event.kind](event.payload)
        return self._result()

    # ---- instances --------------------------------------------------------------------

    def _start_instance(self, delay_s: float = 0.0) -> str:
        instance_id = f"i{next(self._ids)}"
        executor = SimExecutor.from_profile(self.profile, num_blocks=self.kv_blocks, sleep=False)
        inst = SimInstance(instance_id, Engine(executor, self.engine_config), executor,
                           started_s=self.now)
        self.instances[instance_id] = inst
        if delay_s:
            inst.stopped_s = math.inf  # not serving until "started"
            self._at(self.now + delay_s, "started", inst)
        else:
            self._register(inst)
        return instance_id

    def _on_started(self, inst: SimInstance) -> None:
        inst.stopped_s = None
        self._register(inst)

    # Register and LoadReport as a worker builds them (services/worker/report.py). A request
    # waiting for its prefix pull is not listed as held: a pull here lasts milliseconds,
    # far under the scheduler's phantom age.

    def _register(self, inst: SimInstance) -> None:
        self._apply(self.core.register(report.register(
            inst.engine, instance_id=inst.instance_id, inbox_addr=inst.instance_id,
            kv_block_bytes=inst.executor.kv_block_bytes, pulling={}), self.now))
        self._report(inst)

    def _report(self, inst: SimInstance) -> None:
        inst.num_reports += 1
        self._apply(self.core.load_report(report.load_report(
            inst.engine, instance_id=inst.instance_id, inbox_addr=inst.instance_id,
            seq=inst.num_reports, report_interval_s=self.report_interval_s,
            num_dispatch_received=inst.num_dispatched,
            num_migrations_in=inst.num_migrations_in, num_migrations_out=inst.num_migrations_out,
            draining=inst.draining, pulling={}), self.now))

    def _kick(self, inst: SimInstance) -> None:
        """Start a step if the instance is idle and has work: the engine's step sequence
        (services/worker/stepper.py) with the modelled step time on the event clock."""
        if inst.busy or not inst.alive or not inst.engine.has_unfinished():
            return
        plan = inst.engine.schedule()
        if plan.is_empty:
            return
        batch = plan.batch
        step_s = 0.0
        if batch is not None:
            features, latency = StepFeatures.of(batch), inst.executor.latency
            step_s = (latency.step_time(features) if self.step_spread is None else
                      latency.drawn_step_time(features, self.step_spread.random()))
        inst.busy = True
        self._at(self.now + step_s, "step_done", (inst, plan, batch, step_s))

    def _on_step_done(self, payload: tuple[SimInstance, StepPlan, ModelBatch | None, float]
                      ) -> None:
        inst, plan, batch, step_s = payload
        inst.busy = False
        sampled = inst.executor.execute(batch) if batch is not None else []
        seen_s = self.now + self.path.out_s  # when the client has these tokens
        for out in inst.engine.finish_step(plan, sampled, step_s):
            record = self.records[out.req_id]
            if out.token_ids and record.first_token_s is None:
                record.first_token_s = seen_s
            record.num_output_tokens = out.first_index + len(out.token_ids)
            if out.req_id in self.outputs:
                self.outputs[out.req_id].extend(out.token_ids)
            if out.finish_reason is not None:
                record.finish_s = seen_s
                self.num_ended += 1
                self._apply(self.core.release(wire.Release(req_id=out.req_id,
                                                           reason="finished")))
                self._next_turn(out.req_id)
        self._kick(inst)

    # ---- requests ---------------------------------------------------------------------

    def _on_arrival(self, payload: tuple[int, dict]) -> None:
        """The client sends trace line index; it reaches the scheduler (and, placed, its
        instance) the request path's in_s later."""
        index, entry = payload
        req_id = f"r{index}"
        priority = wire.Priority.parse(entry.get("priority", "normal"))
        if self.real_prompts:
            prompt = self.prompts[req_id] = self.workload.prompt(index)
            self.outputs[req_id] = []
        else:
            prompt = [1] * int(entry["prompt_tokens"])
        self.records[req_id] = RequestRecord(
            req_id=req_id, priority=priority.name.lower(), arrival_s=self.now,
            num_prompt_tokens=len(prompt))
        payload = (index, entry, prompt, priority)
        if self.path.in_s > 0:
            self._at(self.now + self.path.in_s, "at_scheduler", payload)
        else:
            self._on_at_scheduler(payload)

    def _on_at_scheduler(self, payload: tuple[int, dict, list[int], wire.Priority]) -> None:
        """The request reaches the scheduler, which places it (the whole in_s is spent
        before the placement: the scheduler's hop to the worker is folded into it)."""
        index, entry, prompt, priority = payload
        req_id = f"r{index}"
        view = self.core.instance_view()  # how the gateway would hash it
        body = wire.DispatchBody(
            req_id=req_id, attempt=0, prompt_token_ids=tuple(prompt), output_token_ids=(),
            sampling=SamplingParams(max_tokens=max(1, int(entry["output_tokens"])),
                                    ignore_eos=True, seed=index),
            arrival_s=self.records[req_id].arrival_s)
        dispatch = wire.Dispatch.of(
            body, priority=0 if self.ignore_priority else int(priority), reply_addr=GATEWAY,
            prefix_hashes=tuple(block_hashes(prompt, view.block_size, parent=view.prefix_seed))
            if view.prefix_seed else ())
        # The body travels as the payload (a process keeps the frames there): the engine
        # takes it as the worker would after decoding it.
        chosen = self.core.dispatch(dispatch, now=self.now, payload=body)
        if isinstance(chosen, wire.DispatchRejected):
            self._rejected(chosen)
        elif not isinstance(chosen, Pending):  # pending: placed by _release_pending
            self._deliver(chosen, dispatch, body)

    def _next_turn(self, req_id: str) -> None:
        """A session's turn ended: its next turn arrives after the think time."""
        if req_id not in self.outputs:
            return
        index = int(req_id[1:])
        nxt = self.workload.finished(index, self.prompts.pop(req_id), self.outputs.pop(req_id))
        if nxt is not None:  # the think time starts when the client has the last token
            self._at(self.now + self.path.out_s + nxt[1], "arrival",
                     (nxt[0], self.trace[nxt[0]]))

    def _rejected(self, msg: wire.DispatchRejected) -> None:
        self._failed(msg.req_id, msg.message)

    def _failed(self, req_id: str, error: str) -> None:
        """req_id ends with an error; its session's later turns never come."""
        self.records[req_id].error = error
        self.num_ended += 1
        for index in self.workload.abandoned(int(req_id[1:])):
            self.records[f"r{index}"] = RequestRecord(
                req_id=f"r{index}", priority="normal", arrival_s=self.now,
                num_prompt_tokens=0, error=f"its session ended early: {error}")
            self.num_ended += 1

    def _deliver(self, instance_id: str, dispatch: wire.Dispatch,
                 body: wire.DispatchBody) -> None:
        """The request reaches its instance (the frames the scheduler forwards, or a
        PullPrefix carrying them)."""
        pull = self.core.pull_for(dispatch)
        if pull is not None:
            return self._start_pull(self.instances[instance_id], pull, body)
        self._add(self.instances[instance_id], dispatch, body)

    def _add(self, inst: SimInstance, dispatch: wire.Dispatch,
             body: wire.DispatchBody) -> None:
        """The request reaches its instance's engine."""
        inst.num_dispatched += 1
        req_id = dispatch.req_id
        try:
            inst.engine.add_request(req_id, body.prompt_token_ids, body.sampling,
                                    priority=dispatch.priority, arrival_s=body.arrival_s)
        except RequestRejected as err:
            self._failed(req_id, err.message)
            self._apply(self.core.release(wire.Release(req_id=req_id, reason="error")))
            return
        self._kick(inst)

    # ---- prefix pulls (services/worker/migration/prefix_pull.py, modelled) --------------

    def _start_pull(self, dst: SimInstance, msg: wire.PullPrefix,
                    body: wire.DispatchBody) -> None:
        """dst claims what it caches of the prefix, reserves the rest, and the source pins
        its cached run of it (its evicted tail is not copied) for the copy's duration."""
        self.num_pulls += 1
        hashes = list(msg.block_hashes)
        own = dst.engine.blocks.match(hashes)
        dst.engine.blocks.claim(own)
        pull = SimPull(msg, self.instances[msg.src_instance_id], dst, own, [], body)
        if len(own) >= len(hashes):
            return self._end_pull(pull, "")
        if not dst.engine.blocks.reserve(msg.pull_id, len(hashes) - len(own)):
            return self._end_pull(pull, "no memory")
        if not pull.src.alive:
            return self._end_pull(pull, "source gone")
        pull.pinned = pull.src.engine.blocks.match(hashes)[len(own):]
        if not pull.pinned:
            return self._end_pull(pull, "source has none: not cached here (evicted)")
        pull.src.engine.blocks.claim(pull.pinned)
        dst.num_pulls_in += 1
        copy_s = (self.migration.pull_overhead_s + len(pull.pinned)
                  * pull.src.executor.kv_block_bytes / self.migration.bandwidth_bytes_s)
        self._at(self.now + copy_s, "pull_done", pull)

    def _on_pull_done(self, pull: SimPull) -> None:
        """The blocks arrived: registered at dst as cached (then idle, for the request to
        claim), the source's pins dropped."""
        dst, blocks = pull.dst, pull.dst.engine.blocks
        dst.num_pulls_in -= 1
        received = blocks.take_reserved(pull.msg.pull_id, len(pull.pinned))
        for block_id, block_hash in zip(received, pull.msg.block_hashes[len(pull.own_block_ids):],
                                        strict=False):
            blocks.register(block_id, block_hash)
        blocks.free(received[::-1])
        pull.src.engine.blocks.free(pull.pinned)
        self.num_pull_blocks += len(received)
        self._end_pull(pull, "")

    def _end_pull(self, pull: SimPull, reason: str) -> None:
        """Queue the request at dst whatever happened (a failed pull: it computes the
        prefix), and report the outcome."""
        blocks = pull.dst.engine.blocks
        blocks.release_reservation(pull.msg.pull_id)
        blocks.free(pull.own_block_ids[::-1])
        if reason:
            self.pull_fail_reasons[reason] = self.pull_fail_reasons.get(reason, 0) + 1
        else:
            self.num_pulls_ok += 1
        self._apply(self.core.pull_done(wire.PullDone(
            pull_id=pull.msg.pull_id, req_id=pull.msg.dispatch.req_id,
            src_instance_id=pull.src.instance_id, dst_instance_id=pull.dst.instance_id,
            ok=not reason, reason=reason, num_blocks=0 if reason else len(pull.pinned),
            num_cached_blocks=len(pull.own_block_ids), num_bytes=0, copy_s=0.0, total_s=0.0)))
        self._add(pull.dst, pull.msg.dispatch, pull.body)

    def _release_pending(self) -> None:
        placed, out = self.core.release_pending(self.now)
        for one in placed:
            self._deliver(one.instance_id, one.req, one.payload)
        for _, msg in out:
            self._rejected(msg)

    # ---- periodic ---------------------------------------------------------------------

    def _on_report(self, _: Any) -> None:
        for inst in self.instances.values():
            if inst.alive:
                self._report(inst)
        if self.core.pending:
            self._release_pending()
        if self._unfinished():
            self._at(self.now + self.report_interval_s, "report")

    def _on_rebalance(self, _: Any) -> None:
        self._apply(self.core.rebalance(self.now))
        if self._unfinished():
            self._at(self.now + self.cfg.migration_interval_s, "rebalance")

    def _on_autoscale(self, _: Any) -> None:
        out, actions = autoscale_round(self.autoscaler, self.core, self, self.now)
        for action in actions:
            if isinstance(action, Drain):
                self.instances[action.instance_id].drain_ordered_s = self.now
        self._apply(out)
        if self._unfinished():
            self._at(self.now + 1.0, "autoscale")

    # The autoscaler's provisioner (services/scheduler/autoscale.py Provisioner).

    def start_worker(self) -> WorkerHandle:
        self.num_scale_ups += 1
        return WorkerHandle(self._start_instance(delay_s=self.startup_s), pid=0)

    def stop_worker(self, instance_id: str, *, now: float) -> bool:
        """Only an instance with nothing left stops (the scheduler's estimate may lag)."""
        inst = self.instances[instance_id]
        if not inst.alive or inst.engine.has_unfinished() or inst.num_pulls_in:
            return False
        inst.stopped_s = now
        return True

    def _unfinished(self) -> bool:
        return self.num_ended < len(self.trace)

    # ---- scheduler output -------------------------------------------------------------

    def _apply(self, out: list[tuple[str, Any]]) -> None:
        for addr, msg in out:
            if isinstance(msg, wire.MigrateOut):
                self._migrate_out(self.instances[addr], msg)
            elif isinstance(msg, wire.SetDraining):
                self.instances[addr].draining = msg.draining
            elif isinstance(msg, wire.Abort) and addr in self.instances:
                self.instances[addr].engine.abort(msg.req_id)
            # Placement, InstanceView, InstanceDown, ReRegister: nothing to simulate.

    # ---- migrations (the real protocol's machines, with modelled copy times) ------------

    def _migrate_out(self, src: SimInstance, msg: wire.MigrateOut) -> None:
        dst = self.instances.get(msg.dst_instance_id)
        busy = {m.req_id for m in self.migrations.values() if m.src is src}
        req_id = msg.req_id or pick_request(src.engine, busy, dst_free_blocks=msg.dst_free_blocks,
                                            choice=self.migration_choice)
        cost = self.migration
        reason = None
        if dst is None or not dst.alive:
            reason = "destination gone"
        elif req_id is None or src.engine.get(req_id) is None:
            reason = "no request to migrate"
        elif src.num_migrations_out >= cost.max_per_instance:
            reason = "too many migrations out"
        elif dst.num_migrations_in >= cost.max_per_instance:
            reason = "too many migrations into the destination"
        if reason is not None:
            return self._done(msg.migration_id, src, dst, req_id or "", False, reason, 0, 0)
        out = Outgoing(
            migration_id=msg.migration_id, req_id=req_id, src_instance_id=src.instance_id,
            src_inbox_addr=src.instance_id, kv_block_bytes=src.executor.kv_block_bytes,
            block_size=src.engine.blocks.block_size, stage_limit=cost.stage_limit,
            last_stage_blocks=cost.last_stage_blocks)
        mig = SimMigration(msg.migration_id, src, dst, req_id, out)
        self.migrations[mig.migration_id] = mig
        src.num_migrations_out += 1
        dst.num_migrations_in += 1
        self._src_ops(mig, out.start(src.engine.get(req_id),
                                     src.engine.computed_hashes(req_id), group_id=""))

    def _src_ops(self, mig: SimMigration, ops: list) -> None:
        """Run the source machine's ops (as outgoing.py does with sockets and NCCL)."""
        src, cost = mig.src, self.migration
        for op in ops:
            if isinstance(op, machine.Send):
                self._to_dst(mig, op.msg)
            elif isinstance(op, machine.Copy):
                overhead_s = cost.final_overhead_s if op.final else cost.stage_overhead_s
                copy_s = (len(op.block_ids) * src.executor.kv_block_bytes
                          / cost.bandwidth_bytes_s + overhead_s)
                self._at(self.now + copy_s, "stage_done", (mig, op.stage_index))
            elif isinstance(op, machine.WaitStepBoundary):
                # Modelled as now: the sim pauses between its step events.
                self._src_ops(mig, mig.out.step_boundary(src.engine.get(mig.req_id)))
            elif isinstance(op, machine.Pause):
                src.engine.pause(mig.req_id)
                mig.paused_s = self.now
            elif isinstance(op, machine.Commit):
                commit = wire.MigCommit(migration_id=mig.migration_id, kv_checksum=None,
                                        state=src.engine.export_state(mig.req_id))
                if mig.receiving:  # sent with the last stage: handled after its blocks
                    self._to_dst(mig, commit)
                else:  # a queued request: the state alone, after the pause's overhead
                    self._at(self.now + cost.final_overhead_s, "stage_done", (mig, commit))
            elif isinstance(op, machine.Resume):
                req = src.engine.get(mig.req_id)
                if req is not None and req.status is Status.PAUSED:
                    src.engine.resume(mig.req_id)
            elif isinstance(op, machine.Remove):
                src.engine.remove(mig.req_id)
            elif isinstance(op, machine.Done):
                self._end_migration(mig, op)
            # Join: no KV group to join here.

    def _dst_ops(self, mig: SimMigration, ops: list) -> None:
        """Run the destination machine's ops (as incoming.py does)."""
        dst = mig.dst
        for op in ops:
            if isinstance(op, machine.Send):
                self._src_ops(mig, mig.out.message(op.msg, mig.src.engine.get(mig.req_id)))
            elif isinstance(op, machine.Recv):
                mig.receiving = True  # its copy ends at the source's stage_done
            elif isinstance(op, machine.Import):
                dst.engine.import_request(op.state, mig.inc.prealloc.prompt_token_ids,
                                          list(op.block_ids))
                # Acked at once: no failure can follow a commit here, so the source lets go
                # of the request as it is adopted.
                self._dst_ops(mig, mig.inc.stepped(self.now, self.now))
            elif isinstance(op, machine.Remove) and dst.engine.get(mig.req_id) is not None:
                dst.engine.remove(mig.req_id)

    def _to_dst(self, mig: SimMigration, msg: Any) -> None:
        """Deliver a source message; one arriving during a stage's copy waits for it."""
        if mig.receiving and not isinstance(msg, wire.MigAbort):
            mig.to_dst.append(msg)
        elif isinstance(msg, wire.MigPrealloc):
            mig.inc = Incoming(msg, mig.dst.engine.blocks)
            self._dst_ops(mig, mig.inc.reserve() or mig.inc.opened(group_id="", store_addr=""))
        elif mig.inc is not None:
            self._dst_ops(mig, mig.inc.message(msg))

    def _on_stage_done(self, payload: tuple[SimMigration, Any]) -> None:
        """A stage's copy ended (the destination acks, the source goes on), or a queued
        request's commit arrives."""
        mig, what = payload
        if mig.migration_id not in self.migrations:
            return
        if isinstance(what, wire.MigCommit):
            return self._to_dst(mig, what)
        mig.receiving = False
        self._dst_ops(mig, mig.inc.received(what))
        self._src_ops(mig, mig.out.copied(mig.src.engine.get(mig.req_id)))
        while mig.to_dst and not mig.receiving and mig.migration_id in self.migrations:
            self._to_dst(mig, mig.to_dst.pop(0))

    def _end_migration(self, mig: SimMigration, done: machine.Done) -> None:
        src, dst = mig.src, mig.dst
        self.migrations.pop(mig.migration_id, None)
        src.num_migrations_out -= 1
        dst.num_migrations_in -= 1
        if done.committed:
            self.num_migration_blocks += mig.out.num_blocks_copied
            self.num_migration_blocks_skipped += mig.out.num_blocks_skipped
            self._done(mig.migration_id, src, dst, mig.req_id, True, "", mig.out.num_stages,
                       self.now - (mig.paused_s or self.now))
            self._kick(dst)
        else:
            self._done(mig.migration_id, src, dst, mig.req_id, False, done.reason,
                       mig.out.num_stages, 0)
        self._kick(src)

    def _done(self, migration_id, src, dst, req_id, committed, reason, stages, downtime_s):
        if committed:
            self.num_committed += 1
        else:
            self.num_aborted += 1
        self._apply(self.core.migration_done(wire.MigrationDone(
            migration_id=migration_id, req_id=req_id, src_instance_id=src.instance_id,
            dst_instance_id=dst.instance_id if dst else "", committed=committed, reason=reason,
            num_stages=stages, num_blocks=0, num_bytes=0, total_s=0.0, downtime_s=downtime_s)))

    # ---- result -----------------------------------------------------------------------

    def _result(self) -> dict:
        end = self.now
        instance_seconds = sum(
            (min(i.stopped_s, end) if i.stopped_s not in (None, math.inf) else end) - i.started_s
            for i in self.instances.values())
        preemptions = sum(i.engine.scheduler.num_preemptions for i in self.instances.values())
        return summarize(list(self.records.values()), num_migrations=self.num_committed,
                         num_preemptions=preemptions, instance_seconds=instance_seconds,
                         extra={"num_migrations_aborted": self.num_aborted,
                                "abort_reasons": dict(self.core.counters.abort_reasons),
                                "num_migration_blocks_sent": self.num_migration_blocks,
                                "num_migration_blocks_skipped":
                                    self.num_migration_blocks_skipped,
                                "num_pulls": self.num_pulls,
                                "num_pulls_ok": self.num_pulls_ok,
                                "num_pulls_failed": self.num_pulls - self.num_pulls_ok,
                                "num_pull_blocks": self.num_pull_blocks,
                                "pull_fail_reasons": dict(self.pull_fail_reasons),
                                "num_instances_max": self._peak_instances(end),
                                **self._cache_stats(),
                                "mean_instances": instance_seconds / end if end else 0.0,
                                **self._scale_stats(end),
                                "sim_end_s": end})

    def _cache_stats(self) -> dict:
        """Prefix cache: prompt tokens admitted, found cached, the share (all instances)."""
        loads = [i.engine.load() for i in self.instances.values()]
        prompt = sum(load.num_prompt_tokens for load in loads)
        hit = sum(load.num_prefix_hit_tokens for load in loads)
        return {"prefix_cache": self.engine_config.enable_prefix_cache,
                "num_prompt_tokens": prompt, "num_prefix_hit_tokens": hit,
                "cache_hit_rate": hit / prompt if prompt else None}

    def _peak_instances(self, end: float) -> int:
        """Most instances paid for at once (starting, serving or draining)."""
        changes = sorted(
            [(i.started_s, 1) for i in self.instances.values()]
            + [(min(i.stopped_s, end), -1) for i in self.instances.values()
               if i.stopped_s not in (None, math.inf)])
        running = peak = 0
        for _, delta in changes:  # at equal times stops (-1) sort first
            running += delta
            peak = max(peak, running)
        return peak

    def _scale_stats(self, end: float) -> dict:
        """Scale events, and how long each drain took (order -> stop; a drain still going at
        the end counts up to the end)."""
        drains = [i for i in self.instances.values() if i.drain_ordered_s is not None]
        drain_s = [(i.stopped_s if i.stopped_s is not None else end) - i.drain_ordered_s
                   for i in drains]
        return {"num_scale_ups": self.num_scale_ups, "num_drains": len(drains),
                "drain_s": stats(drain_s), "drain_instance_seconds": sum(drain_s)}


def load_trace(path: str | Path) -> list[dict]:
    """A trace file's requests as dicts (bench/trace.py's format, checked there)."""
    try:
        return [req.as_json() for req in read_jsonl(Path(path).read_text().splitlines())]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _request_path(text: str) -> RequestPath:
    try:
        return RequestPath.parse(text)
    except ValueError as err:  # argparse shows this message, not a generic one
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="JSONL trace (ferry bench trace)")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--policy", default="llumnix",
                        choices=POLICY_NAMES)
    parser.add_argument("--profile", default=str(bundled_profile("llama2-7b-h200")),
                        help="a profile JSON, or a bundled profile's name: llama2-7b-h200, "
                             "llama3-8b-h200 (timed on a grid), llama3-8b-h200-serving, "
                             "llama3-8b-h100-serving, llama2-7b-h100-serving (fitted to a "
                             "serving worker's steps; services/worker/profiles)")
    parser.add_argument("--kv-blocks", type=int, default=0,
                        help="KV blocks per instance (default: the profile's)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--no-migration", action="store_true")
    parser.add_argument("--migrate-out-threshold", type=float, default=None)
    parser.add_argument("--migration-interval-s", type=float, default=None)
    parser.add_argument("--migrate-dst-growth-blocks", type=int, default=None,
                        help="blocks per running request a destination keeps after a move")
    parser.add_argument("--max-migrations-per-instance", type=int, default=None)
    parser.add_argument("--hold-until-room", action="store_true",
                        help="the scheduler holds requests no instance has room for "
                             "(services/scheduler/pending.py). Off here, on in a real "
                             "scheduler (SchedulerConfig.hold_until_room): give it to "
                             "simulate a cluster as `ferry up` runs it")
    parser.add_argument("--pending-max-wait-s", type=float, default=None)
    parser.add_argument("--headroom-blocks", type=int, default=0,
                        help="high-priority headroom in virtual usage; > 0 also packs "
                        "high-priority requests onto few instances (llumnix)")
    parser.add_argument("--ignore-priority", action="store_true",
                        help="schedule every request as normal (results still by class)")
    parser.add_argument("--migration-bandwidth-gbs", type=float, default=300.0,
                        help="KV copy rate between instances (migrations, prefix pulls); "
                        "ferry's pull decision assumes it too")
    parser.add_argument("--no-prefix-pull", action="store_true",
                        help="ferry places without prefix pulls")
    parser.add_argument("--migration-choice", choices=CHOICES, default="relief",
                        help="which request a source moves (services/worker/migration/choice.py)")
    parser.add_argument("--step-spread-seed", type=int, default=0,
                        help="seed of the step times' spread, where the profile has one "
                             "(fitted from a worker's step log: ferry profile "
                             "--from-step-log)")
    parser.add_argument("--no-step-spread", action="store_true",
                        help="every step takes the modelled time exactly")
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="a trace without shared prefixes or sessions gets distinct "
                             "prompts and the prefix cache on, as a real worker serves it "
                             "(default: one repeated token, the cache off; faster)")
    parser.add_argument("--request-path-ms", type=_request_path, default=RequestPath(),
                        metavar="IN,OUT",
                        help="a request's way to the worker and its tokens' way back to the "
                             "client, ms (sim_check measures them; default 0,0)")
    parser.add_argument("--autoscale", action="store_true")
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--scale-up-freeness", type=float, default=None)
    parser.add_argument("--scale-down-freeness", type=float, default=None)
    parser.add_argument("--scale-cooldown-s", type=float, default=None)
    parser.add_argument("--startup-s", type=float, default=10.0,
                        help="seconds a scaled-up instance takes to start")
    parser.add_argument("--out", default="", help="write the result JSON here")
    parser.add_argument("--requests-out", default="",
                        help="write each request's times here (JSON, as `ferry bench serve` "
                             "keeps them: columns and rows, seconds of simulated time)")


def run(args: argparse.Namespace) -> dict:
    endpoint = Endpoint(bind="sim", advertise="sim")
    overrides = {k: v for k, v in {
        "migrate_out_threshold": args.migrate_out_threshold,
        "migrate_dst_growth_blocks": args.migrate_dst_growth_blocks,
        "migration_interval_s": args.migration_interval_s,
        "max_migrations_per_instance": args.max_migrations_per_instance,
        "pending_max_wait_s": args.pending_max_wait_s,
        "scale_up_freeness": args.scale_up_freeness,
        "scale_down_freeness": args.scale_down_freeness,
        "scale_cooldown_s": args.scale_cooldown_s}.items() if v is not None}
    cfg = SchedulerConfig(inbox=endpoint, admin=endpoint, dispatch_policy=args.policy,
                          # The baselines (round_robin as in vLLM, least_load as INFaaS++,
                          # prefix_affinity as llm-d) place each request once; llumnix and
                          # ferry migrate (as SchedulerCore does).
                          enable_migration=(args.policy in MIGRATING_POLICIES
                                            and not args.no_migration),
                          prefix_pull=not args.no_prefix_pull,
                          kv_bandwidth_bytes_s=args.migration_bandwidth_gbs * 1e9,
                          high_priority_headroom_blocks=args.headroom_blocks,
                          hold_until_room=args.hold_until_room,
                          min_workers=args.min_workers, max_workers=args.max_workers,
                          **overrides)
    trace = load_trace(args.trace)
    try:
        profile = Profile.load(args.profile)
    except ValueError as err:
        raise SystemExit(f"ferry bench sim: {err}") from None
    start = time.perf_counter()
    sim = Simulator(
        trace, profile=profile, num_instances=args.instances,
        policy=args.policy, kv_blocks=args.kv_blocks,
        engine_config=EngineConfig(max_num_seqs=args.max_num_seqs,
                                   max_num_batched_tokens=args.max_num_batched_tokens),
        scheduler_config=cfg,
        migration=MigrationCost(bandwidth_bytes_s=args.migration_bandwidth_gbs * 1e9,
                                max_per_instance=cfg.max_migrations_per_instance),
        autoscale=args.autoscale, startup_s=args.startup_s,
        ignore_priority=args.ignore_priority, migration_choice=args.migration_choice,
        step_spread_seed=None if args.no_step_spread else args.step_spread_seed,
        request_path=args.request_path_ms, distinct_prompts=args.distinct_prompts)
    result = sim.run()
    result["wall_s"] = time.perf_counter() - start
    result["config"] = {"trace": str(args.trace), "instances": args.instances,
                        "policy": args.policy, "profile": Path(args.profile).name,
                        "kv_blocks": sim.kv_blocks, "autoscale": args.autoscale,
                        "migration": cfg.enable_migration,
                        "prefix_pull": args.policy == "ferry" and cfg.prefix_pull,
                        "migration_bandwidth_gbs": args.migration_bandwidth_gbs}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.requests_out:
        rows = request_rows(sim.records.values(), origin_s=0.0)
        Path(args.requests_out).write_text(json.dumps(json_safe(rows)) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench sim", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure("sim", level="warning")  # the scheduler core logs each decision at info
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()

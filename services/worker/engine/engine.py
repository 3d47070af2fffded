"""The engine core: block manager + local scheduler + an executor, with no sockets.

Step API for the worker process: `add_request / step / abort`, `load()` for reports, and
the hooks live migration needs (`pause / resume / export_state / remove / import_request`).
`generate()` runs prompts to completion for offline use.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import replace

from ferry.common import wire
from ferry.common.config import EngineConfig
from ferry.common.prefix_hash import seed_hash
from ferry.common.sampling import MAX_SEED, SamplingParams
from ferry.services.worker.engine.batch import Executor
from ferry.services.worker.engine.block_manager import BlockManager
from ferry.services.worker.engine.request import Request, RequestOutput, Status
from ferry.services.worker.engine.scheduler import LocalScheduler, StepPlan

# Weight of the newest sample in the step-time moving average.
STEP_TIME_EWMA_ALPHA = 0.2
# A step feeding at least this many prompt tokens updates the prefill rate estimate
# (smaller ones measure the step's fixed cost more than the tokens).
PREFILL_RATE_MIN_TOKENS = 64


class RequestRejected(Exception):
    """The engine can't take this request; `code` is HTTP-like (400 bad, 429 queue full)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Engine:
    def __init__(self, executor: Executor, config: EngineConfig | None = None, *,
                 model_identity: str = "") -> None:
        """model_identity: what makes this model's KV differ from another's for the same
        tokens (its name, weights); the prefix cache's hash chain starts from it."""
        self.executor = executor
        self.config = config or EngineConfig()
        self.blocks = BlockManager(executor.num_blocks, executor.block_size)
        self.scheduler = LocalScheduler(
            self.config,
            self.blocks,
            eos_token_ids=executor.eos_token_ids,
            max_model_len=executor.max_model_len,
            prefix_seed=seed_hash(model_identity) if self.config.enable_prefix_cache else None,
        )
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.step_time_ewma_s = 0.0
        self.prefill_tokens_per_s = 0.0  # EWMA over steps with enough prompt tokens
        self.num_steps = 0
        self._seeds = random.Random()

    # ---- step API -------------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: tuple[int, ...] | list[int],
        sampling: SamplingParams,
        *,
        priority: int = 0,
        output_token_ids: tuple[int, ...] | list[int] = (),
        arrival_s: float | None = None,
        reply_addr: str = "",
        attempt: int = 0,
    ) -> None:
        """Queue a request. output_token_ids are outputs generated before (failure replay):
        they count towards max_tokens and are not emitted again. reply_addr and attempt are
        opaque here: they travel with the request's outputs."""
        if req_id in self.requests:
            raise RequestRejected(400, f"request {req_id} already exists")
        sampling.validate()
        prompt_token_ids = tuple(prompt_token_ids)
        num_tokens = len(prompt_token_ids) + len(output_token_ids)
        if not prompt_token_ids:
            raise RequestRejected(400, "prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.executor.vocab_size]
        bad += [t for t in sampling.logit_bias_token_ids if t >= self.executor.vocab_size]
        if bad:
            raise RequestRejected(400, f"token id {bad[0]} is outside the vocabulary")
        if sampling.has_grammar and not getattr(self.executor, "supports_grammar", False):
            raise RequestRejected(400, "structured output needs the model's tokenizer, which "
                                       "this worker does not have")
        if num_tokens >= self.executor.max_model_len:
            raise RequestRejected(
                400,
                f"prompt of {num_tokens} tokens leaves no room in the model's context of "
                f"{self.executor.max_model_len}",
            )
        if self.blocks.blocks_for(num_tokens + 1) > self.blocks.num_total:
            raise RequestRejected(400, f"prompt of {num_tokens} tokens exceeds the KV cache")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise RequestRejected(429, "engine queue is full")
        if sampling.seed is None:
            sampling = replace(sampling, seed=self._seeds.randrange(MAX_SEED))
        req = Request(
            req_id=req_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            priority=priority,
            arrival_s=time.time() if arrival_s is None else arrival_s,
            reply_addr=reply_addr,
            attempt=attempt,
            output_token_ids=list(output_token_ids),
            num_delivered=len(output_token_ids),
            queued_s=time.monotonic(),
        )
        self.requests[req_id] = req
        self.scheduler.add(req)

    def step(self) -> list[RequestOutput]:
        """Run one batch in place; return new tokens (and finishes) per request. The step
        sequence (services/worker/stepper.py): schedule(), the executor runs plan.batch,
        finish_step(); the worker awaits the executor, the simulator advances its clock."""
        plan = self.schedule()
        if plan.is_empty:
            return []
        batch = plan.batch
        start = time.perf_counter()
        sampled = self.executor.execute(batch) if batch is not None else []
        return self.finish_step(plan, sampled, time.perf_counter() - start)

    def schedule(self) -> StepPlan:
        """First half of a step: what runs (plan.batch). An empty plan has nothing to run
        or finish."""
        return self.scheduler.schedule()

    def finish_step(
        self, plan: StepPlan, sampled: list[int], step_time_s: float
    ) -> list[RequestOutput]:
        """Second half of a step: record the sampled tokens (one per sampling chunk, in
        order) and the step's time (the executor's run: measured, or modelled)."""
        self._record_step_time(step_time_s)
        self._record_prefill_rate(plan, step_time_s)
        outputs = self.scheduler.update(plan, sampled)
        for out in outputs:
            if out.finish_reason is not None:
                del self.requests[out.req_id]
        return outputs

    def _record_step_time(self, seconds: float) -> None:
        self.num_steps += 1
        if self.num_steps == 1:
            self.step_time_ewma_s = seconds
        else:
            a = STEP_TIME_EWMA_ALPHA
            self.step_time_ewma_s = a * seconds + (1 - a) * self.step_time_ewma_s

    def _record_prefill_rate(self, plan: StepPlan, seconds: float) -> None:
        """Prompt tokens per second of the steps that fed many (the whole step's time, a
        decode batch sharing it included: what a new prompt would see)."""
        num_prefill = sum(len(c.token_ids) for c in plan.chunks if not c.is_decode)
        if num_prefill < PREFILL_RATE_MIN_TOKENS or seconds <= 0:
            return
        rate = num_prefill / seconds
        a = STEP_TIME_EWMA_ALPHA
        self.prefill_tokens_per_s = (rate if not self.prefill_tokens_per_s
                                     else a * rate + (1 - a) * self.prefill_tokens_per_s)

    def abort(self, req_id: str) -> RequestOutput | None:
        """Abort wherever the request is; None if unknown (already finished)."""
        out = self.scheduler.abort(req_id)
        if out is not None:
            del self.requests[req_id]
        return out

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def load(self, *, num_migrations_in: int = 0, num_migrations_out: int = 0,
             draining: bool = False) -> wire.LoadFields:
        """The engine's load as a LoadReport carries it; the worker adds what only it knows
        (its migrations in flight, draining)."""
        sched = self.scheduler
        head = sched.waiting[0] if sched.waiting else None
        head_demand = 0 if head is None else self.blocks.blocks_for(head.num_tokens + 1)
        waiting_demand = sum(self.blocks.blocks_for(r.num_tokens + 1) for r in sched.waiting)
        high = [r for r in sched.running if r.priority > 0]
        high += [r for r in sched.paused.values() if r.priority > 0]
        return wire.LoadFields(
            num_total_blocks=self.blocks.num_total,
            num_free_blocks=self.blocks.num_available,
            num_reserved_blocks=self.blocks.num_reserved,
            num_running=len(sched.running) + len(sched.paused),
            num_waiting=len(sched.waiting),
            head_demand_blocks=head_demand,
            waiting_demand_blocks=waiting_demand,
            used_blocks_high=sum(len(r.block_ids) for r in high),
            num_running_high=len(high),
            num_preemptions=sched.num_preemptions,
            step_time_ewma_s=self.step_time_ewma_s,
            num_cached_blocks=self.blocks.num_evictable,
            num_prompt_tokens=sched.num_admitted_tokens,
            num_prefix_hit_tokens=sched.num_hit_tokens,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            pending_prefill_tokens=sched.pending_prefill_tokens(),
            num_generation_tokens=sched.num_generated_tokens,
            num_migrations_in=num_migrations_in,
            num_migrations_out=num_migrations_out,
            draining=draining,
        )

    def check_invariants(self) -> None:
        """Block pools consistent, and every block accounted to exactly one holder."""
        self.blocks.check()
        holders = Counter(b for r in self.requests.values() for b in r.block_ids)
        for block_id, num in holders.items():
            if num > 1:  # only a cached prefix block is shared, one reference per table
                assert self.blocks.is_cached(block_id), f"block {block_id} shared, not cached"
            assert self.blocks.ref_count(block_id) >= num, f"block {block_id} under-counted"
        for req in self.requests.values():
            assert len(req.block_ids) >= self.blocks.blocks_for(req.num_computed_tokens)
            if req.status is Status.WAITING:
                assert not req.block_ids and req.num_computed_tokens == 0

    # ---- offline ----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]] | list[tuple[int, ...]],
        sampling: SamplingParams | list[SamplingParams],
    ) -> list[list[int]]:
        """Run prompts to completion; return each one's output token ids, in order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [f"gen-{self.num_steps}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {req_id: [] for req_id in ids}
        for i, (req_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
            self.add_request(req_id, prompt, params[i], arrival_s=float(i))
        while any(req_id in self.requests for req_id in ids):
            for out in self.step():
                results[out.req_id].extend(out.token_ids)
        return [results[req_id] for req_id in ids]

    # ---- live migration hooks -------------------------------------------------------

    def get(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def pause(self, req_id: str) -> Request:
        """Out of the batch, blocks kept (the final migration stage)."""
        return self.scheduler.pause(req_id)

    def resume(self, req_id: str) -> None:
        self.scheduler.resume(req_id)

    def export_state(self, req_id: str) -> wire.RequestState:
        """What a migration carries to recreate the request elsewhere (all but the prompt,
        which travels earlier, with MigPrealloc)."""
        req = self.requests[req_id]
        return wire.RequestState(
            req_id=req.req_id,
            output_token_ids=tuple(req.output_token_ids),
            num_delivered=req.num_delivered,
            sampling=req.sampling,
            priority=req.priority,
            reply_addr=req.reply_addr,
            arrival_s=req.arrival_s,
            num_computed_tokens=req.num_computed_tokens,
            num_preemptions=req.num_preemptions,
            attempt=req.attempt,
            # The gateway keeps the count of the first output it gets (index 0): after
            # that it need not travel.
            num_cached_prompt_tokens=(req.num_cached_prompt_tokens if req.num_delivered == 0
                                      else None),
        )

    def computed_hashes(self, req_id: str) -> list[int]:
        """Prefix hashes of the request's computed full blocks ([] without a prefix cache)."""
        return self.scheduler.computed_hashes(self.requests[req_id])

    def remove(self, req_id: str) -> None:
        """The request now lives on another instance: free its blocks, emit nothing."""
        self.scheduler.remove(req_id)
        del self.requests[req_id]

    def import_request(self, state: wire.RequestState, prompt_token_ids: tuple[int, ...],
                       block_ids: list[int]) -> None:
        """Adopt a migrated request (its state, and its prompt). block_ids hold the KV of its first
        num_computed_tokens tokens (owned: one reference each; leading ones may be cached
        blocks it shares, claimed for it). Its full blocks are registered as cached. With no KV
        (num_computed_tokens 0) it joins the waiting queue like a new request."""
        if state.req_id in self.requests:
            raise RequestRejected(400, f"request {state.req_id} already exists")
        req = Request(
            req_id=state.req_id,
            prompt_token_ids=tuple(prompt_token_ids),
            sampling=state.sampling,
            priority=state.priority,
            arrival_s=state.arrival_s,
            reply_addr=state.reply_addr,
            attempt=state.attempt,
            output_token_ids=list(state.output_token_ids),
            num_computed_tokens=state.num_computed_tokens,
            block_ids=list(block_ids),
            num_preemptions=state.num_preemptions,
            num_delivered=state.num_delivered,
            num_cached_prompt_tokens=state.num_cached_prompt_tokens,
        )
        self.requests[req.req_id] = req
        if req.num_computed_tokens == 0:  # queued at the source: it queues here
            self.blocks.free(req.block_ids)
            req.block_ids = []
            req.queued_s = time.monotonic()
            self.scheduler.add(req)
        else:
            self.scheduler.add_running(req)

"""Local scheduler: continuous batching with one token budget per step.

Contract (vLLM v1 style): `schedule() -> StepPlan`, run the plan, `update(plan, sampled)`.
There is one token-count model and no separate prefill/decode pipelines: each request
has `num_tokens` (prompt + outputs) and `num_computed_tokens` (KV in cache); a step
feeds it tokens [num_computed, num_computed + n), n bounded by the step's token budget,
so a long prompt is prefilled in chunks and a decode is n = 1.

Order: running requests first, then waiting ones, each by (priority desc, arrival asc).
When a running request needs a block and none is free, the lowest-priority, latest
request is preempted by recompute (blocks freed, back to waiting, KV rebuilt later).
Waiting requests are admitted strictly in order (head-of-line), and not in a step that
preempted.

Prefix cache (`prefix_seed` set): every block a step fills completely is registered with
its prefix hash; a request being admitted claims the cached blocks of its longest
cached prefix and starts computing at the first uncached token (at least its last token
is always computed, in a block of its own: that step's logits sample the next token).
A preempted request finds its own freed blocks again if nobody evicted them. A request's
blocks are freed last block first, so eviction (least recently freed first) takes a
prefix's tail before its head: a chain cut at its head is found nowhere (`match` and the
scheduler's index follow leading runs), one cut at its tail still serves the rest.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from ferry.common.config import EngineConfig
from ferry.common.histogram import QUEUE_TIME_BOUNDS_S, Buckets
from ferry.common.prefix_hash import block_hashes
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk, needs_history
from ferry.services.worker.engine.block_manager import BlockManager
from ferry.services.worker.engine.request import Request, RequestOutput, Status


@dataclass(slots=True)
class StepPlan:
    chunks: list[SeqChunk] = field(default_factory=list)
    reqs: list[Request] = field(default_factory=list)  # reqs[i] runs chunks[i]
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests finished by schedule() itself: they outgrew the whole KV cache.
    finished: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.finished

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def batch(self) -> ModelBatch | None:
        """What the executor runs; None when nothing does (only finishes to record)."""
        return ModelBatch(chunks=tuple(self.chunks)) if self.chunks else None


class LocalScheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        prefix_seed: int | None = None,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.prefix_seed = prefix_seed  # the hash chain's root; None: no prefix cache
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []  # sorted by queue_key
        self.running: list[Request] = []
        self.paused: dict[str, Request] = {}  # out of the batch, blocks kept (migration)
        self.num_preemptions = 0
        self.num_admitted_tokens = 0  # tokens of the requests admitted (from waiting)
        self.num_hit_tokens = 0  # of those, found in the prefix cache (not computed)
        self.num_generated_tokens = 0  # output tokens sampled, total
        # Each request's wait here: joining the queue (Request.queued_s) to its first step.
        self.queue_time = Buckets(QUEUE_TIME_BOUNDS_S)

    # ---- queue --------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.queue_key)

    def add_running(self, req: Request) -> None:
        """A request that arrives with its KV already in place (migration in)."""
        req.status = Status.RUNNING
        self.running.append(req)
        self._register_computed(req)

    # ---- schedule -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: r.queue_key)
        scheduled: list[Request] = []
        while self.running and budget > 0:
            req = self.running.pop(0)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow_or_preempt(req, req.num_computed_tokens + num_new, plan):
                break  # req itself was preempted: nothing left to run
            scheduled.append(req)
            self._add_chunk(plan, req, num_new)
            budget -= num_new
        # Requests not reached for lack of budget stay running, unscheduled this step.
        self.running = scheduled + self.running

        if plan.preempted_req_ids:
            return plan
        now = time.monotonic() if self.waiting else 0.0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self._match(req)
            if not self._fits_whole(req, cached):
                break  # head-of-line blocking: the queue waits for memory
            if cached:
                self.blocks.claim(cached)
                req.block_ids = cached
                req.num_registered = len(cached)
                req.num_computed_tokens = len(cached) * self.blocks.block_size
            self.num_admitted_tokens += req.num_tokens
            self.num_hit_tokens += req.num_computed_tokens
            if req.num_cached_prompt_tokens is None:  # its first admission anywhere
                req.num_cached_prompt_tokens = min(req.num_computed_tokens,
                                                   len(req.prompt_token_ids))
            if req.queued_s is not None:
                self.queue_time.observe(now - req.queued_s)
                req.queued_s = None
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            self.blocks.append_slot(req.block_ids, req.num_computed_tokens + num_new)
            self.waiting.pop(0)
            req.status = Status.RUNNING
            self.running.append(req)
            self._add_chunk(plan, req, num_new)
            budget -= num_new
        return plan

    def _fits_whole(self, req: Request, cached: list[int]) -> bool:
        """Admit a waiting request only when its whole prompt (and first output) fits, with
        a small watermark left: admitting on the first chunk alone lets a long prompt
        grow into preempting the batch, and itself, over and over. `cached`: the blocks
        of its prefix it would claim from the cache (they need no new memory)."""
        missing = self.blocks.blocks_for(req.num_tokens + 1) - len(cached or req.block_ids)
        watermark = int(self.blocks.num_total * self.config.admission_watermark)
        return self.blocks.can_allocate(missing + watermark, claiming=cached)

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens to prefill before a request arriving now would start: each waiting
        request's, less what it would find cached, and each running one's unfed chunks."""
        size = self.blocks.block_size
        waiting = sum(r.num_tokens - len(self._match(r)) * size for r in self.waiting)
        running = sum(r.num_tokens - r.num_computed_tokens for r in self.running
                      if r.num_tokens - r.num_computed_tokens > 1)
        return waiting + running

    # ---- the prefix cache ---------------------------------------------------------------

    def _match(self, req: Request) -> list[int]:
        """The cached blocks of req's longest cached prefix, leaving at least its last
        token to compute; [] without a cache or for a request that holds blocks."""
        if self.prefix_seed is None or req.block_ids:
            return []
        self._hash_full_blocks(req)
        return self.blocks.match(req.block_hashes[: (req.num_tokens - 1) // self.blocks.block_size])

    def computed_hashes(self, req: Request) -> list[int]:
        """Prefix hashes of req's full blocks whose KV is computed, in block order ([]
        without a cache): what a migration offers its destination to skip."""
        if self.prefix_seed is None:
            return []
        self._hash_full_blocks(req)
        return req.block_hashes[: req.num_computed_tokens // self.blocks.block_size]

    def _hash_full_blocks(self, req: Request) -> None:
        """Extend req.block_hashes to every full block of its tokens."""
        size = self.blocks.block_size
        done = len(req.block_hashes)
        if (req.num_tokens // size) > done:
            parent = req.block_hashes[-1] if done else self.prefix_seed
            end = req.num_tokens // size * size
            req.block_hashes += block_hashes(req.token_slice(done * size, end), size,
                                             parent=parent)

    def _register_computed(self, req: Request) -> None:
        """Register req's blocks whose KV is complete (full and computed) as cached."""
        if self.prefix_seed is None:
            return
        num_full = req.num_computed_tokens // self.blocks.block_size
        if num_full <= req.num_registered:
            return
        self._hash_full_blocks(req)
        for i in range(req.num_registered, num_full):
            self.blocks.register(req.block_ids[i], req.block_hashes[i])
        req.num_registered = num_full

    def _grow_or_preempt(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Make req's table hold num_tokens, preempting from the back of the running queue
        (lowest priority, latest) until it fits. False if req itself had to go."""
        while not self.blocks.append_slot(req.block_ids, num_tokens):
            if self.running:
                self._preempt(self.running.pop(), plan)
                continue
            if self.blocks.num_used == len(req.block_ids) and not self.blocks.num_reserved:
                # Alone and still no room: it can never grow here. Recompute would loop.
                self._finish(req, "length")
                plan.finished.append(req)
            else:  # paused requests or reservations hold blocks that will come back
                self._preempt(req, plan)
            return False
        return True

    def _add_chunk(self, plan: StepPlan, req: Request, num_new: int) -> None:
        start = req.num_computed_tokens
        end = start + num_new
        sample = end == req.num_tokens
        history = sample and needs_history(req.sampling)
        plan.chunks.append(
            SeqChunk(
                req_id=req.req_id,
                token_ids=req.token_slice(start, end),
                start_pos=start,
                block_ids=tuple(req.block_ids),
                sample=sample,
                sampling=req.sampling,
                prompt_token_ids=req.prompt_token_ids if history else (),
                output_token_ids=tuple(req.output_token_ids) if history else (),
            )
        )
        plan.reqs.append(req)

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.blocks.free(req.block_ids[::-1])  # tail first out of the cache
        req.block_ids = []
        req.num_computed_tokens = req.num_registered = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted_req_ids.append(req.req_id)
        self.add(req)

    # ---- update -------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list[int]) -> list[RequestOutput]:
        """Record a step's results; return the requests' new tokens (and finishes)."""
        outputs = [self._take_output(req) for req in plan.finished]
        sampled_iter = iter(sampled)
        logprobs = getattr(sampled, "logprobs", None)
        logprobs_iter = iter(logprobs if logprobs is not None else ())
        now = time.time()
        for chunk, req in zip(plan.chunks, plan.reqs, strict=True):
            token = next(sampled_iter) if chunk.sample else None
            token_logprobs = next(logprobs_iter, None) if chunk.sample else None
            if req.status is not Status.RUNNING:
                continue  # left the batch since schedule() (aborted, paused)
            req.num_computed_tokens = chunk.end_pos
            req.last_step_s = now
            self._register_computed(req)
            if token is None:
                continue
            if req.sampling.logprobs is not None:
                if token_logprobs is None:
                    raise ValueError(f"{req.req_id} asked for logprobs; the executor gave none")
                req.undelivered_logprobs.append(token_logprobs)
            req.output_token_ids.append(token)
            self.num_generated_tokens += 1
            reason = self._finish_reason(req, token)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(self._take_output(req))
        if next(sampled_iter, None) is not None:
            raise ValueError("executor returned more tokens than chunks asked for")
        return outputs

    def _finish_reason(self, req: Request, token: int) -> str | None:
        # Before min_tokens the sampler suppresses stops; vLLM checks here too.
        stops = req.num_output_tokens >= req.sampling.min_tokens
        if stops and token in req.sampling.stop_token_ids:
            return "stop"
        if stops and not req.sampling.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if req.num_output_tokens >= req.sampling.max_tokens:
            return "length"
        if req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        self.blocks.free(req.block_ids[::-1])  # tail first out of the cache
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = reason

    @staticmethod
    def _take_output(req: Request) -> RequestOutput:
        first = req.num_delivered
        req.num_delivered = req.num_output_tokens
        logprobs, req.undelivered_logprobs = tuple(req.undelivered_logprobs), []
        return RequestOutput(
            req_id=req.req_id,
            reply_addr=req.reply_addr,
            attempt=req.attempt,
            first_index=first,
            token_ids=tuple(req.output_token_ids[first:]),
            finish_reason=req.finish_reason,
            logprobs=logprobs,
            num_cached_prompt_tokens=req.num_cached_prompt_tokens if first == 0 else None,
        )

    # ---- abort, pause (migration) ---------------------------------------------------------

    def find(self, req_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.req_id == req_id:
                    return req
        return self.paused.get(req_id)

    def abort(self, req_id: str) -> RequestOutput | None:
        """Remove a request wherever it is and free its blocks."""
        req = self.find(req_id)
        if req is None:
            return None
        self._detach(req)
        self._finish(req, "abort")
        return self._take_output(req)

    def _detach(self, req: Request) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is Status.PAUSED:
            del self.paused[req.req_id]

    def pause(self, req_id: str) -> Request:
        """Take a request out of scheduling, keeping its blocks (a migration's final
        stage, or a queued request about to move)."""
        req = self.find(req_id)
        if req is None or req.status not in (Status.RUNNING, Status.WAITING):
            raise KeyError(f"{req_id} is neither running nor waiting")
        self._detach(req)
        req.status = Status.PAUSED
        self.paused[req_id] = req
        return req

    def resume(self, req_id: str) -> None:
        """Undo pause (the migration aborted): back to the batch, or to the queue when it
        holds no KV."""
        req = self.paused.pop(req_id)
        if req.num_computed_tokens == 0 and not req.block_ids:
            self.add(req)
        else:
            req.status = Status.RUNNING
            self.running.append(req)

    def remove(self, req_id: str) -> Request:
        """Drop a request that now lives elsewhere (migration committed): blocks freed,
        nothing emitted."""
        req = self.find(req_id)
        if req is None:
            raise KeyError(req_id)
        self._detach(req)
        self.blocks.free(req.block_ids[::-1])  # tail first out of the cache
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = "migrated"
        return req

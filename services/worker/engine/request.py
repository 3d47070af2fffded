"""A request as the engine sees it: tokens, KV progress, blocks, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ferry.common.sampling import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting for recompute)
    RUNNING = "running"  # in the batch; holds blocks
    PAUSED = "paused"  # holds blocks but is out of the batch (final migration stage)
    FINISHED = "finished"


@dataclass(slots=True, kw_only=True)
class Request:
    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # seed resolved (never None)
    priority: int = 0  # higher runs first
    arrival_s: float = 0.0  # for queue order within a priority
    reply_addr: str = ""  # opaque to the engine: where outputs go
    attempt: int = 0  # opaque to the engine: the sender's dispatch attempt, echoed in outputs
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)  # block table, logical order
    status: Status = Status.WAITING
    num_preemptions: int = 0
    num_delivered: int = 0  # output tokens already handed out in a RequestOutput
    # Prompt tokens whose KV it found cached (prefix cache, pulled blocks included) when
    # first admitted, on whichever instance that was; None until then. A preemption's
    # recompute does not change it. Reported once, with the output at index 0.
    num_cached_prompt_tokens: int | None = None
    # Prefix cache: hashes of the request's full blocks computed so far (prompt and
    # outputs; common/prefix_hash.py), and how many of block_ids are registered as cached.
    block_hashes: list[int] = field(default_factory=list)
    num_registered: int = 0
    finish_reason: str | None = None
    last_step_s: float = 0.0  # wall clock (time.time()) at the end of its latest step
    # Monotonic time it joined this engine's queue; None once its queue time is counted
    # (its first step here) or when it came with its KV (a running request migrated in).
    queued_s: float | None = None
    # Logprobs of output_token_ids[num_delivered:] when sampling.logprobs is set (handed
    # out with them; never migrated: outputs are handed out at the end of every step).
    undelivered_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + outputs."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return tuple(self.output_token_ids[start - prompt_len : end - prompt_len])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: end - prompt_len])

    @property
    def queue_key(self) -> tuple[int, float, str]:
        """Sort key: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival_s, self.req_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutput:
    """New tokens of one request after a step (DESIGN §2 `Tokens`)."""

    req_id: str
    reply_addr: str
    attempt: int  # Request.attempt
    first_index: int  # output index of token_ids[0]
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "length" | "stop" | "abort" | None
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when the request asked
    # Request.num_cached_prompt_tokens on the output at index 0 (first_index == 0), else None
    num_cached_prompt_tokens: int | None = None

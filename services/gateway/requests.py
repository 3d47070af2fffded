"""The gateway's pure core: every in-flight request, the tokens delivered so far, and the
rules that make **each output index reach the client exactly once, in order** (DESIGN §2,
§7), whatever migrations, resends and replays happen on the way.

No sockets and no event loop: the transport (main.py) feeds it messages and the clock,
and sends what it returns (Deltas to clients; Dispatch / Release to the cluster).

Per request, output indices look like this:

    0 ........ num_delivered-1 | num_delivered ......... finish index
    [ delivered (sent once)   ][ gap: pending tokens wait here until filled ]

A Tokens message with indices below num_delivered is a resend: those indices are dropped.
Indices past a gap wait in `pending` (bounded) until the gap fills.

Fencing: every Dispatch of a request carries its attempt number (0, then +1 for each
replay or re-dispatch), and only Tokens and errors of the current attempt count. A copy
left running on an instance that was declared dead and came back, or one a scheduler
forwarded just before it died, can never add, end or fail the client's stream.
"""

from __future__ import annotations

import heapq
import itertools
import random
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from ferry.common import wire
from ferry.common.prefix_hash import block_hashes
from ferry.common.sampling import MAX_SEED, SamplingParams, TokenLogprobs
from ferry.common.text import Detokenizer, TextModel

# Release reasons (wire.Release.reason)
RELEASE_FINISHED = "finished"  # the worker ended it itself; nothing to abort


class Rejected(Exception):
    """A request the gateway will not run; `code` is HTTP-like (400, 401, 413, 429, 503)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BadStream(Exception):
    """A request's output can't be delivered as it came; the transport fails it (500)."""

    def __init__(self, req_id: str, message: str) -> None:
        super().__init__(f"{req_id}: {message}")
        self.req_id = req_id


class GapOverflow(BadStream):
    """A request's out-of-order buffer passed its bound."""

    def __init__(self, req_id: str, num_pending: int) -> None:
        super().__init__(req_id, f"{num_pending} tokens wait behind a gap in the stream")


class StopMatcher:
    """Finds stop strings in a text stream fed piece by piece. It holds back the longest
    tail that could still start a stop string, so a match never straddles text already
    released; the first match ends the stream, cut before the stop string."""

    __slots__ = ("stops", "held", "include")

    def __init__(self, stops: tuple[str, ...], *, include: bool = False) -> None:
        self.stops = stops
        self.held = ""
        self.include = include  # keep the matched stop string (include_stop_str_in_output)

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string matched)."""
        buf = self.held + text
        found = [(i, -len(s)) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:  # the earliest match; of matches there, the longest
            cut, minus_len = min(found)
            self.held = ""
            return buf[: cut - minus_len if self.include else cut], True
        keep = 0
        for k in range(min(len(buf), max(map(len, self.stops)) - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(slots=True, eq=False)
class Request:
    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # seed resolved; max_tokens counts from output index 0
    priority: int  # wire.Priority value
    arrival_s: float  # wall clock (time.time()) at arrival
    start_time: float  # monotonic, at arrival (latency metrics)
    deadline: float  # monotonic; past it the request finishes with "timeout"
    sink: Any  # where the transport sends this request's deltas
    detok: Detokenizer
    stop: StopMatcher | None
    incremental: bool  # text with every delta (streaming); False: all of it with the last
    output_token_ids: list[int] = field(default_factory=list)  # delivered, index order
    # index -> (token id, its logprobs if asked) past a gap
    pending: dict[int, tuple[int, TokenLogprobs | None]] = field(default_factory=dict)
    # The last token is a stop token (EOS or a stop id) whose text stays out (vLLM's rule
    # unless include_stop_str_in_output).
    stop_token_hidden: bool = False
    finish_at: tuple[int, str] | None = None  # (index, reason) the worker finished at
    num_seen: int = 0  # highest output index any Tokens message reached, + 1
    instance_id: str | None = None  # instance holding it, as far as the gateway knows
    direct_addr: str | None = None  # worker inbox, when dispatched in bypass mode
    # The scheduler epoch it was last dispatched through (None: bypass, or no view yet).
    dispatch_epoch: str | None = None
    attempt: int = 0  # the current Dispatch.attempt; output of any other is ignored
    # Of its prompt, the tokens a worker found cached (Tokens.num_cached_prompt_tokens):
    # the first value reported stands (a migration or replay reports none, or a later one).
    # None until reported.
    num_cached_prompt_tokens: int | None = None
    first_token_time: float = 0.0  # monotonic, 0 until the first token (metrics)
    last_token_time: float = 0.0  # monotonic, at the last delivered token (metrics)
    series: Any = None  # its metrics' children (metrics.Series), from its first token on

    @property
    def num_delivered(self) -> int:
        return len(self.output_token_ids)


@dataclass(frozen=True, slots=True)
class Delta:
    """What one update gives the client: tokens [first_index, +len) and their text."""

    req: Request
    first_index: int
    token_ids: tuple[int, ...]
    text: str  # stop strings already cut
    finish_reason: str | None  # "length" | "stop" | "abort" | "timeout" | None
    release: str | None  # wire.Release reason when finished, else None
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when the request asked


class RequestTable:
    def __init__(
        self,
        text: TextModel,
        *,
        gateway_id: str,
        reply_addr: str,
        max_pending_tokens: int = 4096,
        rng: random.Random | None = None,
    ) -> None:
        self.text = text
        self.reply_addr = reply_addr  # gateway inbox, where workers send Tokens
        self.max_pending_tokens = max_pending_tokens
        self._rng = rng or random.Random()
        # Every req_id of this gateway process starts with it (GatewayHello.req_id_prefix).
        self.id_prefix = f"{gateway_id}-{secrets.token_hex(3)}-"
        self._counter = itertools.count()
        self._reqs: dict[str, Request] = {}
        # (deadline, req_id) heap; entries of finished requests are skipped, and dropped
        # when they outnumber the live ones
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._reqs)

    def get(self, req_id: str) -> Request | None:
        return self._reqs.get(req_id)

    def add(
        self,
        *,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingParams,
        priority: int,
        timeout_s: float,
        sink: Any,
        now: float,
        arrival_s: float,
        stream: bool = True,
    ) -> Request:
        """Track a new request (already validated). The seed is fixed here so a replay or
        a migration reproduces the same tokens; EOS ids become stop ids unless ignored.
        Without `stream` (and stop strings) the text is decoded once, at the end."""
        changes: dict[str, Any] = {}
        if sampling.seed is None:
            changes["seed"] = self._rng.randint(0, MAX_SEED)
        if not sampling.ignore_eos:
            extra = tuple(t for t in self.text.eos_token_ids if t not in sampling.stop_token_ids)
            if extra:
                changes["stop_token_ids"] = sampling.stop_token_ids + extra
        if changes:
            sampling = replace(sampling, **changes)
        req = Request(
            req_id=self.id_prefix + str(next(self._counter)),
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            priority=priority,
            arrival_s=arrival_s,
            start_time=now,
            deadline=now + timeout_s,
            sink=sink,
            detok=self.text.detokenizer(prompt_token_ids,
                                        skip_special_tokens=sampling.skip_special_tokens),
            stop=(StopMatcher(sampling.stop, include=sampling.include_stop_str_in_output)
                  if sampling.stop else None),
            incremental=stream or bool(sampling.stop),
        )
        self._reqs[req.req_id] = req
        heapq.heappush(self._deadlines, (req.deadline, req.req_id))
        if len(self._deadlines) > 2 * len(self._reqs) + 1024:  # mostly finished requests
            self._deadlines = [(r.deadline, r.req_id) for r in self._reqs.values()]
            heapq.heapify(self._deadlines)
        return req

    def dispatch(self, req: Request, *, block_size: int = 16, prefix_seed: int = 0
                 ) -> wire.Dispatch:
        """The Dispatch for a first run, or for a replay: prompt + delivered tokens. The
        engine counts the delivered tokens as outputs already made (towards max_tokens)
        and continues at index len(output_token_ids), so sampling is sent unchanged. With
        the cluster's prefix seed (InstanceView), it carries the prefix hashes of its full
        blocks, by which the scheduler places it near its cached prefix."""
        tokens = req.prompt_token_ids + tuple(req.output_token_ids)
        hashes = block_hashes(tokens, block_size, parent=prefix_seed) if prefix_seed else []
        body = wire.DispatchBody(
            req_id=req.req_id,
            attempt=req.attempt,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=tuple(req.output_token_ids),
            sampling=req.sampling,
            arrival_s=req.arrival_s,
        )
        return wire.Dispatch.of(body, priority=req.priority, reply_addr=self.reply_addr,
                                prefix_hashes=tuple(hashes))

    def remove(self, req_id: str) -> Request | None:
        """Forget a request without a delta (rejected, failed)."""
        return self._reqs.pop(req_id, None)

    # ---- messages from the cluster ----------------------------------------------------

    def on_placement(self, msg: wire.Placement) -> None:
        req = self._reqs.get(msg.req_id)
        if req is not None:
            req.instance_id = msg.instance_id

    def current(self, req_id: str, attempt: int) -> Request | None:
        """The request, if `attempt` is its current one (else the message is stale)."""
        req = self._reqs.get(req_id)
        return req if req is not None and req.attempt == attempt else None

    def on_tokens(self, msg: wire.Tokens) -> Delta | None:
        """Merge one Tokens message of the current attempt (the caller checks with
        `current`); the Delta of newly deliverable output, if any. Raises GapOverflow when
        too many tokens wait behind a gap, BadStream when logprobs asked for are missing."""
        req = self.current(msg.req_id, msg.attempt)
        if req is None:
            return None  # finished, aborted or failed already, or a stale copy's output
        end = msg.first_index + len(msg.token_ids)
        if end >= req.num_seen:  # the most advanced sender holds the request now
            req.num_seen = end
            req.instance_id = msg.instance_id
        if msg.finish_reason is not None:
            req.finish_at = (end, msg.finish_reason)
        if req.num_cached_prompt_tokens is None:
            req.num_cached_prompt_tokens = msg.num_cached_prompt_tokens

        asked = req.sampling.logprobs is not None
        if asked and len(msg.logprobs) != len(msg.token_ids):
            raise BadStream(req.req_id, f"{len(msg.token_ids)} tokens came with "
                                        f"{len(msg.logprobs)} logprobs")
        logprobs = msg.logprobs if asked else (None,) * len(msg.token_ids)
        first_index = req.num_delivered
        skip = first_index - msg.first_index
        if skip >= 0:
            new_ids = list(msg.token_ids[skip:])
            new_logprobs = list(logprobs[skip:])
        else:
            new_ids, new_logprobs = [], []
            for i, token_id in enumerate(msg.token_ids):
                req.pending.setdefault(msg.first_index + i, (token_id, logprobs[i]))
            if len(req.pending) > self.max_pending_tokens:
                raise GapOverflow(req.req_id, len(req.pending))
        if req.pending:
            index = first_index + len(new_ids)
            while index in req.pending:
                token_id, token_logprobs = req.pending.pop(index)
                new_ids.append(token_id)
                new_logprobs.append(token_logprobs)
                index += 1
            for stale in [i for i in req.pending if i < index]:
                del req.pending[stale]
        return self._advance(req, first_index, new_ids, new_logprobs if asked else [])

    def _advance(self, req: Request, first_index: int, new_ids: list[int],
                 new_logprobs: list) -> Delta | None:
        """Deliver new_ids (contiguous from first_index; new_logprobs alongside, or empty):
        cap at max_tokens, detokenize, match stop strings, decide whether the request is
        finished."""
        finish_reason = release = None
        room = req.sampling.max_tokens - first_index
        if len(new_ids) >= room:
            del new_ids[room:]
            finish_reason, release = "length", "stop"  # the gateway's cap; abort leftovers
        # The worker stopped on a stop token (EOS or a stop id) and it is the last of these:
        # its text is left out unless include_stop_str_in_output.
        text_ids = new_ids
        if (new_ids and req.finish_at == (first_index + len(new_ids), "stop")
                and not req.sampling.include_stop_str_in_output):
            text_ids = new_ids[:-1]
            req.stop_token_hidden = True

        matched = False  # a stop string ended the text
        if req.stop is None:
            text = req.detok.step(text_ids) if req.incremental else ""
        else:
            pieces = []
            for n, token_id in enumerate(text_ids):
                piece = req.detok.step((token_id,))
                if first_index + n < req.sampling.min_tokens:
                    pieces.append(piece)  # stop strings count from min_tokens on (vLLM)
                    continue
                piece, matched = req.stop.feed(piece)
                pieces.append(piece)
                if matched:
                    del new_ids[n + 1 :]
                    finish_reason, release = "stop", "stop"
                    break
            text = "".join(pieces)
        del new_logprobs[len(new_ids):]

        req.output_token_ids.extend(new_ids)
        if req.finish_at is not None and not matched:
            at, reason = req.finish_at
            if req.num_delivered >= at:
                finish_reason, release = reason, RELEASE_FINISHED
        if finish_reason is None and not new_ids:
            return None
        if finish_reason is not None:
            if not matched:
                text += self._final_text(req)
            del self._reqs[req.req_id]
        return Delta(req, first_index, tuple(new_ids), text, finish_reason, release,
                     tuple(new_logprobs))

    @staticmethod
    def _final_text(req: Request) -> str:
        """Text still owed at the end: all of it when the text is not incremental, the
        bytes of a character the last token left unfinished (U+FFFD), and what the stop
        matcher held back. Streamed deltas joined equal the non-streamed text."""
        if req.incremental:
            text = ""
        else:
            ids = req.output_token_ids
            text = req.detok.step(ids[:-1] if req.stop_token_hidden else ids)
        text += req.detok.flush()
        if req.stop is None:
            return text
        piece, matched = req.stop.feed(text)
        return piece if matched else piece + req.stop.flush()

    # ---- gateway-side endings ---------------------------------------------------------

    def finish(self, req_id: str, reason: str) -> Delta | None:
        """End a request on the gateway's initiative ("abort", "timeout"): the last Delta,
        with any held-back text, and the Release reason that makes the worker abort."""
        req = self._reqs.pop(req_id, None)
        if req is None:
            return None
        return Delta(req, req.num_delivered, (), self._final_text(req), reason, reason)

    def expired(self, now: float) -> list[Request]:
        """Requests whose deadline has passed (still in the table)."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, req_id = heapq.heappop(self._deadlines)
            req = self._reqs.get(req_id)
            if req is not None and req.deadline == deadline:
                out.append(req)
        return out

    def unplaced(self, scheduler_epoch: str) -> list[Request]:
        """Requests a restarted scheduler lost: sent through an earlier epoch, never placed
        (no Placement, no token). A scheduler holds requests no instance has room for
        (hold_until_room); its restart drops them, so the gateway dispatches them again."""
        return [
            req for req in self._reqs.values()
            if req.instance_id is None and req.direct_addr is None and req.num_seen == 0
            and req.dispatch_epoch is not None and req.dispatch_epoch != scheduler_epoch
        ]

    def never_placed(self) -> list[Request]:
        """Requests sent to the scheduler with no word back (no Placement, no token): when
        it falls silent, these may be lost with it."""
        return [req for req in self._reqs.values()
                if req.instance_id is None and req.direct_addr is None and req.num_seen == 0]

    def active(self) -> list[Request]:
        """Every request in flight (a copy: the caller may finish some)."""
        return list(self._reqs.values())

    @staticmethod
    def reset_for_replay(req: Request) -> None:
        """Make req ready to be dispatched again as a new attempt: its gap buffer is
        dropped (the replay regenerates those indices), its holder unknown, and output of
        the earlier attempts is ignored from now on."""
        req.instance_id = None
        req.direct_addr = None
        req.pending.clear()
        req.finish_at = None
        req.stop_token_hidden = False
        req.num_seen = req.num_delivered
        req.attempt += 1



def check_request(
    prompt_token_ids: tuple[int, ...],
    sampling: SamplingParams,
    *,
    max_model_len: int,
    vocab_size: int,
    max_tokens_limit: int,
) -> None:
    """Raise Rejected(400) for a request that can't run: bad sampling, empty prompt,
    unknown token ids (prompt, logit_bias, stop_token_ids), or more tokens than the model's context holds."""
    try:
        sampling.validate()
    except ValueError as err:
        raise Rejected(400, str(err)) from None
    if sampling.max_tokens > max_tokens_limit:
        raise Rejected(
            400, f"max_tokens must be at most {max_tokens_limit}, got {sampling.max_tokens}"
        )
    if not prompt_token_ids:
        raise Rejected(400, "the prompt is empty")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise Rejected(400, f"prompt token ids must be in [0, {vocab_size})")
    for name in ("logit_bias_token_ids", "stop_token_ids"):
        if any(t >= vocab_size for t in getattr(sampling, name)):
            field = name.removesuffix("_token_ids") if name.startswith("logit") else name
            raise Rejected(400, f"{field} token ids must be in [0, {vocab_size})")
    prompt_len = len(prompt_token_ids)
    if prompt_len + sampling.max_tokens > max_model_len:
        raise Rejected(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} tokens and max_tokens is {sampling.max_tokens} "
            f"({prompt_len + sampling.max_tokens} in all)",
        )


def check_prompt_chars(num_chars: int, *, max_model_len: int, max_prompt_chars: int | None) -> None:
    """Raise Rejected(400) for prompt text too long to fit the context whatever its tokens
    (TextModel.max_prompt_chars), before anyone spends time tokenizing it."""
    if max_prompt_chars is not None and num_chars > max_prompt_chars:
        raise Rejected(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_chars} characters, more than {max_model_len} tokens can hold "
            f"(at most {max_prompt_chars // max_model_len} characters each)",
        )

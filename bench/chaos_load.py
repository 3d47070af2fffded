"""The load of `ferry bench chaos` and the check of every token it receives.

Requests come from a seeded pool of specs (prompt token ids, sampling seed); every stream
asks for `max_tokens` with ignore_eos, so an unbroken stream has exactly that many tokens.
What each spec must yield:

- sim workers: the sim executor's token is a pure function of (seed, position), and
  output index i is sampled at position len(prompt) + i (the chunk that feeds position
  p-1 samples the token for p; SeqChunk.end_pos), so `sim_tokens` computes it;
- model workers: what an undisturbed run of the same spec yielded (the reference pass).

SDK streams read raw TokenChunks (`AsyncStream.next_reply`, which does not stop at the first
index it dislikes) and check each index: duplicates, gaps and wrong tokens are counted,
and the whole text is compared with the detokenized expected tokens. HTTP streams (the
openai client, SSE) carry text only: their whole text is compared likewise, and the usage
chunk's completion_tokens with max_tokens.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# Errors a client may legitimately end with: the SDK's typed errors, and for HTTP the
# openai client's and httpx's (a killed gateway cuts the connection mid-stream).
HTTP_CONNECTION_ERRORS = ("APIConnectionError", "RemoteProtocolError", "ReadError",
                          "ConnectError", "APITimeoutError")


@dataclass(frozen=True, slots=True)
class Spec:
    prompt_token_ids: tuple[int, ...]
    seed: int


def make_specs(num: int, *, seed: int, vocab_size: int, prompt_len: tuple[int, int]) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec(tuple(rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_len))),
                 rng.randrange(0, 2**31 - 1)) for _ in range(num)]


def sim_tokens(executor: Any, spec: Spec, max_tokens: int) -> tuple[int, ...]:
    """What a sim worker yields for spec: output index i is sampled at position
    len(prompt) + i (services/worker/sim_executor.py)."""
    start = len(spec.prompt_token_ids)
    return tuple(executor.token_at(spec.seed, start + i) for i in range(max_tokens))


class Expected:
    """Expected output tokens per spec index, and (lazily) the text HTTP clients get."""

    def __init__(self, specs: list[Spec], tokens: list[tuple[int, ...]], text_model: Any) -> None:
        self.specs = specs
        self.tokens = tokens
        self.text_model = text_model
        self._texts: dict[int, str] = {}

    def text(self, spec_index: int) -> str:
        """The text an undisturbed stream delivers: the gateway's detokenizer stepped one
        token at a time, as tokens come from a worker (one a step), then flushed at the end
        where it can be (a detokenizer with `flush` renders a character the last token left
        unfinished; one without drops it)."""
        if spec_index not in self._texts:
            detok = self.text_model.detokenizer(self.specs[spec_index].prompt_token_ids)
            text = "".join(detok.step((t,)) for t in self.tokens[spec_index])
            flush = getattr(detok, "flush", None)
            self._texts[spec_index] = text + (flush() if flush is not None else "")
        return self._texts[spec_index]


@dataclass(slots=True)
class StreamRecord:
    num: int  # arrival number in the phase
    spec: int  # index in the spec pool
    gateway: str  # gateway-a | gateway-b
    protocol: str  # sdk | http
    sent_s: float  # seconds from the phase start
    end_s: float = 0.0
    req_id: str | None = None
    num_received: int = 0  # distinct output indices received (HTTP: usage.completion_tokens)
    num_duplicate: int = 0  # an index received again
    num_missing: int = 0  # indices below the highest received that never came
    num_wrong: int = 0  # indices whose token differs from the expected one (or past max_tokens)
    text_mismatch: bool = False  # the whole text differs from the expected text
    text_diff: dict | None = None  # where, when it does
    max_chunk_tokens: int = 0  # SDK: the most tokens one chunk carried
    last_chunk_tokens: int = 0  # SDK: tokens in the last chunk
    finish_reason: str | None = None
    error: str | None = None  # class name of the error the client raised
    error_message: str = ""
    error_s: float = 0.0  # when it was raised, seconds from the phase start
    untyped: bool = False  # an exception outside the client's typed errors
    max_gap_s: float = 0.0  # longest wait between chunks (the first: from the send)
    max_gap_end_s: float = 0.0  # when it ended, seconds from the phase start

    def ok(self, max_tokens: int) -> bool:
        return (self.error is None and self.finish_reason == "length"
                and self.num_received == max_tokens and not self.num_duplicate
                and not self.num_missing and not self.num_wrong and not self.text_mismatch)

    def cut_short(self, max_tokens: int) -> bool:
        """Ended without an error but not with all max_tokens tokens ("abort", early end)."""
        return self.error is None and (self.finish_reason != "length"
                                       or self.num_received < max_tokens)


class Load:
    """Streams arriving at `rate_per_s` (Poisson, seeded), alternating between gateways,
    a fraction over HTTP; each checked against `expected`."""

    def __init__(self, *, sdk: dict[str, Any], http: dict[str, Any], model_name: str,
                 expected: Expected, max_tokens: int, temperature: float, rate_per_s: float,
                 http_fraction: float, rng: random.Random, t0: float,
                 request_timeout_s: float) -> None:
        self.sdk = sdk  # gateway name -> AsyncClient
        self.http = http  # gateway name -> AsyncOpenAI
        self.gateways = sorted(sdk)
        self.model_name = model_name
        self.expected = expected
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.rate_per_s = rate_per_s
        self.http_fraction = http_fraction
        self.rng = rng
        self.t0 = t0
        self.request_timeout_s = request_timeout_s
        self.records: list[StreamRecord] = []
        self.tasks: list[asyncio.Task] = []
        self.stopped = asyncio.Event()
        self.loop_lag_max_s = 0.0  # this process's event loop, the longest it was late
        self.loop_lag_at_s = 0.0  # when, seconds from the phase start

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def arrivals(self) -> None:
        """Start streams until stop() is called."""
        num = 0
        while not self.stopped.is_set():
            spec = self.rng.randrange(len(self.expected.specs))
            gateway = self.gateways[num % len(self.gateways)]
            protocol = "http" if self.rng.random() < self.http_fraction else "sdk"
            rec = StreamRecord(num=num, spec=spec, gateway=gateway, protocol=protocol,
                               sent_s=self.now())
            self.records.append(rec)
            run = self.sdk_stream if protocol == "sdk" else self.http_stream
            self.tasks.append(asyncio.create_task(run(rec)))
            num += 1
            try:
                await asyncio.wait_for(self.stopped.wait(), self.rng.expovariate(self.rate_per_s))
            except TimeoutError:
                pass

    def stop(self) -> None:
        self.stopped.set()

    async def watch_loop(self, interval_s: float = 0.02) -> None:
        """This process's own event-loop lag (how late a short sleep wakes), until stopped:
        a stall every stream shows at once, with the loop late as long, is the client's."""
        while not self.stopped.is_set() or any(not t.done() for t in self.tasks):
            start = time.monotonic()
            await asyncio.sleep(interval_s)
            lag = time.monotonic() - start - interval_s
            if lag > self.loop_lag_max_s:
                self.loop_lag_max_s, self.loop_lag_at_s = lag, time.monotonic() - self.t0

    async def wait(self, timeout_s: float) -> int:
        """Wait for every stream to end; cancel (and record as hung) what is left after
        timeout_s. Returns how many hung."""
        if not self.tasks:
            return 0
        _, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    # ---- one stream ---------------------------------------------------------------------

    async def sdk_stream(self, rec: StreamRecord) -> None:
        from ferry.errors import FerryError

        spec = self.expected.specs[rec.spec]
        expected = self.expected.tokens[rec.spec]
        got: dict[int, int] = {}
        parts: list[str] = []
        last = time.monotonic()
        stream = self.sdk[rec.gateway].stream(
            prompt_token_ids=list(spec.prompt_token_ids), max_tokens=self.max_tokens,
            temperature=self.temperature, seed=spec.seed, ignore_eos=True,
            timeout_s=self.request_timeout_s)
        try:
            while True:
                msg = await stream.next_reply()
                last = self._chunk_arrived(rec, last)
                rec.req_id = msg.req_id
                parts.append(msg.text)
                rec.max_chunk_tokens = max(rec.max_chunk_tokens, len(msg.token_ids))
                rec.last_chunk_tokens = len(msg.token_ids)
                for k, token_id in enumerate(msg.token_ids):
                    index = msg.first_index + k
                    if index in got:
                        rec.num_duplicate += 1
                        continue
                    got[index] = token_id
                    if index >= len(expected) or expected[index] != token_id:
                        rec.num_wrong += 1
                if msg.finish_reason is not None:
                    rec.finish_reason = msg.finish_reason
                    break
        except FerryError as err:
            self._failed(rec, err)
        except asyncio.CancelledError:
            self._failed(rec, None, "Hung", "no end within the phase's wait")
            stream.abort()
            raise
        except Exception as err:  # noqa: BLE001 -- anything untyped is a finding
            self._failed(rec, err)
            rec.untyped = True
        finally:
            rec.end_s = self.now()
            rec.num_received = len(got)
            top = max(got, default=-1)
            rec.num_missing = sum(1 for i in range(top + 1) if i not in got)
            self._check_text(rec, "".join(parts))

    async def http_stream(self, rec: StreamRecord) -> None:
        import openai

        spec = self.expected.specs[rec.spec]
        parts: list[str] = []
        last = time.monotonic()
        try:
            stream = await self.http[rec.gateway].completions.create(
                model=self.model_name, prompt=list(spec.prompt_token_ids),
                max_tokens=self.max_tokens, temperature=self.temperature, seed=spec.seed,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "timeout_s": self.request_timeout_s})
            async for chunk in stream:
                last = self._chunk_arrived(rec, last)
                rec.req_id = chunk.id
                if chunk.choices:
                    parts.append(chunk.choices[0].text or "")
                    rec.finish_reason = chunk.choices[0].finish_reason or rec.finish_reason
                if chunk.usage is not None:
                    rec.num_received = chunk.usage.completion_tokens
        except openai.APIError as err:
            self._failed(rec, err)
        except asyncio.CancelledError:
            self._failed(rec, None, "Hung", "no end within the phase's wait")
            raise
        except Exception as err:  # noqa: BLE001
            self._failed(rec, err)
            # the openai client's HTTP library (httpx, or httpx2 in newer releases) raises
            # its own transport errors mid-stream (a gateway killed mid-response)
            rec.untyped = not type(err).__module__.split(".")[0].startswith("httpx")
        finally:
            rec.end_s = self.now()
            self._check_text(rec, "".join(parts))

    def _chunk_arrived(self, rec: StreamRecord, last: float) -> float:
        now = time.monotonic()
        if now - last > rec.max_gap_s:
            rec.max_gap_s, rec.max_gap_end_s = now - last, now - self.t0
        return now

    def _check_text(self, rec: StreamRecord, got: str) -> None:
        """A stream that ended by itself must have exactly the expected text."""
        if rec.error is not None or rec.finish_reason is None:
            return
        want = self.expected.text(rec.spec)
        rec.text_mismatch = got != want
        if rec.text_mismatch:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                      min(len(got), len(want)))
            rec.text_diff = {"got_chars": len(got), "want_chars": len(want), "first_diff_at": at,
                             "got": got[max(0, at - 20):at + 40],
                             "want": want[max(0, at - 20):at + 40]}

    def _failed(self, rec: StreamRecord, err: BaseException | None, name: str = "",
                message: str = "") -> None:
        rec.error = name or type(err).__name__
        rec.error_message = (message or str(err))[:300]
        rec.error_s = self.now()


# ---- summaries ---------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(records: list[StreamRecord], max_tokens: int) -> dict:
    gaps = [r.max_gap_s for r in records]
    sdk = [r for r in records if r.protocol == "sdk"]
    by_gateway = {}
    for gateway in sorted({r.gateway for r in records}):
        mine = [r for r in records if r.gateway == gateway]
        by_gateway[gateway] = {
            "started": len(mine),
            "completed": sum(r.ok(max_tokens) for r in mine),
            "failed": dict(Counter(r.error for r in mine if r.error)),
        }
    return {
        "started": len(records),
        "completed": sum(r.ok(max_tokens) for r in records),
        "failed": dict(Counter(r.error for r in records if r.error)),
        "untyped_errors": sum(r.untyped for r in records),
        "cut_short": sum(r.cut_short(max_tokens) for r in records),
        "duplicate_tokens": sum(r.num_duplicate for r in records),
        "missing_tokens": sum(r.num_missing for r in records),
        "wrong_tokens": sum(r.num_wrong for r in records),
        "http_streams": sum(r.protocol == "http" for r in records),
        "http_text_mismatch": sum(r.text_mismatch for r in records if r.protocol == "http"),
        "sdk_text_mismatch": sum(r.text_mismatch for r in sdk),
        "max_chunk_tokens": max((r.max_chunk_tokens for r in sdk), default=0),
        "stall_s": {"p50": round(quantile(gaps, 0.5), 3), "p99": round(quantile(gaps, 0.99), 3),
                    "max": round(max(gaps, default=0.0), 3)},
        "by_gateway": by_gateway,
    }


def record_dict(rec: StreamRecord) -> dict:
    out = asdict(rec)
    for key in ("sent_s", "end_s", "error_s", "max_gap_s", "max_gap_end_s"):
        out[key] = round(out[key], 3)
    return out


@dataclass(slots=True)
class ReferenceRun:
    """The undisturbed pass: tokens per spec (model workers) or the formula's check (sim)."""

    tokens: list[tuple[int, ...]] = field(default_factory=list)
    num_checked: int = 0
    num_mismatch: int = 0
    wall_s: float = 0.0


async def reference_tokens(client: Any, specs: list[Spec], max_tokens: int,
                           temperature: float, timeout_s: float) -> list[tuple[int, ...]]:
    """Each spec's output from an undisturbed cluster (all at once, nothing injected)."""

    async def one(spec: Spec) -> tuple[int, ...]:
        out = await client.generate(prompt_token_ids=list(spec.prompt_token_ids),
                                    max_tokens=max_tokens, temperature=temperature,
                                    seed=spec.seed, ignore_eos=True, timeout_s=timeout_s)
        if out.finish_reason != "length" or len(out.token_ids) != max_tokens:
            raise RuntimeError(f"reference run: {out.req_id} ended {out.finish_reason} after "
                               f"{len(out.token_ids)} of {max_tokens} tokens")
        return out.token_ids

    return list(await asyncio.gather(*[one(spec) for spec in specs]))

"""Structured output on a worker: the token bitmask of every grammar-constrained row of a
step (llguidance; specs in common/structured.py).

    spec (kind, text) --compile, once per spec (LRU)--> a matcher in its start state
    request's matcher  = a copy of it, advanced by the request's output tokens

A request's matcher is a pure function of (spec, output tokens so far): each step the
book syncs it with the tokens the engine hands over (it consumes only the new ones when
they extend what it has seen, else rebuilds it from the spec and every output token).
So a migrated or replayed request, or one whose matcher was evicted, gets exactly the
state an undisturbed one has, with nothing but the spec on the wire.

    bitmask: [rows, ceil(vocab / 32)] int32; bit (v % 32) of word (v // 32) set: token v
             may come next. EOS ids are set only where the grammar is complete; where it
             is complete and takes nothing more, only they are. A matcher in an error
             state (a spec that did not compile, a token it refused) allows EOS alone, so
             the request ends.

Compiling and mask filling run in llguidance's Rust code with the GIL released; the
runner calls `fill_bitmask` on a helper thread while the step's forward pass runs.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import torch

from ferry.common import structured
from ferry.common.logging import get_logger
from ferry.common.sampling import SamplingParams

log = get_logger()

MAX_COMPILED = 128  # compiled specs kept per worker (LRU)
MAX_MATCHERS = 4096  # request matchers kept (LRU; an evicted one is rebuilt from tokens)


def num_words(vocab_size: int) -> int:
    """int32 words of one bitmask row."""
    return (vocab_size + 31) // 32


def grammar_tokenizer_json(tokenizer_json: str, eos_token_ids: Sequence[int]) -> str:
    """tokenizer.json for llguidance: without the special tokens other than EOS.

    A grammar never allows a special token but EOS (they carry no text), and llguidance's
    start-up grows with their number much faster than linearly: the 124k reserved special
    tokens of a random llama3-8b preset took it 70-130 s on one CPU core (0.16 s without).
    Their ids stay in the vocabulary as ids with no text, which no mask ever allows."""
    data = json.loads(tokenizer_json)
    eos = set(eos_token_ids)
    dropped = {t["content"] for t in data.get("added_tokens", [])
               if t.get("special") and t["id"] not in eos}
    if not dropped:
        return tokenizer_json
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in dropped]
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):  # BPE / WordPiece: a special token may be listed here too
        data["model"]["vocab"] = {k: v for k, v in vocab.items() if k not in dropped}
    return json.dumps(data)


@dataclass(slots=True)
class _Tracked:
    spec: tuple[str, str]  # (kind, text)
    matcher: llguidance.LLMatcher
    seen: tuple[int, ...]  # output tokens the matcher has consumed, in order
    shard: int  # the book's shard it was copied in (and is filled by)


@dataclass(frozen=True, slots=True)
class GrammarRow:
    """One grammar-constrained row of a step."""

    req_id: str
    sampling: SamplingParams  # grammar_kind, grammar
    output_token_ids: tuple[int, ...]  # generated so far


class Grammars:
    """One worker's grammar book: compiled specs and request matchers. Not thread-safe:
    one caller at a time (the runner's helper thread).

    Matchers copied from one compiled spec share its lexer cache, and llguidance guards
    that cache with a lock: one executor's threads filling such copies in parallel wait
    on each other (on a 16-core H100 host, 4 or 8 threads filled 64 rows no faster than
    2). So the book is split in `num_threads` shards, new requests dealt to them in turn:
    each shard compiles its own copy of a spec and fills its rows on its own thread, and
    a lock is only shared within a shard. `shard=False` keeps one book filled by one
    executor of num_threads threads (for comparison: bench/grammar_bench.py)."""

    def __init__(self, tokenizer_json: str, *, vocab_size: int,
                 eos_token_ids: Sequence[int], max_compiled: int = MAX_COMPILED,
                 max_matchers: int = MAX_MATCHERS, num_threads: int | None = None,
                 shard: bool = True, pin_memory: bool = False) -> None:
        """tokenizer_json: tokenizer.json's text; vocab_size: the model's (it may exceed
        the tokenizer's; ids past it are never allowed). num_threads: default half the
        cores, at most 4."""
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"grammar threads must be >= 1, got {num_threads}")
        self.tokenizer = llguidance.LLTokenizer(
            grammar_tokenizer_json(tokenizer_json, eos_token_ids), n_vocab=vocab_size,
            eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.num_words = num_words(vocab_size)
        self.max_compiled = max_compiled
        self.max_matchers = max_matchers
        self.pin_memory = pin_memory
        self.num_threads = num_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.num_shards = self.num_threads if shard else 1
        # per shard: (kind, spec) -> its compiled matcher, LRU
        self._compiled: list[OrderedDict[tuple[str, str], llguidance.LLMatcher]] = [
            OrderedDict() for _ in range(self.num_shards)]
        self._matchers: OrderedDict[str, _Tracked] = OrderedDict()
        self._executors = [llguidance.LLExecutor(self.num_threads // self.num_shards)
                           for _ in range(self.num_shards)]
        self._pool = (ThreadPoolExecutor(self.num_shards - 1, thread_name_prefix="ferry-mask")
                      if self.num_shards > 1 else None)  # the caller fills one shard itself
        self._buffer = torch.empty((0, self.num_words), dtype=torch.int32)
        self._next_shard = 0
        self.num_compiles = 0
        self.num_rebuilds = 0

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> Grammars | None:
        """The book for a Hugging Face directory's tokenizer.json; None without one."""
        path = Path(model_dir) / "tokenizer.json"
        return cls(path.read_text(), **kwargs) if path.is_file() else None

    # -- compiled specs ------------------------------------------------------------------

    def compiled(self, kind: str, spec: str, shard: int = 0) -> llguidance.LLMatcher:
        """The spec's matcher in its start state in this shard (never advanced: callers
        copy it)."""
        key = (kind, spec)
        compiled = self._compiled[shard]
        matcher = compiled.get(key)
        if matcher is not None:
            compiled.move_to_end(key)
            return matcher
        try:
            grammar = structured.to_llguidance(kind, spec)
        except Exception as err:  # the gateway checked it; an SDK client may not have
            grammar = ""  # a matcher in its error state: EOS alone
            log.warning("grammar_invalid", kind=kind, error=str(err))
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            log.warning("grammar_compile_failed", kind=kind, error=matcher.get_error())
        self.num_compiles += 1
        compiled[key] = matcher
        if len(compiled) > self.max_compiled:
            compiled.popitem(last=False)
        return matcher

    # -- request matchers ----------------------------------------------------------------

    def matcher(self, row: GrammarRow) -> llguidance.LLMatcher:
        """The request's matcher, advanced to the end of its output tokens."""
        return self._tracked(row).matcher

    def _tracked(self, row: GrammarRow) -> _Tracked:
        spec = (row.sampling.grammar_kind, row.sampling.grammar)
        tokens = row.output_token_ids
        tracked = self._matchers.get(row.req_id)
        if tracked is not None:
            self._matchers.move_to_end(row.req_id)
            n = len(tracked.seen)
            if tracked.spec == spec and n <= len(tokens) and tokens[:n] == tracked.seen:
                if n < len(tokens):
                    tracked.matcher.consume_tokens(list(tokens[n:]))
                    tracked.seen = tokens
                return tracked
            self.num_rebuilds += 1  # another attempt, or another request under its id
        # New matchers go to the shards in turn: live requests stay evenly spread.
        shard = self._next_shard
        self._next_shard = (shard + 1) % self.num_shards
        matcher = self.compiled(*spec, shard).deep_copy()
        if tokens:
            matcher.consume_tokens(list(tokens))
        tracked = _Tracked(spec, matcher, tokens, shard)
        self._matchers[row.req_id] = tracked
        if len(self._matchers) > self.max_matchers:
            self._matchers.popitem(last=False)
        return tracked

    def forget(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)

    def fill_bitmask(self, rows: Sequence[GrammarRow]) -> torch.Tensor:
        """[len(rows), num_words] int32 on the host (pinned where the runner copies it to a
        GPU): row i's allowed next tokens. The buffer is reused by the next call."""
        by_shard: list[list[tuple[llguidance.LLMatcher, int]]] = [
            [] for _ in range(self.num_shards)]
        for i, row in enumerate(rows):
            tracked = self._tracked(row)
            by_shard[tracked.shard].append((tracked.matcher, i))
        if self._buffer.shape[0] < len(rows):
            self._buffer = torch.empty((max(len(rows), 2 * self._buffer.shape[0]),
                                        self.num_words), dtype=torch.int32,
                                       pin_memory=self.pin_memory)
        bitmask = self._buffer[: len(rows)]

        def fill(shard: int) -> None:  # rows of one shard; Rust, GIL released
            self._executors[shard].unsafe_compute_mask_ptr(
                by_shard[shard], bitmask.data_ptr(), self.num_words * 4, len(rows))

        busy = [shard for shard in range(self.num_shards) if by_shard[shard]]
        others = ([self._pool.submit(fill, shard) for shard in busy[1:]]
                  if self._pool is not None else [])
        try:
            if busy:
                fill(busy[0])
        finally:  # every fill is over before the buffer is handed out (or reused)
            for future in others:
                future.exception()
        for future in others:
            future.result()
        return bitmask

"""Each penalized request's token history kept as numpy arrays between steps.

The sampler's penalties need every token a request has seen, each step. Rebuilding that
from the chunk's tuples costs ~90 ns a token on the host (64 rows x 768 tokens: ~4.4 ms
a step on an H100's host, most of the penalty overhead). A request's history only grows
by the tokens it made since the last step (usually one), so the runner keeps it here and
appends; the sampler then joins whole arrays (np.concatenate).

An entry is checked against the chunk's history before use (prompt length and ends,
output length, the last cached output token); one that no longer prefixes it (a reused
id, a replay that went another way) is rebuilt. The cache is an LRU bounded by both
`max_entries` requests and `max_tokens` tokens held (8 bytes each): the least recently
used entries go first, never the one just asked for.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class _Entry:
    prompt: np.ndarray  # [p] int64
    outputs: np.ndarray  # [capacity] int64; the first num_outputs are the tokens made
    num_outputs: int


DEFAULT_MAX_TOKENS = 1 << 24  # 16M tokens: 128 MiB of host memory at most


class HistoryArrays:
    def __init__(self, max_entries: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_entries < 1 or max_tokens < 1:
            raise ValueError("max_entries and max_tokens must be >= 1")
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.num_tokens = 0  # held by all entries: prompts and output buffers' capacity
        self.num_rebuilds = 0  # entries built from scratch (first sight or a mismatch)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, req_id: str, prompt: Sequence[int], outputs: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, outputs) as int64 arrays equal to the given sequences; the output array
        is a view that later appends do not change."""
        entry = self._entries.get(req_id)
        if entry is None or not _prefixes(entry, prompt, outputs):
            entry = self._build(req_id, prompt)
        else:
            self._entries.move_to_end(req_id)
        new = len(outputs) - entry.num_outputs
        if new:
            if len(outputs) > len(entry.outputs):
                grown = np.empty(max(2 * len(entry.outputs), len(outputs), 16), dtype=np.int64)
                grown[: entry.num_outputs] = entry.outputs[: entry.num_outputs]
                self.num_tokens += len(grown) - len(entry.outputs)
                entry.outputs = grown
                self._evict(keep=req_id)
            entry.outputs[entry.num_outputs : len(outputs)] = outputs[entry.num_outputs :]
            entry.num_outputs = len(outputs)
        return entry.prompt, entry.outputs[: entry.num_outputs]

    def discard(self, req_id: str) -> None:
        entry = self._entries.pop(req_id, None)
        if entry is not None:
            self.num_tokens -= len(entry.prompt) + len(entry.outputs)

    def _build(self, req_id: str, prompt: Sequence[int]) -> _Entry:
        self.num_rebuilds += 1
        self.discard(req_id)  # a mismatched entry's tokens
        entry = _Entry(prompt=np.fromiter(prompt, dtype=np.int64, count=len(prompt)),
                       outputs=np.empty(16, dtype=np.int64), num_outputs=0)
        self._entries[req_id] = entry
        self.num_tokens += len(entry.prompt) + len(entry.outputs)
        self._evict(keep=req_id)
        return entry

    def _evict(self, *, keep: str) -> None:
        """Least recently used entries out until both bounds hold (keep stays)."""
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries
                                          or self.num_tokens > self.max_tokens):
            oldest = next(iter(self._entries))
            if oldest == keep:
                self._entries.move_to_end(keep)
                continue
            self.discard(oldest)


def _prefixes(entry: _Entry, prompt: Sequence[int], outputs: Sequence[int]) -> bool:
    """Whether the entry's tokens plausibly prefix (prompt, outputs): same prompt length
    and end tokens, no more outputs than given, and the same last cached output."""
    if len(entry.prompt) != len(prompt) or entry.num_outputs > len(outputs):
        return False
    if len(prompt) and (entry.prompt[0] != prompt[0] or entry.prompt[-1] != prompt[-1]):
        return False
    last = entry.num_outputs - 1
    return last < 0 or entry.outputs[last] == outputs[last]

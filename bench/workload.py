"""What a trace asks of the prompt tokens: shared prefixes and multi-turn sessions, turned
into deterministic token ids by the load driver (`ferry bench serve`) and the simulator
alike, so both feed the prefix caches the same prompts.

Trace fields beyond arrival_s / prompt_tokens / output_tokens / priority (bench/trace.py):

    prefix_id, prefix_tokens   the prompt starts with that shared prefix (a tenant's system
                               prompt, a document): the same prefix_tokens tokens for every
                               request naming it (with the same seed)
    session_id, turn           a multi-turn session: turn k's prompt is turn k-1's prompt,
                               then the tokens turn k-1 really generated, then its own
                               prompt_tokens new tokens; turn 0 starts at arrival_s, turn k
                               think_s after turn k-1 finished (its arrival_s is ignored)
    think_s

`prompt_tokens` is always the request's own new tokens (its message). A request with
none of these fields gets prompt_tokens random tokens, as before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST_PLAIN_TOKEN = 16  # token ids drawn from [16, vocab): above our tokenizers' specials


def token_ids(key: str, num: int, vocab_size: int) -> list[int]:
    """num token ids, a pure function of key (random.Random seeds from a string's SHA-512:
    the same in every process)."""
    rng = random.Random(key)
    return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(num)]


@dataclass
class _Session:
    turns: list[int]  # trace indices, in turn order
    history: list[int] = field(default_factory=list)  # the conversation so far


class Workload:
    def __init__(self, trace: list[dict], *, vocab_size: int, seed: int = 0) -> None:
        self.trace = trace
        self.vocab_size = vocab_size
        self.seed = seed
        self._sessions: dict[str, _Session] = {}
        self._session_of: dict[int, str] = {}
        for i, entry in enumerate(trace):
            sid = entry.get("session_id")
            if sid is not None:
                self._sessions.setdefault(sid, _Session([])).turns.append(i)
                self._session_of[i] = sid
        for session in self._sessions.values():
            session.turns.sort(key=lambda i: trace[i].get("turn", 0))
        self._prefixes: dict[str, list[int]] = {}

    @property
    def has_structure(self) -> bool:
        """Shared prefixes or sessions: prompts share tokens (a prefix cache matters)."""
        return bool(self._sessions) or any(e.get("prefix_id") for e in self.trace)

    @property
    def has_sessions(self) -> bool:
        """A later turn's prompt holds the tokens its earlier turns generated."""
        return bool(self._sessions)

    def starts(self) -> list[int]:
        """Trace indices that arrive at their arrival_s (all but the later turns)."""
        return [i for i in range(len(self.trace))
                if i not in self._session_of or self._sessions[self._session_of[i]].turns[0] == i]

    def prompt(self, index: int) -> list[int]:
        """Request index's prompt token ids (a later turn: after its session's history)."""
        entry = self.trace[index]
        message = token_ids(f"{self.seed}:msg:{index}", int(entry["prompt_tokens"]),
                            self.vocab_size)
        sid = self._session_of.get(index)
        head = self._sessions[sid].history if sid is not None else []
        if not head and entry.get("prefix_id"):
            head = self._prefix(str(entry["prefix_id"]), int(entry["prefix_tokens"]))
        return head + message

    def finished(self, index: int, prompt: list[int], output: list[int]
                 ) -> tuple[int, float] | None:
        """Request index ended with `output` after `prompt`: the session's next turn and
        its think time, or None."""
        sid = self._session_of.get(index)
        if sid is None:
            return None
        session = self._sessions[sid]
        session.history = prompt + output
        position = session.turns.index(index)
        if position + 1 == len(session.turns):
            return None
        nxt = session.turns[position + 1]
        return nxt, float(self.trace[nxt].get("think_s", 0.0))

    def abandoned(self, index: int) -> list[int]:
        """Request index failed: its session's later turns never come (their indices)."""
        sid = self._session_of.get(index)
        if sid is None:
            return []
        turns = self._sessions[sid].turns
        return turns[turns.index(index) + 1:]

    def _prefix(self, prefix_id: str, num: int) -> list[int]:
        tokens = self._prefixes.get(prefix_id)
        if tokens is None or len(tokens) < num:
            # the seed's own documents: a replay with another seed finds none of an earlier
            # replay's prefixes in the worker's cache (the simulator starts empty)
            tokens = self._prefixes[prefix_id] = token_ids(
                f"{self.seed}:prefix:{prefix_id}", num, self.vocab_size)
        return tokens[:num]

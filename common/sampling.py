"""Sampling parameters: a plain frozen dataclass shared by the wire, the gateway and the
engine (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

# Largest seed accepted: seeds feed a 32-bit counter-based hash together with the position.
MAX_SEED = 2**31 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16  # output tokens to generate at most (>= 1)
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    seed: int | None = None  # None: the engine draws one, then it travels with the request
    stop_token_ids: tuple[int, ...] = ()  # finish (reason "stop") on any of these
    ignore_eos: bool = False  # keep going past the model's EOS tokens
    stop: tuple[str, ...] = ()  # stop strings, matched by the gateway on detokenized text

    def validate(self) -> None:
        """Raise ValueError with a clear message for any out-of-range field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if len(self.stop) > 16 or any(not s for s in self.stop):
            raise ValueError("stop must hold at most 16 non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

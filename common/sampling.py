"""Sampling parameters: a plain frozen dataclass shared by the wire, the gateway and the
engine (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Largest seed accepted: seeds feed a 32-bit counter-based hash together with the position.
MAX_SEED = 2**31 - 1
MAX_LOGPROBS = 20  # most top tokens a request may ask logprobs for (vLLM's default bound)
MAX_LOGIT_BIAS = 100.0  # |bias| bound (OpenAI's)
MAX_LOGIT_BIAS_ENTRIES = 1024  # token ids one request may bias
GRAMMAR_KINDS = ("json", "regex", "choice", "grammar")  # common/structured.py's kinds
MAX_GRAMMAR_CHARS = 256 * 1024  # longest grammar spec (common/structured.MAX_SPEC_CHARS)


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
    # -- added in protocol 2 (older senders omit them: the defaults are neutral) --
    # Penalties (vLLM's semantics), applied to the logits before temperature:
    presence_penalty: float = 0.0  # [-2, 2], minus this for a token generated at least once
    frequency_penalty: float = 0.0  # [-2, 2], minus this times the token's count in the output
    repetition_penalty: float = 1.0  # > 0; a token of the prompt or output: logit / p if > 0,
    #                                  else logit * p (1 = off)
    min_p: float = 0.0  # [0, 1], drop tokens less likely than min_p x the most likely one
    min_tokens: int = 0  # stop ids and EOS are suppressed until this many output tokens
    logit_bias_token_ids: tuple[int, ...] = ()  # token ids to bias, distinct ...
    logit_bias_values: tuple[float, ...] = ()  # ... and what is added to their logits, each in
    #                                            [-100, 100]
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k's,
    #                              from the model's raw distribution (before any processing)
    include_stop_str_in_output: bool = False  # gateway: keep a matched stop string / stop
    #                                           token's text in the output
    skip_special_tokens: bool = True  # gateway: special tokens' text is left out
    # Structured output (common/structured.py): the output must match this grammar; EOS
    # only where it is complete. "" = none. The spec travels, never a compiled matcher: a
    # worker rebuilds the matcher from (kind, grammar, output tokens so far).
    grammar_kind: str = ""  # "" | "json" | "regex" | "choice" | "grammar"
    grammar: str = ""  # the spec: a JSON schema (JSON text), regex, JSON list, Lark/GBNF

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= float(getattr(self, name)) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (0.0 < float(self.repetition_penalty) and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not 0.0 <= float(self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got "
                             f"{self.min_tokens!r}")
        ids, values = self.logit_bias_token_ids, self.logit_bias_values
        if len(ids) != len(values) or len(set(ids)) != len(ids):
            raise ValueError("logit_bias needs one value per token id, each id once")
        if len(ids) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} token ids")
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError("logit_bias keys must be non-negative token ids")
        if any(not -MAX_LOGIT_BIAS <= float(v) <= MAX_LOGIT_BIAS for v in values):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not (
                isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                             f"{self.logprobs!r}")
        if self.grammar_kind:
            if self.grammar_kind not in GRAMMAR_KINDS:
                raise ValueError(f"grammar_kind must be one of {', '.join(GRAMMAR_KINDS)}, "
                                 f"got {self.grammar_kind!r}")
            if not self.grammar or len(self.grammar) > MAX_GRAMMAR_CHARS:
                raise ValueError(f"a grammar spec must hold 1 to {MAX_GRAMMAR_CHARS} "
                                 f"characters")
            # The grammar decides where output may end: EOS comes only where it is
            # complete, and then nothing else may.
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured output")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured output")
        elif self.grammar:
            raise ValueError("a grammar spec needs its grammar_kind")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_grammar(self) -> bool:
        return bool(self.grammar_kind)

    @property
    def has_penalties(self) -> bool:
        """The sampler needs the request's tokens (prompt and output) to penalize."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from the model's raw distribution (log_softmax of the
    logits before penalties, bias, temperature or top-k/top-p, as vLLM's default)."""

    logprob: float  # of the sampled token (-inf possible)
    top_token_ids: tuple[int, ...]  # the k most likely tokens, most likely first
    top_logprobs: tuple[float, ...]  # their logprobs, same order

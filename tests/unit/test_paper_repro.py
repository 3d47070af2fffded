"""The isolation bound on what priorities can give high-priority requests."""

from __future__ import annotations

import pytest

from bench.paper_repro import isolated_e2e_s
from services.worker.latency_model import LatencyModel


def test_isolated_e2e_is_prefill_chunks_then_one_decode_step_per_further_token():
    latency = LatencyModel(base_s=1.0, per_prefill_token_s=0.1, per_prefill_attn_s=0.001,
                           per_decode_seq_s=0.01, per_decode_context_s=0.001)
    trace = [
        {"priority": "high", "prompt_tokens": 10, "output_tokens": 3},
        {"priority": "high", "prompt_tokens": 4, "output_tokens": 1},
        {"priority": "normal", "prompt_tokens": 1000, "output_tokens": 1000},
    ]
    # First: chunks of 6 and 4 tokens (attention q_len * kv_len: 6 * 6, 4 * 10), then the
    # decode steps for output tokens 1 and 2 over caches of 11 and 12 tokens.
    first = (1 + 0.6 + 0.036) + (1 + 0.4 + 0.040) + (1 + 0.01 + 0.011) + (1 + 0.01 + 0.012)
    second = 1 + 0.4 + 0.016  # one chunk; its only output token comes with it
    assert isolated_e2e_s(trace, latency, priority="high", chunk_tokens=6) == pytest.approx(
        (first + second) / 2
    )

"""The checks of `ferry bench chaos` (bench/chaos_load.py) on pure cores: the sim formula
against the engine itself (chunked prefill, preemption-free decode, a replay as prompt +
delivered tokens), and the per-stream counting of duplicate, missing and wrong tokens."""

from __future__ import annotations

import asyncio

from ferry.bench.chaos_load import (
    Expected,
    Load,
    Spec,
    StreamRecord,
    make_specs,
    quantile,
    sim_tokens,
    summarize,
)
from ferry.common import wire
from ferry.common.config import EngineConfig
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.latency_model import LatencyModel
from ferry.services.worker.sim_executor import SimExecutor

LATENCY = LatencyModel(base_s=0.001, per_prefill_token_s=0.0, per_prefill_attn_s=0.0,
                       per_decode_seq_s=0.0, per_decode_context_s=0.0)


def sim_engine(max_batched_tokens: int = 2048) -> Engine:
    executor = SimExecutor(LATENCY, num_blocks=512, block_size=16, vocab_size=4096, sleep=False)
    return Engine(executor, EngineConfig(max_num_batched_tokens=max_batched_tokens))


def test_sim_formula_matches_the_engine_with_chunked_prefill_and_a_replay():
    specs = make_specs(6, seed=3, vocab_size=4096, prompt_len=(5, 90))
    engine = sim_engine(max_batched_tokens=32)  # long prompts prefill in several chunks
    params = [SamplingParams(max_tokens=40, seed=s.seed, ignore_eos=True) for s in specs]
    outs = engine.generate([list(s.prompt_token_ids) for s in specs], params)
    for spec, out in zip(specs, outs, strict=True):
        assert tuple(out) == sim_tokens(engine.executor, spec, 40)
    # A replay after a failure: prompt + the 17 tokens delivered, output goes on at 17.
    spec = specs[0]
    engine.add_request("replay", spec.prompt_token_ids, params[0],
                       output_token_ids=outs[0][:17], arrival_s=0.0)
    rest = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.first_index == 17 + len(rest)
            rest += out.token_ids
    assert tuple(outs[0][:17] + rest) == sim_tokens(engine.executor, spec, 40)


class FakeStream:
    def __init__(self, chunks: list[wire.TokenChunk]) -> None:
        self.chunks = chunks

    async def next_reply(self) -> wire.TokenChunk:
        return self.chunks.pop(0)

    def abort(self) -> None:
        pass


class FakeClient:
    def __init__(self, chunks: list[wire.TokenChunk]) -> None:
        self.chunks = chunks

    def stream(self, **kwargs) -> FakeStream:
        return FakeStream(self.chunks)


class DigitText:
    """A text model whose token i reads as str(i % 10)."""

    def detokenizer(self, prompt_token_ids):
        return self

    def step(self, token_ids) -> str:
        return "".join(str(t % 10) for t in token_ids)


def chunk(first: int, ids: tuple[int, ...], finish: str | None = None,
          text: str | None = None) -> wire.TokenChunk:
    return wire.TokenChunk(client_req_id="0", req_id="r", first_index=first, token_ids=ids,
                           text=DigitText().step(ids) if text is None else text,
                           finish_reason=finish, num_prompt_tokens=3)


def run_sdk_stream(chunks: list[wire.TokenChunk], expected: tuple[int, ...]) -> StreamRecord:
    spec = Spec((1, 2, 3), 7)
    load = Load(sdk={"gateway-a": FakeClient(chunks)}, http={}, model_name="tiny",
                expected=Expected([spec], [expected], DigitText()), max_tokens=len(expected),
                temperature=0.0, rate_per_s=1.0, http_fraction=0.0, rng=None, t0=0.0,
                request_timeout_s=10.0)
    rec = StreamRecord(num=0, spec=0, gateway="gateway-a", protocol="sdk", sent_s=0.0)
    asyncio.run(load.sdk_stream(rec))
    return rec


def test_an_unbroken_stream_is_ok():
    rec = run_sdk_stream([chunk(0, (10, 11)), chunk(2, (12,)), chunk(3, (13,), "length")],
                         (10, 11, 12, 13))
    assert rec.ok(4) and not rec.cut_short(4)
    assert (rec.num_received, rec.num_duplicate, rec.num_missing, rec.num_wrong) == (4, 0, 0, 0)


def test_duplicates_gaps_and_wrong_tokens_are_counted_not_raised():
    rec = run_sdk_stream([chunk(0, (10, 11)), chunk(1, (11, 12)), chunk(4, (99,)),
                          chunk(5, (15,), "length")], (10, 11, 12, 13, 14, 15))
    assert (rec.num_duplicate, rec.num_missing, rec.num_wrong) == (1, 1, 1)
    assert rec.num_received == 5 and rec.cut_short(6) and not rec.ok(6)


def test_text_is_checked_too():
    rec = run_sdk_stream([chunk(0, (10, 11)), chunk(2, (12,), "length", text="x")],
                         (10, 11, 12))
    assert rec.num_wrong == 0 and rec.text_mismatch and not rec.ok(3)
    assert rec.text_diff["got"] == "01x" and rec.text_diff["want"] == "012"


def test_an_abort_ending_is_cut_short():
    rec = run_sdk_stream([chunk(0, (10,)), chunk(1, (), "abort")], (10, 11))
    assert rec.finish_reason == "abort" and rec.cut_short(2)


def test_summary_and_quantiles():
    recs = [StreamRecord(num=i, spec=0, gateway="gateway-a" if i % 2 else "gateway-b",
                         protocol="sdk", sent_s=0.0, num_received=4, finish_reason="length",
                         max_gap_s=float(i)) for i in range(10)]
    recs[3].error, recs[3].finish_reason = "ConnectionLost", None
    out = summarize(recs, 4)
    assert out["started"] == 10 and out["completed"] == 9
    assert out["failed"] == {"ConnectionLost": 1} and out["cut_short"] == 0
    assert out["by_gateway"]["gateway-a"]["failed"] == {"ConnectionLost": 1}
    assert out["stall_s"]["max"] == 9.0 and out["stall_s"]["p50"] == 4.0
    assert quantile([], 0.5) == 0.0 and quantile([1.0, 2.0], 0.99) == 2.0

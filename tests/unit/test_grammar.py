"""Structured output on the worker: the bitmask applied in the sampler (against a plain
torch reference), matchers rebuilt from (spec, output tokens), and the tiny model under
grammars through the real runner."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import pytest
import torch

from ferry.common import structured
from ferry.common.config import EngineConfig
from ferry.common.sampling import SamplingParams
from ferry.common.text import Tokenizer
from ferry.services.worker.engine.engine import Engine, RequestRejected
from ferry.services.worker.grammar import (
    GrammarRow,
    Grammars,
    grammar_tokenizer_json,
    num_words,
)
from ferry.services.worker.model.make_model import make_model
from ferry.services.worker.sampler import SamplingTensors, apply_token_bitmask, run_sampler
from tests.unit.fakes import TokenKVExecutor

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def check_person(value) -> None:
    """PERSON's constraints, by hand (jsonschema is not a dependency)."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "city"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert value["city"] in ("Paris", "Oslo", "Lima")


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]):
    """Token by token, in Python."""
    out = logits.clone()
    for i, row in enumerate(rows):
        words = bitmask[i].tolist()
        for v in range(logits.shape[1]):
            if not (words[v // 32] >> (v % 32)) & 1:
                out[row, v] = float("-inf")
    return out


@pytest.mark.parametrize("vocab_size", [64, 100, 257])
def test_bitmask_matches_a_plain_torch_reference(vocab_size):
    gen = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(5, vocab_size, generator=gen)
    # random words, sign bit included (int32 words are signed; bit 31 must count)
    bitmask = torch.randint(-2**31, 2**31, (3, num_words(vocab_size)), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    rows = [0, 2, 4]
    got = apply_token_bitmask(logits, bitmask, torch.tensor(rows))
    assert torch.equal(got, _reference_mask(logits, bitmask, rows))
    assert torch.equal(got[[1, 3]], logits[[1, 3]])  # rows without a grammar untouched
    every = apply_token_bitmask(logits[:3], bitmask)  # rows None: every row
    assert torch.equal(every, _reference_mask(logits[:3], bitmask, [0, 1, 2]))
    assert not torch.equal(got, logits)  # the input is not modified
    assert torch.equal(logits, torch.randn(5, vocab_size,
                                           generator=torch.Generator().manual_seed(vocab_size)))


def test_sampler_draws_only_allowed_tokens_and_argmax_among_them():
    vocab_size, n = 97, 6
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.zeros(n, num_words(vocab_size), dtype=torch.int32)
    allowed = [sorted(random.Random(r).sample(range(vocab_size), 3)) for r in range(n)]
    for r, ids in enumerate(allowed):
        for v in ids:
            bitmask[r, v // 32] |= 1 << (v % 32)  # v < 97: no sign bit for word 3... yet
    bitmask[0, 0] |= -2**31  # token 31 via the sign bit
    allowed[0] = sorted({*allowed[0], 31})
    params = [SamplingParams(temperature=0.0 if r % 2 else 1.0, seed=r, top_k=r % 3,
                             logprobs=2) for r in range(n)]
    for trial in range(20):
        logits = torch.randn(n, vocab_size, generator=gen) * 3
        st = SamplingTensors.build(params, [trial] * n, vocab_size=vocab_size, device="cpu",
                                   grammar_rows=list(range(n)), grammar_bitmask=bitmask)
        out = run_sampler(logits, st)
        for r, token in enumerate(out.token_ids.tolist()):
            assert token in allowed[r]
            if params[r].is_greedy:
                assert token == max(allowed[r], key=lambda v: logits[r, v].item())
        # logprobs are of the masked distribution (vLLM's): the allowed tokens hold it all
        assert torch.allclose(out.top_logprobs.exp().sum(dim=1)[:, None].clamp(max=1),
                              torch.ones(n, 1), atol=0.5)


def test_grammar_added_after_the_build_masks_the_same_rows():
    """The runner builds the sampling tensors while the masks are filled, then adds them
    (with_grammar): the same draw as building with them, on a subset of rows too."""
    vocab_size, n = 70, 4
    bitmask = torch.zeros(2, num_words(vocab_size), dtype=torch.int32)
    bitmask[0, 1] = 1 << 3  # row 1: token 35 alone
    bitmask[1, 2] = 1 << 0  # row 3: token 64 alone
    params = [SamplingParams(temperature=1.0, seed=r) for r in range(n)]
    logits = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(1))
    together = SamplingTensors.build(params, [5] * n, vocab_size=vocab_size, device="cpu",
                                     grammar_rows=[1, 3], grammar_bitmask=bitmask)
    later = SamplingTensors.build(params, [5] * n, vocab_size=vocab_size, device="cpu"
                                  ).with_grammar([1, 3], bitmask, vocab_size=vocab_size)
    tokens = run_sampler(logits, later).token_ids.tolist()
    assert tokens == run_sampler(logits, together).token_ids.tolist()
    assert tokens[1] == 35 and tokens[3] == 64
    with pytest.raises(ValueError, match="one grammar row per bitmask row"):
        later.with_grammar([1], bitmask, vocab_size=vocab_size)
    with pytest.raises(ValueError, match="cannot cover"):
        later.with_grammar([1, 3], bitmask[:, :2], vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer_json(tiny_dir):
    return (tiny_dir / "tokenizer.json").read_text()


def _grammars(tokenizer_json, **kwargs) -> Grammars:
    return Grammars(tokenizer_json, vocab_size=4096, eos_token_ids=(1, 4), **kwargs)


def _walk(grammars: Grammars, sampling: SamplingParams, seed: int, steps: int) -> list[int]:
    """Tokens drawn uniformly among the allowed ones, step by step (one request)."""
    rng, tokens = random.Random(seed), []
    for _ in range(steps):
        words = grammars.fill_bitmask([GrammarRow("r", sampling, tuple(tokens))])[0].tolist()
        allowed = [v for v in range(4096) if (words[v // 32] >> (v % 32)) & 1]
        token = rng.choice(allowed)
        if token in (1, 4):
            break
        tokens.append(token)
    return tokens


def test_sharded_book_fills_the_same_masks_as_one_shared_book(tokenizer_json):
    """Rows spread over 3 shards (each its own compiled specs and thread) get exactly the
    masks one book filled by one executor gives, step after step."""
    sampling = SamplingParams(grammar_kind="json", grammar=structured.json_spec(PERSON))
    walks = [_walk(_grammars(tokenizer_json), sampling, seed=s, steps=12) for s in range(8)]
    sharded = _grammars(tokenizer_json, num_threads=3)
    shared = _grammars(tokenizer_json, num_threads=3, shard=False)
    assert (sharded.num_shards, shared.num_shards) == (3, 1)
    for k in range(max(map(len, walks)) + 1):
        rows = [GrammarRow(f"req-{i}", sampling, tuple(w[:k])) for i, w in enumerate(walks)]
        assert torch.equal(sharded.fill_bitmask(rows), shared.fill_bitmask(rows)), k
        if k == 0:  # dealt in turn: 3, 3 and 2 requests
            assert sorted(t.shard for t in sharded._matchers.values()) == [0] * 3 + [1] * 3 + [2] * 2
    assert sharded.num_compiles == 3 and shared.num_compiles == 1  # a spec once a shard


def test_a_failing_shard_fails_the_fill_after_every_other_shard_is_done(tokenizer_json):
    """No shard is still writing into the (reused) bitmask buffer when the error comes."""
    sampling = SamplingParams(grammar_kind="json", grammar=structured.json_spec(PERSON))
    book = _grammars(tokenizer_json, num_threads=3)
    rows = [GrammarRow(f"req-{i}", sampling, ()) for i in range(3)]  # one a shard
    book.fill_bitmask(rows)
    finished = []

    class Slow:
        def unsafe_compute_mask_ptr(self, *args):
            time.sleep(0.2)
            finished.append(True)

    class Broken:
        def unsafe_compute_mask_ptr(self, *args):
            raise RuntimeError("mask failed")

    book._executors = [Broken(), Slow(), Slow()]
    with pytest.raises(RuntimeError, match="mask failed"):
        book.fill_bitmask(rows)
    assert finished == [True, True]


def test_matcher_is_rebuilt_from_spec_and_output_tokens(tokenizer_json):
    """A request's mask is a function of (spec, its output tokens): a worker that never
    saw it (migration, replay) or evicted it computes the same mask as the one that
    followed it step by step."""
    sampling = SamplingParams(grammar_kind="json", grammar=structured.json_spec(PERSON))
    source = _grammars(tokenizer_json)
    tokens = _walk(source, sampling, seed=3, steps=40)
    assert len(tokens) > 5
    elsewhere = _grammars(tokenizer_json, max_matchers=1)
    for k in (0, 1, len(tokens) // 2, len(tokens)):
        row = GrammarRow("r", sampling, tuple(tokens[:k]))
        fresh = elsewhere.fill_bitmask([GrammarRow("other", sampling, ()), row])[1].clone()
        followed = _grammars(tokenizer_json)
        for j in range(k + 1):  # advanced one token at a time
            stepwise = followed.fill_bitmask([GrammarRow("r", sampling, tuple(tokens[:j]))])
        assert torch.equal(fresh, stepwise[0]), k
    # a replay from fewer tokens (another attempt under the same id) rebuilds
    replay = source.fill_bitmask([GrammarRow("r", sampling, tuple(tokens[:2]))])[0].clone()
    again = _grammars(tokenizer_json).fill_bitmask([GrammarRow("r", sampling,
                                                               tuple(tokens[:2]))])[0]
    assert torch.equal(replay, again) and source.num_rebuilds == 1
    assert source.num_compiles == 1  # one compile per spec, however many matchers
    # the finished object allows EOS alone
    words = source.fill_bitmask([GrammarRow("r", sampling, tuple(tokens))])[0].tolist()
    if len(tokens) < 40:  # the walk ended with EOS
        assert [v for v in range(4096) if (words[v // 32] >> (v % 32)) & 1] == [1, 4]


def test_a_refused_token_or_a_bad_spec_leaves_eos_alone(tokenizer_json):
    grammars = _grammars(tokenizer_json)
    regex = SamplingParams(grammar_kind="regex", grammar="[a-z]+")
    bad_history = GrammarRow("r", regex, (0,))  # BOS is never allowed
    bad_spec = GrammarRow("s", SamplingParams(grammar_kind="json", grammar="[1]"), ())
    for words in grammars.fill_bitmask([bad_history, bad_spec]).tolist():
        assert [v for v in range(4096) if (words[v // 32] >> (v % 32)) & 1] == [1, 4]


def test_gateway_check_names_the_problem():
    structured.check("json", structured.json_spec(PERSON))
    structured.check("choice", '["a", "b"]')
    for kind, spec, message in [("json", '{"type": "nope"}', "Invalid type"),
                                ("json", "[1]", "must be a JSON object"),
                                ("regex", "[a-", "unclosed character class"),
                                ("choice", "[]", "non-empty list"),
                                ("grammar", 'start: "a" x', "unknown name")]:
        with pytest.raises(ValueError, match=message):
            structured.check(kind, spec)


def _engine(tiny_dir, num_blocks=256) -> Engine:
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    return Engine(ModelRunner(RunnerConfig(model_dir=str(tiny_dir), num_blocks=num_blocks)),
                  EngineConfig())


def test_tiny_model_under_grammars(tiny_dir):
    engine = _engine(tiny_dir)
    tok = Tokenizer(tiny_dir)
    prompt = tok.encode("A person as JSON:")
    cases = [
        ("json", structured.json_spec(PERSON), lambda t: check_person(json.loads(t)) is None),
        ("json", structured.JSON_OBJECT_SCHEMA, lambda t: isinstance(json.loads(t), dict)),
        ("regex", r"[a-z]{3,8}@example\.com",
         lambda t: re.fullmatch(r"[a-z]{3,8}@example\.com", t)),
        ("choice", '["yes", "no", "maybe"]', lambda t: t in ("yes", "no", "maybe")),
    ]
    params = [SamplingParams(max_tokens=120, temperature=temperature, seed=seed,
                             grammar_kind=kind, grammar=spec)
              for kind, spec, _ in cases for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2))]
    # one batch: grammar rows of different specs side by side, and a plain row
    outputs = engine.generate([prompt] * (len(params) + 1),
                              params + [SamplingParams(max_tokens=5, seed=0, ignore_eos=True)])
    for i, out in enumerate(outputs[:-1]):
        text = tok.decode(out, skip_special_tokens=True)
        if len(out) == 120 and cases[i // 3][1] == structured.JSON_OBJECT_SCHEMA:
            assert text.startswith("{")  # any object: a random model may never close it
            continue
        assert out[-1] in (1, 4), "a grammar request ends with EOS once complete"
        assert cases[i // 3][2](text), text
    assert len(outputs[-1]) == 5
    runner = engine.executor
    # one compile per spec in each shard that had a request under it
    assert len(cases) <= runner.grammars.num_compiles <= len(cases) * runner.grammars.num_shards


def test_engine_refuses_grammar_without_a_tokenizer():
    engine = Engine(TokenKVExecutor(), EngineConfig())
    with pytest.raises(RequestRejected, match="needs the model's tokenizer"):
        engine.add_request("r", [5, 6], SamplingParams(grammar_kind="regex", grammar="a+"))


def test_grammar_cannot_be_combined_with_ignore_eos_or_min_tokens():
    for extra in ({"ignore_eos": True}, {"min_tokens": 2}):
        with pytest.raises(ValueError, match="cannot be combined with structured output"):
            SamplingParams(grammar_kind="regex", grammar="a+", **extra).validate()
    with pytest.raises(ValueError, match="grammar_kind must be one of"):
        SamplingParams(grammar_kind="yaml", grammar="a").validate()


ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 16},
        "items": {"type": "array", "minItems": 3, "maxItems": 5, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
    "additionalProperties": False,
}


def check_order(value) -> None:
    assert isinstance(value, dict) and set(value) == {"customer", "items", "express"}, value
    assert isinstance(value["customer"], str) and len(value["customer"]) <= 16
    assert 3 <= len(value["items"]) <= 5 and type(value["express"]) is bool
    for item in value["items"]:
        assert set(item) == {"sku", "qty"} and re.fullmatch(r"[A-Z]{3}-[0-9]{3}", item["sku"])
        assert type(item["qty"]) is int and 1 <= item["qty"] <= 9


def _tiny_runner(model_dir, *, num_blocks: int, block_size: int):
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    return ModelRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=num_blocks,
                                    block_size=block_size))


def _undisturbed(tiny_dir, prompt, sampling, output_token_ids=()) -> list[int]:
    engine = Engine(_tiny_runner(tiny_dir, num_blocks=128, block_size=4),
                    EngineConfig(max_num_batched_tokens=4096))
    engine.add_request("ref", prompt, sampling, output_token_ids=output_token_ids)
    tokens = list(output_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
    return tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_grammar_request_migrated_mid_output_yields_the_same_tokens(tiny_dir, temperature):
    """The real runner and sampler on the tiny model, KV over gloo: a json_schema request
    moved to another worker mid-output, and back, emits exactly the tokens of an
    undisturbed run (the destination rebuilds the matcher from the spec and the tokens
    so far), ends with EOS, and parses; so does a replay from its first tokens."""
    import functools

    from tests.unit.migration_harness import migrate, wait_done, wait_until
    from tests.unit.test_migration import cluster, finish_all

    tok = Tokenizer(tiny_dir)
    prompt = tok.encode("An order as JSON:")
    sampling = SamplingParams(max_tokens=150, temperature=temperature, seed=5,
                              grammar_kind="json", grammar=structured.json_spec(ORDER))
    executor = functools.partial(_tiny_runner, tiny_dir)

    async def body():
        async with cluster(executor=executor) as (net, gateway, (a, b)):
            a.step_delay_s = b.step_delay_s = 0.03  # outlives the gloo groups' first setup
            a.engine.add_request("g", prompt, sampling, reply_addr="inproc://gw")
            src, dst = a, b
            for at in (4, 16):
                await wait_until(lambda n=at: len(gateway.tokens.get("g", [])) >= n)
                done = await wait_done(net, migrate(net, src, dst, "g"))
                assert done.committed, done.reason
                src, dst = dst, src
            await finish_all(gateway, ["g"])
        return gateway.tokens["g"], gateway.finished["g"]

    tokens, reason = asyncio.run(asyncio.wait_for(body(), 60))
    assert tokens == _undisturbed(tiny_dir, prompt, sampling)
    assert reason == "stop" and tokens[-1] in (1, 4)
    check_order(json.loads(tok.decode(tokens, skip_special_tokens=True)))
    assert _undisturbed(tiny_dir, prompt, sampling, output_token_ids=tokens[:9]) == tokens


def test_special_tokens_but_eos_are_left_out_of_the_grammar_tokenizer(tmp_path):
    """The random llama3-8b preset's tokenizer reserves 124k special tokens (as Llama 3
    reserves 256): llguidance gets them not (its start-up took minutes with them), their
    ids are never allowed, and EOS still ends a complete answer."""
    model_dir = make_model("llama3-8b", tmp_path, weights=False)
    text = (model_dir / "tokenizer.json").read_text()
    eos = [1, 4]  # <|end_of_text|>, <|eot_id|>
    reduced = json.loads(grammar_tokenizer_json(text, eos))
    assert {t["id"] for t in reduced["added_tokens"]} == set(eos)
    assert "<|begin_of_text|>" not in reduced["model"]["vocab"]
    assert grammar_tokenizer_json(text, range(128256)) == text  # nothing to leave out
    grammars = Grammars(text, vocab_size=128256, eos_token_ids=eos)
    choice = SamplingParams(grammar_kind="choice", grammar='["yes"]')
    prefix = grammars.tokenizer.tokenize_str("yes")
    start, done = grammars.fill_bitmask([GrammarRow("a", choice, ()),
                                         GrammarRow("b", choice, tuple(prefix))]).tolist()
    allowed = [v for v in range(128256) if (start[v // 32] >> (v % 32)) & 1]
    assert allowed and all(5 <= v < 4096 for v in allowed)  # text tokens only
    assert [v for v in range(128256) if (done[v // 32] >> (v % 32)) & 1] == eos

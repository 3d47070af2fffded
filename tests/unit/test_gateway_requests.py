"""The gateway's pure request core: ordering, duplicates, gaps, replay, stop strings,
limits, timeouts. No sockets."""

from __future__ import annotations

import itertools
import random

import pytest

from ferry.common import wire
from ferry.common.sampling import MAX_SEED, SamplingParams, TokenLogprobs
from ferry.common.text import TextModel
from ferry.services.gateway.requests import (
    RELEASE_FINISHED,
    BadStream,
    GapOverflow,
    Rejected,
    RequestTable,
    StopMatcher,
    check_request,
)
from tests.unit.test_gateway_text import EOS, cut_mid_character, make_model_dir

REPLY_ADDR = "tcp://gateway:5610"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> TextModel:
    return TextModel.load(make_model_dir(tmp_path_factory.mktemp("model")))


def make_table(text: TextModel, **kwargs) -> RequestTable:
    return RequestTable(text, gateway_id="gw", reply_addr=REPLY_ADDR, rng=random.Random(0), **kwargs)


def add(table: RequestTable, *, prompt=(5, 6, 7), timeout_s=10.0, now=0.0, **sampling):
    sampling.setdefault("max_tokens", 64)
    sampling.setdefault("seed", 1)
    return table.add(
        prompt_token_ids=tuple(prompt), sampling=SamplingParams(**sampling), priority=0,
        timeout_s=timeout_s, sink=None, now=now, arrival_s=1000.0,
    )


def tokens(req, first_index, token_ids, finish_reason=None, instance_id="i0", attempt=0,
           num_cached_prompt_tokens=None):
    return wire.Tokens(req_id=req.req_id, instance_id=instance_id, first_index=first_index,
                       token_ids=tuple(token_ids), finish_reason=finish_reason, attempt=attempt,
                       num_cached_prompt_tokens=num_cached_prompt_tokens)


def output_ids(text: TextModel, sample: str) -> list[int]:
    return text.encode(sample, add_special_tokens=False)


# ---- ordering -----------------------------------------------------------------------------


def test_in_order_tokens_are_delivered_with_text(text):
    table = make_table(text)
    req = add(table)
    ids = output_ids(text, "hello world")
    d1 = table.on_tokens(tokens(req, 0, ids[:1]))
    d2 = table.on_tokens(tokens(req, 1, ids[1:]))
    assert (d1.first_index, d1.token_ids) == (0, tuple(ids[:1]))
    assert (d2.first_index, d2.token_ids) == (1, tuple(ids[1:]))
    assert d1.text + d2.text == "hello world"
    assert d2.finish_reason is None and d2.release is None
    assert req.output_token_ids == ids


def test_resent_indices_are_dropped(text):
    table = make_table(text)
    req = add(table)
    table.on_tokens(tokens(req, 0, [10, 11, 12]))
    assert table.on_tokens(tokens(req, 0, [10, 11, 12])) is None
    assert table.on_tokens(tokens(req, 1, [11])) is None
    delta = table.on_tokens(tokens(req, 2, [12, 13, 14]))  # overlaps: only 13, 14 are new
    assert (delta.first_index, delta.token_ids) == (3, (13, 14))
    assert req.output_token_ids == [10, 11, 12, 13, 14]


def test_a_gap_is_buffered_until_filled(text):
    table = make_table(text)
    req = add(table)
    assert table.on_tokens(tokens(req, 3, [13, 14])) is None
    assert table.on_tokens(tokens(req, 6, [16])) is None  # a second gap
    delta = table.on_tokens(tokens(req, 0, [10, 11, 12]))
    assert (delta.first_index, delta.token_ids) == (0, (10, 11, 12, 13, 14))
    delta = table.on_tokens(tokens(req, 5, [15]))
    assert (delta.first_index, delta.token_ids) == (5, (15, 16))
    assert req.pending == {}


@pytest.mark.parametrize("seed", range(20))
def test_shuffled_duplicated_chunks_reach_the_client_once_in_order(text, seed):
    rng = random.Random(seed)
    table = make_table(text)
    sample = "the quick brown fox 🚀 jumps over 世界 the lazy dog"
    ids = output_ids(text, sample)
    req = add(table, max_tokens=len(ids))
    chunks, i = [], 0
    while i < len(ids):
        size = rng.randint(1, 4)
        chunks.append((i, ids[i : i + size]))
        i += size
    messages = chunks + rng.sample(chunks, k=len(chunks) // 2)  # resends
    rng.shuffle(messages)
    deltas = [table.on_tokens(tokens(req, first, part)) for first, part in messages]
    deltas = [d for d in deltas if d is not None]
    delivered = [t for d in deltas for t in d.token_ids]
    assert delivered == ids  # each index once, in order
    assert [d.first_index for d in deltas] == list(
        itertools.accumulate([len(d.token_ids) for d in deltas[:-1]], initial=0)
    )
    assert "".join(d.text for d in deltas) == sample
    assert deltas[-1].finish_reason == "length"
    assert table.get(req.req_id) is None


def test_gap_buffer_is_bounded(text):
    table = make_table(text, max_pending_tokens=4)
    req = add(table)
    table.on_tokens(tokens(req, 1, [1, 2, 3]))
    with pytest.raises(GapOverflow):
        table.on_tokens(tokens(req, 10, [4, 5]))


def test_late_tokens_after_the_end_are_ignored(text):
    table = make_table(text)
    req = add(table, max_tokens=2)
    assert table.on_tokens(tokens(req, 0, [10, 11], "length")).finish_reason == "length"
    assert table.on_tokens(tokens(req, 0, [10, 11], "length")) is None
    assert len(table) == 0


# ---- finishing ----------------------------------------------------------------------------


def test_worker_finish_releases_as_finished(text):
    table = make_table(text)
    req = add(table)
    table.on_tokens(tokens(req, 0, [10, 11]))
    delta = table.on_tokens(tokens(req, 2, [], "stop"))  # finish in an empty message
    assert (delta.token_ids, delta.finish_reason, delta.release) == ((), "stop", RELEASE_FINISHED)
    assert table.get(req.req_id) is None


def test_finish_that_overtakes_its_tokens_waits_for_them(text):
    table = make_table(text)
    req = add(table)
    assert table.on_tokens(tokens(req, 2, [12, 13], "length")) is None
    delta = table.on_tokens(tokens(req, 0, [10, 11]))
    assert delta.token_ids == (10, 11, 12, 13)
    assert (delta.finish_reason, delta.release) == ("length", RELEASE_FINISHED)


def test_output_is_capped_at_max_tokens(text):
    table = make_table(text)
    req = add(table, max_tokens=3)
    delta = table.on_tokens(tokens(req, 0, [10, 11, 12, 13, 14]))
    assert delta.token_ids == (10, 11, 12)
    assert (delta.finish_reason, delta.release) == ("length", "stop")  # abort the excess


def test_worker_length_at_the_cap_is_a_plain_finish(text):
    table = make_table(text)
    req = add(table, max_tokens=3)
    delta = table.on_tokens(tokens(req, 0, [10, 11, 12], "length"))
    assert (delta.finish_reason, delta.release) == ("length", RELEASE_FINISHED)


# ---- stop strings -------------------------------------------------------------------------


def feed_one_by_one(table, req, ids):
    deltas = []
    for i, token_id in enumerate(ids):
        delta = table.on_tokens(tokens(req, i, [token_id]))
        if delta is not None:
            deltas.append(delta)
            if delta.finish_reason:
                break
    return deltas


def test_stop_string_across_token_boundaries_cuts_the_text(text):
    table = make_table(text)
    ids = output_ids(text, "the end is near; the end.")
    req = add(table, stop=("is near",))
    deltas = feed_one_by_one(table, req, ids)
    out = "".join(d.text for d in deltas)
    assert out == "the end "
    assert (deltas[-1].finish_reason, deltas[-1].release) == ("stop", "stop")
    # delivery stopped at the token that completed the stop string
    assert req.output_token_ids == ids[: len(req.output_token_ids)]
    assert text.decode(req.output_token_ids).endswith("is near")
    assert len(req.output_token_ids) < len(ids)


def test_stop_string_prefix_is_held_back_then_released(text):
    table = make_table(text)
    ids = output_ids(text, "the end. the lazy dog")
    req = add(table, stop=("the end is",), max_tokens=len(ids))
    deltas = feed_one_by_one(table, req, ids)
    released = ""
    for delta in deltas:
        released += delta.text
        # never release text that could still be the start of the stop string
        assert not any(released.endswith("the end is"[:k]) for k in range(3, 11))
    assert released == "the end. the lazy dog"  # no match: everything, flushed at the end
    assert deltas[-1].finish_reason == "length"


def test_stop_string_inside_one_batch_drops_later_tokens(text):
    table = make_table(text)
    ids = output_ids(text, "hello world, the quick brown fox")
    req = add(table, stop=("world",))
    delta = table.on_tokens(tokens(req, 0, ids))
    assert delta.text == "hello "
    assert delta.finish_reason == "stop"
    assert text.decode(delta.token_ids).endswith("world")
    assert len(delta.token_ids) < len(ids)


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(("fox", "quick"))
    assert matcher.feed("the qu") == ("the ", False)
    assert matcher.feed("ick brown fox") == ("", True)


def test_stop_matcher_holds_only_possible_prefixes():
    matcher = StopMatcher(("abc",))
    assert matcher.feed("xxab") == ("xx", False)
    assert matcher.feed("x") == ("abx", False)
    assert matcher.feed("a") == ("", False)
    assert matcher.flush() == "a"


def test_gateway_end_flushes_held_stop_text(text):
    table = make_table(text)
    ids = output_ids(text, "the end")
    req = add(table, stop=("the end is",))
    deltas = feed_one_by_one(table, req, ids)
    assert "".join(d.text for d in deltas) == ""  # all of it might start the stop string
    delta = table.finish(req.req_id, "timeout")
    assert (delta.text, delta.finish_reason, delta.release) == ("the end", "timeout", "timeout")


# ---- replay and placement -----------------------------------------------------------------


def test_replay_dispatches_prompt_plus_delivered_tokens(text):
    table = make_table(text)
    req = add(table, prompt=(1, 2, 3), max_tokens=10, seed=None, stop=("zz",))
    first_header = table.dispatch(req)
    first = wire.decode_body(first_header)
    assert first_header.mismatch(first) is None and first_header.prompt_len == 3
    assert first.output_token_ids == () and first.sampling.max_tokens == 10
    assert first_header.reply_addr == REPLY_ADDR and first.sampling.seed is not None
    table.on_placement(wire.Placement(req_id=req.req_id, instance_id="i0"))
    table.on_tokens(tokens(req, 0, [10, 11, 12]))
    table.on_tokens(tokens(req, 5, [15]))  # waits behind a gap when i0 dies
    other = add(table)
    table.on_tokens(tokens(other, 0, [1], instance_id="i1"))

    table.reset_for_replay(req)  # i0 died
    assert req.instance_id is None and req.pending == {} and req.attempt == 1
    replay_header = table.dispatch(req)
    replay = wire.decode_body(replay_header)
    assert replay_header.mismatch(replay) is None and replay_header.prompt_len == 6
    assert replay_header.attempt == replay.attempt == 1
    assert replay.prompt_token_ids == (1, 2, 3)
    assert replay.output_token_ids == (10, 11, 12)
    assert replay.sampling.max_tokens == 10  # the engine counts the 3 replayed outputs
    assert replay.sampling.seed == first.sampling.seed  # same tokens again
    assert replay.sampling.stop == ("zz",)

    # the new instance resends from the start: only new indices reach the client
    assert table.on_tokens(tokens(req, 0, [10, 11, 12], instance_id="i2", attempt=1)) is None
    delta = table.on_tokens(tokens(req, 3, [13, 14], instance_id="i2", attempt=1))
    assert (delta.first_index, delta.token_ids) == (3, (13, 14))
    assert req.instance_id == "i2"


def test_output_of_an_earlier_attempt_never_reaches_the_client(text):
    """i0 was declared dead and the request replayed; i0 comes back and sends what its
    copy made (tokens, then the abort the scheduler told it): all of it is ignored."""
    table = make_table(text)
    req = add(table, max_tokens=10)
    table.on_tokens(tokens(req, 0, [10, 11], instance_id="i0"))
    table.reset_for_replay(req)
    assert table.current(req.req_id, 0) is None and table.current(req.req_id, 1) is req
    assert table.on_tokens(tokens(req, 2, [12, 13], instance_id="i0")) is None
    assert table.on_tokens(tokens(req, 4, [], instance_id="i0", finish_reason="abort")) is None
    assert req.output_token_ids == [10, 11] and req.finish_at is None
    delta = table.on_tokens(tokens(req, 2, [22], instance_id="i1", attempt=1))
    assert delta.token_ids == (22,) and req.instance_id == "i1"


def test_holder_follows_the_most_advanced_sender(text):
    table = make_table(text)
    req = add(table)
    table.on_tokens(tokens(req, 0, [1, 2], instance_id="src"))
    table.on_tokens(tokens(req, 3, [4], instance_id="dst"))  # migrated; src's last is late
    table.on_tokens(tokens(req, 2, [3], instance_id="src"))
    assert req.instance_id == "dst"
    assert req.output_token_ids == [1, 2, 3, 4]
    table.on_placement(wire.Placement(req_id=req.req_id, instance_id="dst2"))
    assert req.instance_id == "dst2"


def test_the_first_cached_prompt_count_reported_stands(text):
    """The worker reports it with output index 0; a migration's destination or a replay's
    new copy may report another (or resend index 0): the first one stands."""
    table = make_table(text)
    req = add(table, prompt=tuple(range(1, 40)), max_tokens=10)
    assert req.num_cached_prompt_tokens is None
    table.on_tokens(tokens(req, 0, [10, 11, 12, 13], num_cached_prompt_tokens=32))
    table.on_tokens(tokens(req, 0, [10, 11, 12, 13], instance_id="i1",
                           num_cached_prompt_tokens=16))  # a resend
    table.reset_for_replay(req)
    table.on_tokens(tokens(req, 4, [14], instance_id="i2", attempt=1))
    assert req.num_cached_prompt_tokens == 32
    other = add(table)
    table.on_tokens(tokens(other, 0, [], finish_reason="abort"))  # never admitted
    assert other.num_cached_prompt_tokens is None


# ---- admission, seeds, timeouts -----------------------------------------------------------


def test_seed_is_resolved_and_eos_becomes_a_stop_id(text):
    table = make_table(text)
    eos = text.tokenizer.token_to_id(EOS)
    req = add(table, seed=None, stop_token_ids=(3,))
    assert 0 <= req.sampling.seed <= MAX_SEED
    assert req.sampling.stop_token_ids == (3, eos)
    assert add(table, seed=42).sampling.seed == 42
    assert add(table, ignore_eos=True).sampling.stop_token_ids == ()
    assert len({add(table).req_id for _ in range(50)}) == 50


def test_deadlines_expire_in_order(text):
    table = make_table(text)
    a = add(table, timeout_s=5.0, now=0.0)
    b = add(table, timeout_s=1.0, now=0.0)
    add(table, timeout_s=9.0, now=0.0)
    assert table.expired(0.5) == []
    assert table.expired(5.0) == [b, a]
    table.finish(a.req_id, "abort")
    assert table.expired(100.0)[0].deadline == 9.0
    assert table.finish(a.req_id, "abort") is None  # already gone


def test_abort_keeps_delivered_count(text):
    table = make_table(text)
    req = add(table)
    table.on_tokens(tokens(req, 0, [10, 11]))
    delta = table.finish(req.req_id, "abort")
    assert (delta.first_index, delta.token_ids, delta.finish_reason) == (2, (), "abort")
    assert delta.release == "abort"
    assert len(table) == 0


@pytest.mark.parametrize(
    ("prompt", "sampling", "match"),
    [
        ((1, 2), SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
        ((1, 2), SamplingParams(max_tokens=-5), "max_tokens must be an integer >= 1"),
        ((1, 2), SamplingParams(max_tokens=10**9), "max_tokens must be at most 1000"),
        ((1, 2), SamplingParams(temperature=-1.0), "temperature"),
        ((1, 2), SamplingParams(top_p=0.0), "top_p"),
        ((), SamplingParams(), "prompt is empty"),
        ((1, 99999), SamplingParams(), "prompt token ids must be in"),
        ((1, -1), SamplingParams(), "prompt token ids must be in"),
        (tuple(range(1, 200)), SamplingParams(max_tokens=100), "maximum context length is 256"),
    ],
)
def test_check_request_rejects_with_400(text, prompt, sampling, match):
    with pytest.raises(Rejected, match=match) as err:
        check_request(prompt, sampling, max_model_len=text.max_model_len,
                      vocab_size=text.vocab_size, max_tokens_limit=1000)
    assert err.value.code == 400


def test_check_request_accepts_exactly_the_context(text):
    check_request(tuple(range(1, 201)), SamplingParams(max_tokens=56),
                  max_model_len=256, vocab_size=text.vocab_size, max_tokens_limit=1000)


# ---- text only at the end (non-streaming clients) -----------------------------------------


def test_non_streaming_text_comes_whole_with_the_last_delta(text):
    sample = "hello 世界 🚀 fox"
    ids = output_ids(text, sample)
    streamed, whole = make_table(text), make_table(text)
    a = add(streamed, prompt=text.encode("the"), max_tokens=len(ids))
    b = whole.add(prompt_token_ids=tuple(text.encode("the")), sampling=SamplingParams(
        max_tokens=len(ids), seed=1), priority=0, timeout_s=10.0, sink=None, now=0.0,
        arrival_s=0.0, stream=False)
    pieces_a = [streamed.on_tokens(tokens(a, i, [t])).text for i, t in enumerate(ids)]
    pieces_b = [whole.on_tokens(tokens(b, i, [t])).text for i, t in enumerate(ids)]
    assert "".join(pieces_a) == sample
    assert pieces_b[:-1] == [""] * (len(ids) - 1) and pieces_b[-1] == sample


def test_non_streaming_abort_returns_the_text_so_far(text):
    table = make_table(text)
    ids = output_ids(text, "hello world")
    req = table.add(prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=50, seed=1),
                    priority=0, timeout_s=10.0, sink=None, now=0.0, arrival_s=0.0, stream=False)
    assert table.on_tokens(tokens(req, 0, ids)).text == ""
    assert table.finish(req.req_id, "timeout").text == "hello world"


@pytest.mark.parametrize("split", [1, 2, 5, 1000])
@pytest.mark.parametrize("finish", ["length", "stop_string", "timeout"])
def test_text_ending_mid_character_is_the_same_streamed_or_not(text, split, finish):
    """The last token ends partway through a UTF-8 character: the non-streamed text equals
    the streamed deltas joined, both ending with U+FFFD (vLLM's answer), never ''."""
    ids = cut_mid_character(text, "hello world 世界 🚀")
    full = text.tokenizer.decode(ids)
    assert full.endswith("\ufffd")
    texts = {}
    for stream in (True, False):
        table = make_table(text)
        sampling = SamplingParams(max_tokens=len(ids) + (finish == "timeout"), seed=1,
                                  stop=("never matched",) if finish == "stop_string" else ())
        req = table.add(prompt_token_ids=(1, 2), sampling=sampling, priority=0, timeout_s=10.0,
                        sink=None, now=0.0, arrival_s=0.0, stream=stream)
        deltas = [table.on_tokens(tokens(req, i, ids[i : i + split]))
                  for i in range(0, len(ids), split)]
        if finish == "timeout":
            deltas.append(table.finish(req.req_id, "timeout"))
        deltas = [d for d in deltas if d is not None]
        assert deltas[-1].finish_reason in ("length", "timeout")
        texts[stream] = "".join(d.text for d in deltas)
    assert texts[True] == texts[False] == full


def test_stop_strings_force_incremental_text(text):
    table = make_table(text)
    ids = output_ids(text, "hello world, the quick brown fox")
    req = table.add(prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=50, stop=("fox",)),
                    priority=0, timeout_s=10.0, sink=None, now=0.0, arrival_s=0.0, stream=False)
    assert table.on_tokens(tokens(req, 0, ids[:2])).text == "hello world"


def test_worker_stop_flushes_text_held_for_a_stop_string(text):
    table = make_table(text)
    ids = output_ids(text, "the end")
    req = add(table, stop=("the end is",))
    assert table.on_tokens(tokens(req, 0, ids)).text == ""  # might start the stop string
    eos = text.eos_token_ids[0]
    delta = table.on_tokens(tokens(req, len(ids), [eos], "stop"))  # the worker hit EOS
    assert (delta.text, delta.finish_reason, delta.release) == ("the end", "stop", RELEASE_FINISHED)


def test_deadline_heap_stays_bounded(text):
    table = make_table(text)
    for _ in range(5000):
        req = add(table, max_tokens=1)
        table.on_tokens(tokens(req, 0, [7], "length"))
    assert len(table) == 0 and len(table._deadlines) <= 1024 + 1
    live = add(table, timeout_s=1.0)
    assert table.expired(2.0) == [live]


# ---- logprobs, stop tokens, include_stop_str_in_output, skip_special_tokens ---------------


def _lp(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(logprob=-token_id / 10, top_token_ids=(token_id,),
                         top_logprobs=(-token_id / 10,))


def test_logprobs_follow_their_tokens_through_gaps_and_resends(text):
    table = make_table(text)
    req = add(table, logprobs=1, max_tokens=6)

    def msg(first, ids, finish=None):
        return wire.Tokens(req_id=req.req_id, instance_id="i0", first_index=first,
                           token_ids=tuple(ids), finish_reason=finish,
                           logprobs=tuple(_lp(t) for t in ids))

    assert table.on_tokens(msg(2, [12, 13])) is None  # past a gap
    d1 = table.on_tokens(msg(0, [10, 11, 12]))  # overlaps the buffered 12
    assert d1.token_ids == (10, 11, 12, 13) and d1.logprobs == tuple(map(_lp, d1.token_ids))
    d2 = table.on_tokens(msg(3, [13, 14, 15], "length"))  # resends 13
    assert d2.token_ids == (14, 15) and d2.logprobs == (_lp(14), _lp(15))


def test_missing_logprobs_fail_the_request(text):
    table = make_table(text)
    req = add(table, logprobs=0)
    with pytest.raises(BadStream, match="2 tokens came with 0 logprobs"):
        table.on_tokens(tokens(req, 0, [10, 11]))


def test_a_stop_token_text_is_left_out_unless_asked(text):
    ids = output_ids(text, "hello world")
    stop_id = output_ids(text, " the")[0]
    for include, stream in [(False, True), (False, False), (True, True), (True, False)]:
        table = make_table(text)
        req = table.add(prompt_token_ids=(1,), sampling=SamplingParams(
            max_tokens=50, seed=1, stop_token_ids=(stop_id,), include_stop_str_in_output=include),
            priority=0, timeout_s=10.0, sink=None, now=0.0, arrival_s=0.0, stream=stream)
        delta1 = table.on_tokens(tokens(req, 0, ids))
        delta2 = table.on_tokens(tokens(req, len(ids), [stop_id], "stop"))
        assert delta1.text + delta2.text == "hello world" + (" the" if include else "")
        assert delta2.token_ids == (stop_id,) and delta2.finish_reason == "stop"


def test_include_stop_str_in_output_keeps_the_matched_stop_string(text):
    ids = output_ids(text, "hello world, the quick brown fox")
    for include, want in [(False, "hello"), (True, "hello world")]:
        table = make_table(text)
        req = add(table, stop=(" world", "quick"), include_stop_str_in_output=include)
        deltas = feed_one_by_one(table, req, ids)
        assert "".join(d.text for d in deltas) == want
        assert deltas[-1].finish_reason == "stop"


def test_skip_special_tokens_false_shows_them(text):
    eos = text.tokenizer.token_to_id(EOS)
    ids = output_ids(text, "hello")
    for skip, want in [(True, "hellohello"), (False, "hello</s>hello")]:
        table = make_table(text)
        req = add(table, skip_special_tokens=skip, max_tokens=2 * len(ids) + 1, ignore_eos=True)
        delta = table.on_tokens(tokens(req, 0, [*ids, eos, *ids], "length"))
        assert delta.text == want


def test_stop_strings_are_not_matched_before_min_tokens(text):
    ids = output_ids(text, "hello world, hello world, the end")
    first_world = output_ids(text, "hello world")  # the first match ends within these
    for min_tokens, want in [(0, "hello"), (len(first_world), "hello world, hello")]:
        table = make_table(text)
        req = add(table, stop=(" world",), min_tokens=min_tokens)
        deltas = feed_one_by_one(table, req, ids)
        assert "".join(d.text for d in deltas) == want
        assert deltas[-1].finish_reason == "stop"

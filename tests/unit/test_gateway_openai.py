"""OpenAI request parsing and response shapes (pure)."""

from __future__ import annotations

import json

import pytest

from ferry.common import structured
from ferry.common.sampling import TokenLogprobs
from ferry.common.text import TextModel
from ferry.services.gateway import openai_protocol as oai
from tests.unit.test_gateway_text import MAX_MODEL_LEN, make_model_dir

MODEL = "tiny"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> TextModel:
    return TextModel.load(make_model_dir(tmp_path_factory.mktemp("model")))


def completion(text, **body):
    return oai.parse_completion(body, text, model_name=MODEL)


def chat(text, **body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return oai.parse_chat(body, text, model_name=MODEL, max_tokens_limit=1000)


def rejected(status: int, call, *args, **kwargs) -> str:
    with pytest.raises(oai.ApiError) as err:
        call(*args, **kwargs)
    assert err.value.status == status
    return err.value.message


def test_completion_defaults_and_text_prompt(text):
    sub = completion(text, model=MODEL, prompt="hello world")
    assert sub.prompt_token_ids == tuple(text.encode("hello world"))
    assert sub.sampling.max_tokens == 16
    assert (sub.sampling.temperature, sub.sampling.top_p, sub.sampling.top_k) == (1.0, 1.0, 0)
    assert sub.sampling.seed is None and sub.sampling.stop == ()
    assert (sub.stream, sub.priority, sub.timeout_s, sub.include_usage) == (False, 0, None, False)
    assert not sub.continuous_usage


def test_completion_fields_and_extras(text):
    sub = completion(
        text, prompt=[5, 6, 7], max_tokens=9, temperature=0, top_p=0.5, top_k=-1, seed=3,
        stop="\n", stream=True, stream_options={"include_usage": True}, ignore_eos=True,
        priority="high", timeout_s=2, n=1, logprobs=None, echo=False,
    )
    assert sub.prompt_token_ids == (5, 6, 7)
    s = sub.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (9, 0.0, 0.5, 0, 3)
    assert (s.stop, s.ignore_eos) == (("\n",), True)
    assert (sub.stream, sub.include_usage, sub.priority, sub.timeout_s) == (True, True, 1, 2.0)
    assert completion(text, prompt=[[5, 6]], stop=["a", "b"]).sampling.stop == ("a", "b")
    assert completion(text, prompt=["hi"]).prompt_token_ids == tuple(text.encode("hi"))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({}, "prompt is required"),
        ({"prompt": 5}, "prompt is required"),
        ({"prompt": ["a", "b"]}, "one prompt per request"),
        ({"prompt": [1, "x"]}, "one prompt per request"),
        ({"prompt": [1, True]}, "one prompt per request"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens must be an integer, got str"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens must be an integer"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens must be an integer, got bool"),
        ({"prompt": "x", "temperature": "hot"}, "temperature must be a number"),
        ({"prompt": "x", "stream": "yes"}, "stream must be a boolean"),
        ({"prompt": "x", "stop": 3}, "stop must be a string or a list of strings"),
        ({"prompt": "x", "stop": ["a", 1]}, "stop must be a string or a list of strings"),
        ({"prompt": "x", "n": 0}, "n must be in [1, 64]"),
        ({"prompt": "x", "n": 65}, "n must be in [1, 64]"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of must equal n (2)"),
        ({"prompt": "x", "logprobs": True}, "logprobs must be an integer, got bool"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias keys must be token ids"),
        ({"prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias keys must be token ids"),
        ({"prompt": "x", "logit_bias": {"5": "high"}}, "logit_bias[5] must be a number"),
        ({"prompt": "x", "logit_bias": [5]}, "logit_bias must be an object"),
        ({"prompt": "x", "presence_penalty": "a"}, "presence_penalty must be a number"),
        ({"prompt": "x", "min_tokens": 1.5}, "min_tokens must be an integer"),
        ({"prompt": "x", "skip_special_tokens": 1}, "skip_special_tokens must be a boolean"),
        ({"prompt": "x", "echo": True, "logprobs": 0}, "echo with logprobs is not supported"),
        ({"prompt": "x", "priority": "urgent"}, "priority must be 'normal' or 'high'"),
        ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options must be an object"),
        ({"prompt": "x", "stream_options": {"include_usage": True}},
         "stream_options is only allowed when stream is true"),
        ({"prompt": "x", "stream": True, "stream_options": {"include_usagee": True}},
         "Unrecognized request argument supplied: stream_options.include_usagee"),
        ({"prompt": "x", "stop_token_ids": [1, "2"]}, "stop_token_ids must be a list of token ids"),
        ({"prompt": "x", "user": 5}, "user must be a string"),
        ({"prompt": "x", "seed": "7"}, "seed must be an integer"),
    ],
)
def test_completion_bad_fields_are_400(text, body, match):
    assert match in rejected(400, oai.parse_completion, body, text, model_name=MODEL)


UNKNOWN_OR_UNSUPPORTED = [
    ("max_toknes", 5, "Unrecognized request argument supplied: max_toknes"),
    ("metadata", {"a": "b"}, "Unrecognized request argument supplied: metadata"),
    ("functions", [{"name": "f"}], "functions is not supported"),
    ("guided_decoding_backend", "xgrammar", "guided_decoding_backend is not supported"),
    ("guided_whitespace_pattern", " ", "guided_whitespace_pattern is not supported"),
    ("structured_outputs", {"json": {}}, "structured_outputs is not supported"),
    ("suffix", "tail", "suffix is not supported"),
]


@pytest.mark.parametrize(("name", "value", "match"), UNKNOWN_OR_UNSUPPORTED)
@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_unknown_and_unsupported_fields_are_400_naming_them(text, endpoint, name, value, match):
    call = completion if endpoint == "completion" else chat
    body = {"prompt": "x"} if endpoint == "completion" else {}
    message = rejected(400, call, text, **body, **{name: value})
    assert match in message and name in message


@pytest.mark.parametrize(("name", "value"), [
    ("response_format", {"type": "text"}), ("guided_decoding_backend", "guidance"),
    ("logit_bias", {}), ("presence_penalty", 0), ("echo", False),
    ("suffix", None), ("user", "someone"),
])
def test_neutral_values_of_unsupported_fields_are_fine(text, name, value):
    completion(text, prompt="x", **{name: value})
    chat(text, **{name: value})
    assert chat(text, tools=[], tool_choice="none").tools is None
    message = rejected(400, completion, text, prompt="x", tools=[])
    assert "Unrecognized request argument supplied: tools" in message  # chat only


def test_continuous_usage_stats_is_read(text):
    sub = completion(text, prompt="x", stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert sub.include_usage and sub.continuous_usage


@pytest.mark.parametrize(("message", "match"), [
    ({"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
     "messages[0].tool_calls[0].function must be an object"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1"}}]},
     "messages[0].tool_calls[0].function.arguments must be a JSON object"),
    ({"role": "tool", "content": "hi", "tool_call_id": 1},
     "messages[0].tool_call_id must be a string"),
    ({"role": "assistant", "content": "hi", "function_call": {"name": "f"}},
     "messages[0].function_call is not supported"),
    ({"role": "user", "content": "hi", "weight": 1}, "Unrecognized request argument supplied: "
                                                     "messages[0].weight"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]},
     "messages[0].content[0].cache"),
    ({"role": "user", "content": "hi", "name": 5}, "messages[0].name must be a string"),
])
def test_unknown_message_fields_are_400_naming_them(text, message, match):
    assert match in rejected(400, chat, text, messages=[message])


def test_unknown_model_is_404_and_a_non_object_body_400(text):
    assert "does not exist" in rejected(404, completion, text, model="gpt-9", prompt="x")
    assert "JSON object" in rejected(400, oai.parse_completion, [1], text, model_name=MODEL)


def test_chat_renders_the_template_without_a_second_bos(text):
    sub = chat(text, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]},
    ])
    expected = text.encode("<s>[system]: be brief\n[user]: hi you\n[assistant]: ",
                           add_special_tokens=False)
    assert sub.prompt_token_ids == tuple(expected)
    assert sub.prompt_token_ids.count(text.tokenizer.token_to_id("<s>")) == 1
    # no max_tokens: the rest of the context window
    assert sub.sampling.max_tokens == MAX_MODEL_LEN - len(expected)


def test_chat_max_completion_tokens_wins(text):
    assert chat(text, max_tokens=5).sampling.max_tokens == 5
    assert chat(text, max_tokens=5, max_completion_tokens=7).sampling.max_tokens == 7


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (None, "messages must be a non-empty list"),
        ([], "messages must be a non-empty list"),
        (["hi"], "messages[0] must be an object"),
        ([{"content": "hi"}], "messages[0].role must be a string"),
        ([{"role": "user", "content": 5}], "messages[0].content must be"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ],
)
def test_chat_bad_messages_are_400(text, messages, match):
    assert match in rejected(400, chat, text, messages=messages)


def test_response_shapes():
    usage = oai.usage(3, 2, 0)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                     "prompt_tokens_details": {"cached_tokens": 0}}
    assert oai.usage(40, 2, 32)["prompt_tokens_details"] == {"cached_tokens": 32}
    choices = [oai.choice(0, "hi", "stop", chat=False, stream=False)]
    body = oai.completion_response("r1", 7, MODEL, choices, usage, chat=False)
    assert body["id"] == "r1" and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}]
    choices = [oai.choice(i, "hi", "length", chat=True, stream=False) for i in range(2)]
    body = oai.completion_response("r1", 7, MODEL, choices, usage, chat=True)
    assert body["choices"][1]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][1]["index"] == 1
    chunk = oai.stream_chunk("r1", 7, MODEL, [oai.choice(0, "", None, chat=True, stream=True,
                                                          role=True)], chat=True)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunk = oai.stream_chunk("r1", 7, MODEL, [oai.choice(0, None, "stop", chat=True,
                                                          stream=True)], chat=True)
    assert chunk["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert oai.error_body(429, "busy") == {
        "error": {"message": "busy", "type": "rate_limit_error", "code": 429}
    }


def test_logprobs_shapes(text):
    ids = text.encode("hello world", add_special_tokens=False)[:2]
    strings = text.token_strings
    first, second = strings(ids)
    lps = [TokenLogprobs(logprob=-0.5, top_token_ids=(ids[0], 7), top_logprobs=(-0.5, -1.5)),
           TokenLogprobs(logprob=float("-inf"), top_token_ids=(9,), top_logprobs=(-0.1,))]
    out, end = oai.completion_logprobs(strings, ids, lps, text_offset=10)
    assert out["tokens"] == [first, second]
    assert out["token_logprobs"] == [-0.5, oai.MIN_LOGPROB]  # never -inf in JSON
    assert out["text_offset"] == [10, 10 + len(first)] and end == 10 + len(first) + len(second)
    seven, nine = strings([7, 9])
    assert out["top_logprobs"] == [{first: -0.5, seven: -1.5},
                                   {nine: -0.1, second: oai.MIN_LOGPROB}]  # + the sampled one
    chat_out = oai.chat_logprobs(strings, ids, lps)
    entry = chat_out["content"][0]
    assert entry == {"token": first, "logprob": -0.5, "bytes": list(first.encode()),
                     "top_logprobs": [
                         {"token": first, "logprob": -0.5, "bytes": list(first.encode())},
                         {"token": seven, "logprob": -1.5, "bytes": list(seven.encode())}]}
    assert len(chat_out["content"][1]["top_logprobs"]) == 1


def test_sampling_fields_are_read(text):
    sub = completion(text, prompt="x", presence_penalty=0.5, frequency_penalty=-1,
                     repetition_penalty=1.2, min_p=0.1, min_tokens=3, max_tokens=9,
                     logit_bias={"5": -100, "17": 2.5}, logprobs=4, stop_token_ids=[8],
                     include_stop_str_in_output=True, skip_special_tokens=False, n=3, best_of=3,
                     seed=11)
    s = sub.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
    assert (s.min_p, s.min_tokens, s.logprobs, s.stop_token_ids) == (0.1, 3, 4, (8,))
    assert (s.logit_bias_token_ids, s.logit_bias_values) == ((5, 17), (-100.0, 2.5))
    assert s.include_stop_str_in_output and not s.skip_special_tokens
    assert sub.n == 3
    seeds = [sub.sampling_of(i).seed for i in range(3)]
    assert seeds[0] == 11 and len(set(seeds)) == 3  # choice 0 keeps the request's seed
    assert seeds == [sub.sampling_of(i).seed for i in range(3)]  # derived, not drawn
    assert completion(text, prompt="x", n=2).sampling_of(1).seed is None
    assert chat(text, logprobs=True).sampling.logprobs == 0
    assert chat(text, logprobs=True, top_logprobs=5).sampling.logprobs == 5
    assert chat(text, logprobs=False).sampling.logprobs is None
    assert completion(text, prompt="x").sampling.logprobs is None


def test_echo_puts_the_prompt_text_first(text):
    assert completion(text, prompt="hello", echo=True).echo == "hello"
    ids = text.encode("hello world")
    assert completion(text, prompt=ids, echo=True).echo == "hello world"  # BOS skipped
    assert completion(text, prompt="hello").echo is None


def test_generation_config_gives_defaults_a_request_overrides(tmp_path):
    import json

    root = make_model_dir(tmp_path)
    (root / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
        "do_sample": True}))
    text = TextModel.load(root)
    s = completion(text, prompt="x").sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    s = chat(text, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0).sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (1.0, 1.0, 0, 1.0)


# ---- body hygiene -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "match"), [
    (b'{"prompt": "ok \\ud800"}', "prompt is not valid Unicode: a lone surrogate (\\ud800) at "
                                  "character 3"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content is not"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800b"}]}]}',
     "messages[0].content[0].text is not valid Unicode"),
    (b'{"prompt": "x", "stop": ["fine", "\\ud83d"]}', "stop[1] is not valid Unicode"),
    (b'{"prompt": "x", "\\ud800": 1}', "a key in the body is not valid Unicode"),
    (b'{"prompt": "\xed\xa0\x80"}', "prompt is not valid Unicode"),  # UTF-8-encoded surrogate
])
def test_strings_that_are_not_unicode_are_400_naming_the_field(raw, match):
    assert match in rejected(400, oai.decode_body, raw)
    # the same through the Python scanner large bodies with many values take
    many = raw[:-1] + b', "ids": [' + b"1," * oai.FAST_JSON_MAX_COMMAS + b"1]}"
    assert match in rejected(400, oai.decode_body, many)


def test_surrogate_pairs_are_fine():
    assert oai.decode_body(b'{"prompt": "\\ud83d\\ude80"}') == {"prompt": "🚀"}


@pytest.mark.parametrize("scanner", ["c", "python"])
def test_nesting_past_the_limit_is_400(scanner):
    pad = b', "ids": [' + b"1," * oai.FAST_JSON_MAX_COMMAS + b"1]" if scanner == "python" else b""

    def body(depth: int) -> bytes:
        return b'{"x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + pad + b"}"

    assert oai.decode_body(body(oai.MAX_JSON_DEPTH))["x"]  # 64 levels: fine
    assert "nested too deeply (at most 64 levels; x" in rejected(
        400, oai.decode_body, body(oai.MAX_JSON_DEPTH + 1))
    # Deeper than Python's recursion limit: the parser itself gives up (RecursionError).
    assert "nested too deeply" in rejected(400, oai.decode_body, body(100_000))
    assert "nested too deeply" in rejected(400, oai.decode_body, b"[" * 100_000)


def test_depth_counts_levels_from_the_top():
    oai.check_json({"a": [{"b": [1]}]}, max_depth=4)
    assert "messages[0].content is deeper" in rejected(
        400, oai.check_json, {"messages": [{"content": []}]}, max_depth=3)


def test_python_scanner_reads_what_json_loads_reads():
    import json

    raw = json.dumps({"prompt": list(range(60_000)), "stop": ["a,b", "é"], "x": {"y": None},
                      "t": 0.5, "u": True}).encode()
    assert raw.count(b",") > oai.FAST_JSON_MAX_COMMAS
    assert oai.decode_body(raw) == json.loads(raw)
    assert "not valid JSON" in rejected(400, oai.decode_body, raw[:-1])
    assert "not valid JSON" in rejected(400, oai.decode_body, b"\xff\xfe" + raw)


def test_prompt_text_too_long_for_any_tokenization_is_400_without_tokenizing(text):
    class Untouchable:
        def __getattr__(self, name):
            return getattr(text, name)

        def encode(self, *args, **kwargs):
            raise AssertionError("tokenized")

    limit = text.max_prompt_chars
    assert limit is not None
    message = rejected(400, completion, Untouchable(), prompt="x" * (limit + 1))
    assert message.startswith(f"this model's maximum context length is {MAX_MODEL_LEN} tokens; "
                              f"the prompt has {limit + 1} characters")
    half = "y" * (limit // 2 + 1)
    messages = [{"role": "user", "content": half}, {"role": "assistant", "content": half}]
    assert "maximum context length" in rejected(400, chat, Untouchable(), messages=messages)
    assert completion(text, prompt="x" * limit).prompt_token_ids  # at the bound: tokenized


# ---- /tokenize, /detokenize ---------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllm_shapes(text):
    out = oai.tokenize({"model": MODEL, "prompt": "hello world"}, text, model_name=MODEL)
    ids = text.encode("hello world")
    assert out == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                   "token_strs": None}
    out = oai.tokenize({"prompt": "hello", "add_special_tokens": False, "return_token_strs": True},
                       text, model_name=MODEL)
    assert out["tokens"] == text.encode("hello", add_special_tokens=False)
    assert out["token_strs"] == text.token_strings(out["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    out = oai.tokenize({"messages": messages}, text, model_name=MODEL)
    assert out["tokens"] == text.encode(text.apply_chat_template(messages),
                                        add_special_tokens=False)
    assert oai.detokenize({"tokens": ids}, text, model_name=MODEL) == {"prompt": "<s>hello world"}


@pytest.mark.parametrize(("call", "body", "match"), [
    ("tokenize", {}, "prompt is required"),
    ("tokenize", {"prompt": "x", "foo": 1}, "Unrecognized request argument supplied: foo"),
    ("tokenize", {"messages": [{"role": "user", "content": "x"}], "prompt": "x"},
     "supplied: prompt"),
    ("tokenize", {"messages": [{"role": "user", "content": "x"}],
                  "add_generation_prompt": False}, "add_generation_prompt: false"),
    ("tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{x}}"},
     "chat_template is not supported"),
    ("tokenize", {"prompt": "hello " * 300}, "maximum context length is 256"),
    ("detokenize", {"tokens": [1, "2"]}, "tokens must be a list of token ids"),
    ("detokenize", {"tokens": [10**6]}, "token ids must be in"),
    ("detokenize", {"tokens": [1], "skip": True}, "supplied: skip"),
])
def test_tokenize_and_detokenize_refuse_what_they_do_not_honour(text, call, body, match):
    assert match in rejected(400, getattr(oai, call), body, text, model_name=MODEL)


def test_tokenize_and_detokenize_check_the_model(text):
    assert "does not exist" in rejected(404, oai.tokenize, {"prompt": "x", "model": "other"},
                                        text, model_name=MODEL)
    assert "does not exist" in rejected(404, oai.detokenize, {"tokens": [], "model": "other"},
                                        text, model_name=MODEL)


# ---- structured output and tools ---------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now", "parameters": SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def tool_text(tmp_path_factory) -> TextModel:
    """The test model with the tiny model's template (Llama 3.1's tool calling)."""
    import json

    from ferry.services.worker.model.make_model import CHAT_TEMPLATE

    root = make_model_dir(tmp_path_factory.mktemp("tools"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps(config | {
        "chat_template": CHAT_TEMPLATE}))
    return TextModel.load(root)


@pytest.mark.parametrize("endpoint", ["completion", "chat"])
def test_structured_output_fields_become_a_grammar(text, endpoint):
    call = completion if endpoint == "completion" else chat
    body = {"prompt": "x"} if endpoint == "completion" else {}
    cases = [
        ({"response_format": {"type": "json_object"}}, ("json", structured.JSON_OBJECT_SCHEMA)),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "place", "schema": SCHEMA, "strict": True}}},
         ("json", structured.json_spec(SCHEMA))),
        ({"guided_json": SCHEMA}, ("json", structured.json_spec(SCHEMA))),
        ({"guided_json": '{"type": "integer"}'}, ("json", '{"type":"integer"}')),
        ({"guided_regex": "[0-9]+"}, ("regex", "[0-9]+")),
        ({"guided_choice": ["yes", "no"]}, ("choice", '["yes", "no"]')),
        ({"guided_grammar": 'start: "a" | "b"'}, ("grammar", 'start: "a" | "b"')),
        ({"response_format": {"type": "text"}}, ("", "")),
    ]
    for fields, (kind, spec) in cases:
        s = call(text, **body, **fields).sampling
        assert (s.grammar_kind, s.grammar) == (kind, spec), fields
        s.validate()


@pytest.mark.parametrize(("fields", "match"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format: the json spec does not compile: Invalid type: nope"),
    ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
    ({"response_format": {"type": "json_object", "x": 1}},
     "Unrecognized request argument supplied: response_format.x"),
    ({"guided_regex": "[a-"}, "guided_regex: the regex spec does not compile"),
    ({"guided_choice": []}, "guided_choice: choice must be a non-empty list"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "only one of"),
])
def test_bad_structured_output_is_400_naming_the_field(text, fields, match):
    assert match in rejected(400, completion, text, prompt="x", **fields)


def test_tools_render_and_force_a_call(tool_text):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    auto = chat(tool_text, messages=messages, tools=[WEATHER, CLOCK])
    assert auto.tools == oai.ToolPlan(mode="auto", names=("get_weather", "get_time"))
    assert auto.sampling.grammar_kind == ""  # the model chooses
    prompt = tool_text.decode(auto.prompt_token_ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and "Weather now" in prompt
    named = chat(tool_text, messages=messages, tools=[WEATHER, CLOCK], parallel_tool_calls=False,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tools.mode == "named" and named.tools.names == ("get_weather",)
    assert json.loads(named.sampling.grammar) == oai.tool_call_schema("get_weather", SCHEMA)
    required = chat(tool_text, messages=messages, tools=[WEATHER, CLOCK], tool_choice="required")
    assert [c["properties"]["name"] for c in json.loads(required.sampling.grammar)["anyOf"]] == [
        {"const": "get_weather"}, {"const": "get_time"}]
    none = chat(tool_text, messages=messages, tools=[WEATHER], tool_choice="none")
    assert none.tools is None and none.sampling.grammar_kind == ""
    # an earlier call and its result render (Llama 3.1's ipython turn)
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    sub = chat(tool_text, messages=history, tools=[WEATHER])
    prompt = tool_text.decode(sub.prompt_token_ids, skip_special_tokens=False)
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}' in prompt
    assert "ipython" in prompt and "-3 C" in prompt


@pytest.mark.parametrize(("fields", "match"), [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names 'nope', which is not in tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [WEATHER, WEATHER]}, "unique among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]},
     "Unrecognized request argument supplied: tools[0].function.extra"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "only one of"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls must be a boolean"),
    ({"parallel_tool_calls": True}, "only allowed when tools are given"),
])
def test_bad_tools_are_400(tool_text, fields, match):
    assert match in rejected(400, chat, tool_text, **fields)


def test_auto_needs_a_template_that_renders_tools(text):
    assert "renders tools" in rejected(400, chat, text, tools=[WEATHER])
    assert chat(text, tools=[WEATHER], tool_choice="required").tools.mode == "required"


def test_tool_call_parsing_and_streaming():
    from ferry.services.gateway.tool_calls import ToolCallStream, parse_tool_call

    text = '{"name": "get_weather", "parameters": {"city": "Oslo", "at": {"h": 1}}}'
    assert parse_tool_call(text, ("get_weather",)) == (
        "get_weather", '{"city": "Oslo", "at": {"h": 1}}')
    assert parse_tool_call(text, ("other",)) is None
    assert parse_tool_call("It is cold.", ("get_weather",)) is None
    assert parse_tool_call('{"parameters": {}, "name": "f"}', ("f",)) == ("f", "{}")
    for forced in (True, False):
        for size in (1, 4, 100):
            stream = ToolCallStream(("get_weather",), "call_x", forced=forced)
            content, deltas = "", []
            for i in range(0, len(text), size):
                c, d = stream.feed(text[i:i + size])
                content, deltas = content + c, deltas + d
            c, d = stream.finish()
            content, deltas = content + c, deltas + d
            assert content == "" and stream.called
            assert deltas[0] == {"index": 0, "id": "call_x", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}
            assert "".join(d["function"]["arguments"] for d in deltas) == \
                '{"city": "Oslo", "at": {"h": 1}}'
            if forced and size == 1:
                assert len(deltas) > 10  # arguments streamed as they came
    plain = ToolCallStream(("f",), "c", forced=False)
    assert plain.feed(" It") == (" It", []) and plain.feed(" is") == (" is", [])
    assert plain.finish() == ("", []) and not plain.called

"""OpenAI-compatible request parsing and response shapes, pure (no server): JSON bodies of
/v1/completions and /v1/chat/completions in, a Submission out; deltas in, JSON out.

Extra fields beyond OpenAI's: top_k, ignore_eos, priority ("normal" | "high"),
timeout_s (per-request deadline, seconds), and vLLM's stop_token_ids. Every field is
honoured or refused: an unknown one, or one Ferry does not implement (at a value other
than its neutral one), is a 400 that names it.

A body is checked before any field is read (`decode_body`): valid JSON, nested at most
MAX_JSON_DEPTH levels, every string valid Unicode (JSON can escape a lone surrogate,
"\\ud800", which no tokenizer or wire codec takes). A prompt longer than the model's
`max_prompt_chars` is refused without tokenizing it."""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ferry.common import structured, wire
from ferry.common.sampling import MAX_SEED, SamplingParams, TokenLogprobs
from ferry.common.text import TextModel
from ferry.services.gateway.requests import Rejected, check_prompt_chars

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_JSON_DEPTH = 64  # deepest nesting accepted (a request needs 4: messages[0].content[0])
# json.loads (C) holds the GIL for its whole run, ~0.1 us per value: a body with more
# commas than this (values, roughly) is parsed by the json module's Python scanner
# instead, which lets other threads run (strings are still scanned in C).
FAST_JSON_MAX_COMMAS = 50_000

MAX_N = 64  # most choices (n) one request may ask for
# Never -inf in JSON (it has none): logprobs are clamped to this, as vLLM does.
MIN_LOGPROB = -9999.0
# Sampling defaults a model's generation_config.json may set (vLLM reads the same ones);
# they apply where the request gives none.
GENERATION_CONFIG_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# Every field each endpoint reads (Ferry's extras: top_k, ignore_eos, priority, timeout_s);
# any other field is a 400 naming it, so a client never gets silently different behaviour.
# Structured output (common/structured.py): OpenAI's response_format, vLLM's guided_*.
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")
_SHARED_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "stop", "stop_token_ids", "seed", "user", "ignore_eos", "priority", "timeout_s",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
    "logit_bias", "logprobs", "include_stop_str_in_output", "skip_special_tokens",
    *STRUCTURED_FIELDS,
})
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "echo", "best_of"}
CHAT_FIELDS = _SHARED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                                "tool_choice", "parallel_tool_calls"}
STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
TOOL_FIELDS = frozenset({"type", "function"})
FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
JSON_SCHEMA_FIELDS = frozenset({"name", "schema", "strict", "description"})

# Fields Ferry does not implement: refused unless absent or at their neutral value.
_UNSUPPORTED = {
    "suffix": (None, ""),
    "echo": (None, False),  # chat (vLLM's extension)
    "functions": (None, []),  # OpenAI's deprecated form of tools
    "function_call": (None, "none"),
    "guided_decoding_backend": (None, "auto", "guidance", "llguidance"),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
}
_MESSAGE_UNSUPPORTED = ("function_call",)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": status}}


def decode_body(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of a request body; ApiError(400) when it is not JSON, is nested
    deeper than max_depth, or holds a string that is not valid Unicode."""
    too_deep = f"the body is nested too deeply (at most {max_depth} levels)"
    try:
        if raw.count(b",") <= FAST_JSON_MAX_COMMAS:
            body = json.loads(raw)
        else:
            decoder = json.JSONDecoder()
            decoder.scan_once = json.scanner.py_make_scanner(decoder)
            body = decoder.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise ApiError(400, too_deep) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    check_json(body, max_depth=max_depth)
    return body


def check_json(body: Any, *, max_depth: int) -> None:
    """ApiError(400) naming the first place where `body` nests deeper than max_depth or
    holds a string (value or key) that is not valid Unicode. Iterative: any depth."""
    if type(body) not in (dict, list):
        return
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= max_depth:
            raise ApiError(400, f"the body is nested too deeply (at most {max_depth} levels; "
                                f"{_path(path)} is deeper)")
        for key, item in value.items() if type(value) is dict else enumerate(value):
            if type(key) is str and not key.isascii():
                _check_unicode(key, path, what="a key in ")
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    _check_unicode(item, (*path, key))
            elif kind is dict or kind is list:
                stack.append((item, (*path, key)))


def _check_unicode(text: str, path: tuple[str | int, ...], *, what: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start].encode("utf-8", "backslashreplace").decode()
        raise ApiError(400, f"{what}{_path(path) or 'the body'} is not valid Unicode: a lone "
                            f"surrogate ({char}) at character {err.start}") from None


def _path(path: tuple[str | int, ...]) -> str:
    """("messages", 0, "content") -> messages[0].content"""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = part.encode("utf-8", "backslashreplace").decode()
            out += f".{part}" if out else part
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # of choice 0; `sampling_of` gives each choice's
    priority: int  # wire.Priority value
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final usage chunk
    continuous_usage: bool  # stream_options.continuous_usage_stats: usage in every chunk
    timeout_s: float | None  # None: the gateway's default
    n: int = 1  # independent samples (choices), each its own request
    echo: str | None = None  # completions: the prompt text to put before the output
    tools: ToolPlan | None = None  # chat: answers to read as tool calls (None: never)

    def sampling_of(self, choice: int) -> SamplingParams:
        """Choice i's parameters: its own seed, derived from the request's (choice 0 keeps
        it, so n=1 answers as before); no seed: each draws its own."""
        seed = self.sampling.seed
        if choice == 0 or seed is None:
            return self.sampling
        return replace(self.sampling, seed=choice_seed(seed, choice))


def choice_seed(seed: int, choice: int) -> int:
    """A seed for choice `choice` of a request seeded `seed` (splitmix64, 31 bits)."""
    x = (seed * 0x9E3779B97F4A7C15 + choice * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & MAX_SEED


def parse_completion(body: Any, text: TextModel, *, model_name: str) -> Submission:
    body = _object(body)
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), text)
        prompt_token_ids = tuple(text.encode(prompt))
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        prompt_token_ids = tuple(prompt)
    elif isinstance(prompt, list):
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)")
    else:
        raise ApiError(400, "prompt is required: a string or a list of token ids")
    max_tokens = _field(body, "max_tokens", int, DEFAULT_COMPLETION_MAX_TOKENS)
    logprobs = _field(body, "logprobs", int, None)
    sub = _submission(body, prompt_token_ids, max_tokens, text, model_name=model_name,
                      logprobs=logprobs)
    best_of = _field(body, "best_of", int, None)
    if best_of is not None and best_of != sub.n:
        raise ApiError(400, f"best_of must equal n ({sub.n}): Ferry returns every sample it "
                            f"draws, got best_of={best_of}")
    if _field(body, "echo", bool, False):
        if logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported: it needs the prompt's "
                                "logprobs, which Ferry's engine does not compute")
        echo = prompt if isinstance(prompt, str) else text.decode(
            prompt_token_ids, skip_special_tokens=sub.sampling.skip_special_tokens)
        sub = replace(sub, echo=echo)
    return sub


def parse_chat(body: Any, text: TextModel, *, model_name: str, max_tokens_limit: int) -> Submission:
    body = _object(body)
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    plain = [_message(m, i) for i, m in enumerate(messages)]
    tools, functions = _tools(body)
    plan, tool_spec = _tool_plan(body, functions, text)
    try:
        prompt_text = text.apply_chat_template(plain, tools=tools or None)
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    _check_prompt_chars(len(prompt_text), text)
    # The template writes the special tokens (BOS...) itself.
    prompt_token_ids = tuple(text.encode(prompt_text, add_special_tokens=False))
    max_tokens = _field(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, None)
    if max_tokens is None:  # the rest of the context window
        max_tokens = max(1, min(max_tokens_limit, text.max_model_len - len(prompt_token_ids)))
    top_logprobs = _field(body, "top_logprobs", int, None)
    if _field(body, "logprobs", bool, False):
        logprobs = top_logprobs or 0
    elif top_logprobs is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true")
    else:
        logprobs = None
    sub = _submission(body, prompt_token_ids, max_tokens, text, model_name=model_name,
                      logprobs=logprobs, tool_spec=tool_spec)
    return replace(sub, tools=plan) if plan is not None else sub


def check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    """ApiError(400) naming the first field Ferry would not honour: an unknown one, or a
    known feature it does not implement at a value other than its neutral one."""
    for name, value in body.items():
        if name in known:
            continue
        if name in _UNSUPPORTED:
            if not _is_neutral(value, _UNSUPPORTED[name]):
                raise ApiError(400, f"{name} is not supported")
        else:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}")


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """value equals one of `neutral` (an int equals a float; a bool never equals a number)."""
    return any(value == n and (type(value) is bool) == (type(n) is bool) for n in neutral)


def _submission(
    body: dict[str, Any], prompt_token_ids: tuple[int, ...], max_tokens: int, text: TextModel,
    *, model_name: str, logprobs: int | None, tool_spec: str | None = None,
) -> Submission:
    _check_model(body, model_name)
    grammar_kind, grammar = _structured_output(body, tool_spec)
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {n}")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of strings")
    stop_token_ids = _token_ids(body, "stop_token_ids")
    bias_ids, bias_values = _logit_bias(body)
    priority_name = _field(body, "priority", str, "normal")
    try:
        priority = int(wire.Priority.parse(priority_name))
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    _field(body, "user", str, None)  # an end-user id for the caller's records; no effect
    stream = _field(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    elif not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object")
    elif not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true")
    for name in stream_options:
        if name not in STREAM_OPTIONS:
            raise ApiError(400, f"Unrecognized request argument supplied: stream_options.{name}")
    timeout_s = _field(body, "timeout_s", float, None)
    defaults = text.sampling_defaults  # the model's generation_config.json
    top_k = _field(body, "top_k", int, defaults.get("top_k", 0))
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=_field(body, "temperature", float, defaults.get("temperature", 1.0)),
        top_p=_field(body, "top_p", float, defaults.get("top_p", 1.0)),
        top_k=0 if top_k == -1 else top_k,  # -1 means off in vLLM's API
        seed=_field(body, "seed", int, None),
        stop_token_ids=stop_token_ids,
        ignore_eos=_field(body, "ignore_eos", bool, False),
        stop=stop,
        presence_penalty=_field(body, "presence_penalty", float, 0.0),
        frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
        repetition_penalty=_field(body, "repetition_penalty", float,
                                  defaults.get("repetition_penalty", 1.0)),
        min_p=_field(body, "min_p", float, defaults.get("min_p", 0.0)),
        min_tokens=_field(body, "min_tokens", int, 0),
        logit_bias_token_ids=bias_ids,
        logit_bias_values=bias_values,
        logprobs=logprobs,
        include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False),
        skip_special_tokens=_field(body, "skip_special_tokens", bool, True),
        grammar_kind=grammar_kind,
        grammar=grammar,
    )
    return Submission(
        prompt_token_ids=prompt_token_ids,
        sampling=sampling,
        priority=priority,
        stream=stream,
        include_usage=_field(stream_options, "include_usage", bool, False),
        continuous_usage=_field(stream_options, "continuous_usage_stats", bool, False),
        timeout_s=timeout_s,
        n=n,
    )


def _token_ids(body: dict[str, Any], name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, list) and all(_is_int(t) and t >= 0 for t in value):
        return tuple(value)
    raise ApiError(400, f"{name} must be a list of token ids")


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """logit_bias {"token id": bias} as (ids, biases); JSON keys are strings."""
    value = body.get("logit_bias")
    if value is None:
        return (), ()
    if not isinstance(value, dict):
        raise ApiError(400, "logit_bias must be an object mapping token ids to biases")
    ids, values = [], []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias keys must be token ids, got {key[:20]!r}")
        if type(bias) not in (int, float):
            raise ApiError(400, f"logit_bias[{key}] must be a number, got {type(bias).__name__}")
        ids.append(int(key))
        values.append(float(bias))
    return tuple(ids), tuple(values)


# ---- /tokenize, /detokenize (vLLM's shapes) ---------------------------------------------

TOKENIZE_FIELDS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
TOKENIZE_CHAT_FIELDS = frozenset({"model", "messages", "add_generation_prompt",
                                  "continue_final_message", "add_special_tokens",
                                  "return_token_strs", "tools"})
_TOKENIZE_UNSUPPORTED = {
    "chat_template": (None,), "chat_template_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}), "media_io_kwargs": (None, {}),
}


def tokenize(body: Any, text: TextModel, *, model_name: str) -> dict[str, Any]:
    """POST /tokenize: {prompt} or {messages} in, {count, max_model_len, tokens,
    token_strs} out, as vLLM. A prompt longer than the context is a 400 (as vLLM)."""
    body = _object(body)
    chat = "messages" in body
    for name, value in body.items():
        if name in (TOKENIZE_CHAT_FIELDS if chat else TOKENIZE_FIELDS):
            continue
        if name in _TOKENIZE_UNSUPPORTED and _is_neutral(value, _TOKENIZE_UNSUPPORTED[name]):
            continue
        if name in _TOKENIZE_UNSUPPORTED:
            raise ApiError(400, f"{name} is not supported")
        raise ApiError(400, f"Unrecognized request argument supplied: {name}")
    _check_model(body, model_name)
    if chat:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list")
        if not _field(body, "add_generation_prompt", bool, True):
            raise ApiError(400, "add_generation_prompt: false is not supported")
        if _field(body, "continue_final_message", bool, False):
            raise ApiError(400, "continue_final_message is not supported")
        try:
            prompt = text.apply_chat_template([_message(m, i) for i, m in enumerate(messages)],
                                              tools=_tools(body)[0] or None)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        add_special_tokens = _field(body, "add_special_tokens", bool, False)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt is required: a string (or give messages)")
        add_special_tokens = _field(body, "add_special_tokens", bool, True)
    _check_prompt_chars(len(prompt), text)
    token_ids = text.encode(prompt, add_special_tokens=add_special_tokens)
    if len(token_ids) > text.max_model_len:
        raise ApiError(400, f"this model's maximum context length is {text.max_model_len} "
                            f"tokens; the prompt has {len(token_ids)} tokens")
    strings = (text.token_strings(token_ids)
               if _field(body, "return_token_strs", bool, False) else None)
    return {"count": len(token_ids), "max_model_len": text.max_model_len, "tokens": token_ids,
            "token_strs": strings}


def detokenize(body: Any, text: TextModel, *, model_name: str) -> dict[str, Any]:
    """POST /detokenize: {tokens} in, {prompt} out (special tokens kept), as vLLM."""
    body = _object(body)
    for name in body:
        if name not in ("model", "tokens"):
            raise ApiError(400, f"Unrecognized request argument supplied: {name}")
    _check_model(body, model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise ApiError(400, "tokens must be a list of token ids")
    if tokens and (min(tokens) < 0 or max(tokens) >= text.vocab_size):
        raise ApiError(400, f"token ids must be in [0, {text.vocab_size})")
    return {"prompt": text.decode(tokens, skip_special_tokens=False)}


def _check_model(body: dict[str, Any], model_name: str) -> None:
    model = _field(body, "model", str, None)
    if model is not None and model != model_name:
        raise ApiError(404, f"the model `{model}` does not exist; this server serves `{model_name}`")


def _check_prompt_chars(num_chars: int, text: TextModel) -> None:
    try:
        check_prompt_chars(num_chars, max_model_len=text.max_model_len,
                           max_prompt_chars=text.max_prompt_chars)
    except Rejected as err:
        raise ApiError(err.code, err.message) from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return type(value) is int


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """body[name] checked against kind (JSON null counts as absent); bool is not an int,
    and an int is a fine float."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and type(value) in (int, float):
        return float(value)
    if type(value) is not kind:
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
        raise ApiError(400, f"{name} must be {names[kind]}, got {type(value).__name__}")
    return value


def _message(message: Any, index: int) -> dict[str, str]:
    """One chat message as {"role", "content": str[, "name"]}; content parts of type "text"
    join."""
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{index}] must be an object")
    for key, value in message.items():
        if key in _MESSAGE_UNSUPPORTED:
            if value is not None:
                raise ApiError(400, f"messages[{index}].{key} is not supported (use "
                                    f"tool_calls)")
        elif key not in MESSAGE_FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: messages[{index}].{key}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise ApiError(400, f"messages[{index}].role must be a string")
    if content is None:
        content = ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported")
        for j, part in enumerate(content):
            if set(part) - {"type", "text"}:
                extra = sorted(set(part) - {"type", "text"})[0]
                raise ApiError(400, f"Unrecognized request argument supplied: "
                                    f"messages[{index}].content[{j}].{extra}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts")
    out: dict[str, Any] = {"role": role, "content": content}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ApiError(400, f"messages[{index}].name must be a string")
        out["name"] = name  # the chat template may render it
    calls = message.get("tool_calls")
    if calls is not None:
        out["tool_calls"] = [_message_tool_call(c, f"messages[{index}].tool_calls[{j}]")
                             for j, c in enumerate(_list(calls, f"messages[{index}].tool_calls"))]
    call_id = message.get("tool_call_id")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise ApiError(400, f"messages[{index}].tool_call_id must be a string")
        out["tool_call_id"] = call_id
    return out


def _message_tool_call(call: Any, where: str) -> dict[str, Any]:
    """An assistant's earlier tool call, for the template: arguments as an object (chat
    templates render them with tojson, as transformers passes them)."""
    call = _object_at(call, where)
    for key in call:
        if key not in ("id", "type", "function"):
            raise ApiError(400, f"Unrecognized request argument supplied: {where}.{key}")
    function = _object_at(call.get("function"), f"{where}.function")
    for key in function:
        if key not in ("name", "arguments"):
            raise ApiError(400, f"Unrecognized request argument supplied: {where}.function.{key}")
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}.function.name must be a non-empty string")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ApiError(400, f"{where}.function.arguments must be a JSON object") from None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments must be a JSON object")
    return {"id": call.get("id"), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _object_at(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list")
    return value


# ---- structured output and tools ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolPlan:
    """How a chat's tools shape its answer (OpenAI's tool_choice)."""

    mode: str  # "auto": the model may answer with a call | "required" | "named": it must
    names: tuple[str, ...]  # the functions it may call (one for "named")


def tool_call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A call as Llama 3.1 writes one: {"name": ..., "parameters": {...}}."""
    return {"type": "object",
            "properties": {"name": {"const": name},
                           "parameters": parameters if parameters else {"type": "object"}},
            "required": ["name", "parameters"], "additionalProperties": False}


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The tools as given (for the template) and each function's parameters by name."""
    tools = body.get("tools")
    if tools is None:
        return [], {}
    functions: dict[str, Any] = {}
    for i, tool in enumerate(_list(tools, "tools")):
        where = f"tools[{i}]"
        tool = _object_at(tool, where)
        for key in tool:
            if key not in TOOL_FIELDS:
                raise ApiError(400, f"Unrecognized request argument supplied: {where}.{key}")
        if tool.get("type", "function") != "function":
            raise ApiError(400, f"{where}.type must be \"function\"")
        function = _object_at(tool.get("function"), f"{where}.function")
        for key in function:
            if key not in FUNCTION_FIELDS:
                raise ApiError(400, f"Unrecognized request argument supplied: "
                                    f"{where}.function.{key}")
        name = function.get("name")
        if not isinstance(name, str) or not name or name in functions:
            raise ApiError(400, f"{where}.function.name must be a non-empty string, unique "
                                f"among the tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON schema object")
        _field(function, "description", str, None)
        _field(function, "strict", bool, None)  # calls always follow the schema exactly
        functions[name] = parameters
    return tools, functions


def _tool_plan(body: dict[str, Any], functions: dict[str, Any],
               text: TextModel) -> tuple[ToolPlan | None, str | None]:
    """(what to parse from the answer, the JSON schema its grammar forces, if any)."""
    choice = body.get("tool_choice")
    # One call per answer: true permits more, never demands them (OpenAI's rule: only
    # with tools).
    if _field(body, "parallel_tool_calls", bool, None) is not None and not functions:
        raise ApiError(400, "parallel_tool_calls is only allowed when tools are given")
    if choice is None:
        choice = "auto" if functions else "none"
    if choice == "none":
        return None, None
    if not functions:
        raise ApiError(400, "tool_choice needs tools")
    if choice == "auto":
        if not text.renders_tools:
            raise ApiError(400, "tool_choice \"auto\" needs a chat template that renders "
                                "tools, and this model's does not")
        return ToolPlan(mode="auto", names=tuple(functions)), None
    if choice == "required":
        calls = [tool_call_schema(n, p) for n, p in functions.items()]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return ToolPlan(mode="required", names=tuple(functions)), structured.json_spec(schema)
    if isinstance(choice, dict):
        function = choice.get("function")
        if (set(choice) <= {"type", "function"} and choice.get("type") == "function"
                and isinstance(function, dict) and set(function) == {"name"}):
            name = function["name"]
            if name not in functions:
                raise ApiError(400, f"tool_choice names {name!r}, which is not in tools")
            return (ToolPlan(mode="named", names=(name,)),
                    structured.json_spec(tool_call_schema(name, functions[name])))
    raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": '
                        '"function", "function": {"name": ...}}')


def _structured_output(body: dict[str, Any], tool_spec: str | None) -> tuple[str, str]:
    """(grammar_kind, spec) from response_format, guided_* or a forced tool call; ("", "")
    for none. At most one of them; the spec must compile (400 naming the field)."""
    given: list[tuple[str, str, str]] = []  # (field, kind, spec)
    fmt = body.get("response_format")
    if fmt is not None:
        fmt = _object_at(fmt, "response_format")
        kind = fmt.get("type")
        for key in fmt:
            if key not in ("type", "json_schema"):
                raise ApiError(400, f"Unrecognized request argument supplied: "
                                    f"response_format.{key}")
        if kind == "json_object":
            given.append(("response_format", structured.JSON, structured.JSON_OBJECT_SCHEMA))
        elif kind == "json_schema":
            spec = _object_at(fmt.get("json_schema"), "response_format.json_schema")
            for key in spec:
                if key not in JSON_SCHEMA_FIELDS:
                    raise ApiError(400, f"Unrecognized request argument supplied: "
                                        f"response_format.json_schema.{key}")
            schema = _object_at(spec.get("schema"), "response_format.json_schema.schema")
            given.append(("response_format", structured.JSON, structured.json_spec(schema)))
        elif kind != "text":
            raise ApiError(400, 'response_format.type must be "text", "json_object" or '
                                '"json_schema"')
    for name in STRUCTURED_FIELDS[1:]:
        if body.get(name) is not None:
            try:
                kind, spec = structured.from_guided(**{name: body[name]})
            except ValueError as err:
                raise ApiError(400, str(err)) from None
            given.append((name, kind, spec))
    if tool_spec is not None:
        given.append(("tool_choice", structured.JSON, tool_spec))
    if not given:
        return "", ""
    if len(given) > 1:
        raise ApiError(400, f"only one of {', '.join(STRUCTURED_FIELDS)} and a forced "
                            f"tool_choice may be given; got {', '.join(g[0] for g in given)}")
    name, kind, spec = given[0]
    try:
        structured.check(kind, spec)
    except ValueError as err:
        raise ApiError(400, f"{name}: {err}") from None
    return kind, spec


# ---- responses --------------------------------------------------------------------------


def usage(num_prompt_tokens: int, num_output_tokens: int,
          num_cached_prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object. num_cached_prompt_tokens: of the prompt's tokens, those whose
    KV came from a prefix cache (OpenAI's prompt_tokens_details.cached_tokens)."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_prompt_tokens},
    }


def choice(index: int, text: str | None, finish_reason: str | None,
           logprobs: dict[str, Any] | None = None, *, chat: bool, stream: bool,
           role: bool = False, tool_calls: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    """One entry of `choices`: a whole answer, or (stream) a delta of one; `text` None
    means no content field (chat), `role` the chat stream's opener. tool_calls (chat):
    the message's calls (content null), or a stream's call deltas."""
    if chat and stream:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        body: dict[str, Any] = {"index": index, "delta": delta}
    elif chat and tool_calls:
        body = {"index": index, "message": {"role": "assistant", "content": None,
                                            "tool_calls": tool_calls}}
    elif chat:
        body = {"index": index, "message": {"role": "assistant", "content": text or ""}}
    else:
        body = {"index": index, "text": text or ""}
    return body | {"logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(req_id: str, created: int, model: str, choices: list[dict[str, Any]],
                        usage_: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    return {
        "id": req_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def stream_chunk(req_id: str, created: int, model: str, choices: list[dict[str, Any]], *,
                 chat: bool) -> dict[str, Any]:
    return {
        "id": req_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }


def usage_chunk(req_id: str, created: int, model: str, usage_: dict[str, Any], *, chat: bool):
    return stream_chunk(req_id, created, model, [], chat=chat) | {"usage": usage_}


def completion_logprobs(
    strings: Callable[[Sequence[int]], list[str]], token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs], text_offset: int,
) -> tuple[dict[str, Any], int]:
    """The completions shape, {tokens, token_logprobs, top_logprobs, text_offset}, for these
    tokens; offsets count each token's own text from `text_offset` on (vLLM's rule). Each
    top_logprobs entry maps the top k tokens' text to their logprob, and the sampled
    token's (up to k + 1 entries). Returns it and the offset after the last token."""
    names = _token_names(strings, token_ids, logprobs)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for (token, tops), lp in zip(names, logprobs, strict=True):
        out["tokens"].append(token)
        out["token_logprobs"].append(_clamp(lp.logprob))
        top = {name: _clamp(value) for name, value in zip(tops, lp.top_logprobs, strict=True)}
        top.setdefault(token, _clamp(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out, text_offset


def chat_logprobs(strings: Callable[[Sequence[int]], list[str]], token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """The chat shape, {content: [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for (token, tops), lp in zip(_token_names(strings, token_ids, logprobs), logprobs,
                                 strict=True):
        content.append(_chat_entry(token, lp.logprob) | {"top_logprobs": [
            _chat_entry(name, value) for name, value in zip(tops, lp.top_logprobs, strict=True)
        ]})
    return {"content": content}


def _token_names(strings, token_ids, logprobs) -> list[tuple[str, list[str]]]:
    """(each token's text, its top tokens' texts), from one decode call."""
    ids = list(token_ids)
    for lp in logprobs:
        ids += lp.top_token_ids
    texts = strings(ids)
    out, at = [], len(token_ids)
    for i, lp in enumerate(logprobs):
        k = len(lp.top_token_ids)
        out.append((texts[i], texts[at : at + k]))
        at += k
    return out


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _clamp(logprob), "bytes": list(token.encode("utf-8"))}


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)

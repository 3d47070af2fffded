"""Structured output specs (torch-free; the gateway and the worker share it).

A request constrained to a grammar carries its spec in SamplingParams as two strings,
(`grammar_kind`, `grammar`), never a compiled object: each worker compiles the spec
itself (services/worker/grammar.py) and rebuilds a request's matcher from the spec and
the tokens generated so far, so migration and replay need nothing more on the wire.

    kind       spec                                   OpenAI / vLLM field
    "json"     a JSON schema, as JSON text            response_format json_schema /
                                                      json_object ('{"type": "object"}'),
                                                      guided_json, tool calls
    "regex"    a regular expression (Rust syntax)     guided_regex
    "choice"   a JSON list of strings                 guided_choice
    "grammar"  a Lark or GBNF grammar                 guided_grammar

The grammar library is llguidance (DESIGN §8 says why). JSON between its tokens takes
at most one space (JSON_WHITESPACE, the rule of Outlines, vLLM's first backend): with any
whitespace allowed, as llguidance's and xgrammar's defaults do, a model can spend its
whole output on newlines and indentation, and the tiny random model does. A schema's own
"x-guidance" object overrides it (e.g. {"whitespace_flexible": true} for any whitespace,
{"whitespace_flexible": false} for none).
"""

from __future__ import annotations

import json

from ferry.common.sampling import GRAMMAR_KINDS, MAX_GRAMMAR_CHARS

JSON = "json"
REGEX = "regex"
CHOICE = "choice"
GRAMMAR = "grammar"
KINDS = GRAMMAR_KINDS
assert KINDS == (JSON, REGEX, CHOICE, GRAMMAR)
MAX_SPEC_CHARS = MAX_GRAMMAR_CHARS  # longest spec a request may carry
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format {"type": "json_object"}
JSON_WHITESPACE = "[ ]?"  # between JSON tokens: one optional space


def to_llguidance(kind: str, spec: str) -> str:
    """The llguidance grammar (its JSON form) of a spec; ValueError when the spec is not
    of its kind's syntax (a schema that is not a JSON object, a choice list that is not a
    list of strings). Whether the grammar compiles is `check`'s job."""
    import llguidance  # here: the SDK imports this module for the constants alone

    if kind == JSON:
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    if kind == REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == CHOICE:
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError:
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(c) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if kind == GRAMMAR:
        return llguidance.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
    raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {kind!r}")


def check(kind: str, spec: str) -> None:
    """ValueError with llguidance's message when the spec does not compile (an unknown
    schema keyword, a bad regex, a grammar with no start rule...)."""
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"the {kind} spec is too long ({len(spec)} characters; at most "
                         f"{MAX_SPEC_CHARS})")
    import llguidance

    try:
        grammar = to_llguidance(kind, spec)
    except ValueError:
        raise
    except Exception as err:  # llguidance raises plain exceptions for some malformed specs
        raise ValueError(str(err)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the {kind} spec does not compile: {messages[0]}")


def from_guided(*, guided_json: object = None, guided_regex: str | None = None,
                guided_choice: object = None, guided_grammar: str | None = None
                ) -> tuple[str, str]:
    """(kind, spec) of vLLM's guided_* arguments (a schema as an object or JSON text);
    ("", "") for none; ValueError for more than one or a malformed one."""
    given = [(name, value) for name, value in (
        ("guided_json", guided_json), ("guided_regex", guided_regex),
        ("guided_choice", guided_choice), ("guided_grammar", guided_grammar))
        if value is not None]
    if not given:
        return "", ""
    if len(given) > 1:
        raise ValueError(f"only one of {', '.join(n for n, _ in given)} may be given")
    name, value = given[0]
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("guided_json must be a JSON schema") from None
        if not isinstance(value, dict):
            raise ValueError("guided_json must be a JSON schema object")
        return JSON, json_spec(value)
    if name == "guided_choice":
        if not isinstance(value, list | tuple) or not all(isinstance(c, str) for c in value):
            raise ValueError("guided_choice must be a list of strings")
        return CHOICE, json.dumps(list(value))
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return (REGEX if name == "guided_regex" else GRAMMAR), value


def json_spec(schema: object) -> str:
    """A schema as the spec text (compact, keys in the client's order: llguidance emits
    properties in schema order)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))

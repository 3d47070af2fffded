"""Tool calls read from a chat answer (pure; OpenAI's shapes out).

Ferry's models write a call as Llama 3.1 does, the whole answer one JSON object:

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    '------------ header ------------''----- arguments -----'

("arguments" is read as well as "parameters", and a leading <|python_tag|>.) A call's
`arguments` is the exact text of that value, so the streamed pieces join to the
non-streamed string. One call per answer (Llama 3.1's JSON format has no parallel calls).

Streaming (`ToolCallStream`): when the call is forced (tool_choice "required" or named,
whose grammar makes the answer a call, header first), the header is sent as soon as it is
complete, then the arguments as they come, holding back only trailing whitespace and
closing braces (the last `}` ends the call, not the arguments). With tool_choice "auto"
an answer that opens with `{` is held back to its end, then sent as a call if it is one,
else as content; any other answer streams as content at once.
"""

from __future__ import annotations

import json
import re
from typing import Any

_HEADER = re.compile(
    r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
    r'"(?:parameters|arguments)"\s*:\s*', re.S)
_OPENERS = ("{", "<|python_tag|>")
_TAIL = re.compile(r"[\s}]*\Z")


def parse_tool_call(text: str, names: tuple[str, ...]) -> tuple[str, str] | None:
    """(function name, arguments as JSON text) when the whole answer is a call of one of
    `names`, else None."""
    match = _HEADER.match(text)
    if match is not None:
        try:
            name = json.loads(f'"{match.group(1)}"')
        except json.JSONDecodeError:
            return None
        rest = text[match.end():].rstrip()
        if name in names and rest.endswith("}"):
            arguments = rest[:-1].rstrip()
            try:
                if isinstance(json.loads(arguments), dict):
                    return name, arguments
            except json.JSONDecodeError:
                pass
    try:  # another key order or spacing: re-serialized
        value = json.loads(text.strip().removeprefix("<|python_tag|>"))
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("parameters", value.get("arguments"))
    if not isinstance(arguments, dict) or set(value) - {"name", "parameters", "arguments"}:
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One entry of a message's `tool_calls`."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolCallStream:
    """One streamed answer read as a tool call. `feed` takes each text delta and returns
    (content to send, tool-call deltas to send); `finish` the rest at the end."""

    __slots__ = ("names", "forced", "call_id", "text", "name", "args_start", "num_sent",
                 "content_mode", "called")

    def __init__(self, names: tuple[str, ...], call_id: str, *, forced: bool) -> None:
        self.names = names
        self.forced = forced  # the grammar makes the answer a call
        self.call_id = call_id
        self.text = ""
        self.name: str | None = None  # once the header is complete (forced)
        self.args_start = 0  # where the arguments begin in text
        self.num_sent = 0  # characters of the arguments sent
        self.content_mode = False  # auto: the answer is plain content
        self.called = False  # a call was sent (finish_reason "tool_calls")

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        if self.content_mode:
            return delta, []
        self.text += delta
        if not self.forced:
            head = self.text.lstrip()
            if head and not any(o.startswith(head[:len(o)]) for o in _OPENERS):
                self.content_mode = True  # not a call: everything so far is content
                return self.text, []
            return "", []  # maybe a call: held back to the end
        out: list[dict[str, Any]] = []
        if self.name is None:
            match = _HEADER.match(self.text)
            if match is None or match.end() == len(self.text):  # more spaces may follow
                return "", []
            try:
                self.name = json.loads(f'"{match.group(1)}"')
            except json.JSONDecodeError:
                self.name = match.group(1)
            self.args_start = match.end()
            self.called = True
            out.append(self._opener())
        safe = len(_TAIL.sub("", self.text))  # trailing spaces and braces may end the call
        if safe > self.args_start + self.num_sent:
            out.append(self._arguments(self.text[self.args_start + self.num_sent:safe]))
            self.num_sent = safe - self.args_start
        return "", out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the answer: what is still held back."""
        if self.content_mode:
            return "", []
        parsed = parse_tool_call(self.text, self.names)
        if self.forced:
            if self.name is None or parsed is None:  # cut short: send what there is
                rest = self.text[self.args_start + self.num_sent:] if self.name else ""
                return ("" if self.name else self.text), (
                    [self._arguments(rest)] if rest else [])
            arguments = parsed[1]
            return "", ([self._arguments(arguments[self.num_sent:])]
                        if len(arguments) > self.num_sent else [])
        if parsed is None:
            return self.text, []
        self.name, self.called = parsed[0], True
        return "", [self._opener(), self._arguments(parsed[1])]

    def _opener(self) -> dict[str, Any]:
        return {"index": 0, "id": self.call_id, "type": "function",
                "function": {"name": self.name, "arguments": ""}}

    @staticmethod
    def _arguments(text: str) -> dict[str, Any]:
        return {"index": 0, "function": {"arguments": text}}

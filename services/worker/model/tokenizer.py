"""Text <-> token ids for a Hugging Face model directory, without torch (the gateway
imports this).

- `Tokenizer`: `tokenizer.json` through the `tokenizers` library, plus what
  `tokenizer_config.json` adds: BOS/EOS, whether to add BOS, and the chat template
  (rendered with jinja2 the way transformers renders it).
- `IncrementalDetokenizer`: turns a growing token stream into text deltas. A delta
  never ends in half a character: while the decoded tail is U+FFFD (bytes of a
  multi-byte character still to come) it holds the text back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template alone
REPLACEMENT_CHAR = "\ufffd"
# Longer text is encoded with encode_batch, which releases the GIL (encode holds it: a
# 1 MB prompt stopped every other thread of the process for a second).
GIL_FREE_ENCODE_CHARS = 4096


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{model_dir} has no {TOKENIZER_FILE}")
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        config_path = model_dir / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        # Explicit flags (Llama/Mistral tokenizer configs) mean: add by hand. Without
        # them, tokenizer.json's own post-processor decides (Llama 3, Qwen2).
        self._add_bos: bool | None = config.get("add_bos_token")
        self._add_eos: bool = bool(config.get("add_eos_token", False))
        self.chat_template = _chat_template(model_dir, config)
        self._template = None if self.chat_template is None else _compile(self.chat_template)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer knows, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds BOS (and EOS) as the model expects.
        Encode a rendered chat template with add_special_tokens=False: it has its BOS."""
        if self._add_bos is None:
            return self._encode(text, add_special_tokens)
        ids = self._encode(text, False)
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > GIL_FREE_ENCODE_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation ([{"role": ..., "content": ...}, ...]);
        `tools` as transformers passes them (OpenAI's {"type": "function", "function":
        {...}} entries; None: no tools)."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=[dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


class IncrementalDetokenizer:
    """Text deltas of a token stream; "".join(deltas) + flush() == decode(all ids).

    Two offsets into the ids (vLLM's scheme): text is decoded from `prefix_offset`, a
    few tokens of context before `read_offset` (decoders such as SentencePiece's drop
    a leading space at the start of a decode), and the delta is what the tokens after
    `read_offset` add to it. Offsets move only when the decoded text does not end in
    U+FFFD, so they always sit on character boundaries.
    """

    CONTEXT_TOKENS = 5  # left context kept from the prompt

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - self.CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)

    def add(self, token_ids: Iterable[int]) -> str:
        """Append new token ids; return the text they complete (maybe "")."""
        self._ids.extend(token_ids)
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        return self._advance(prefix_text, text)

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, U+FFFD included."""
        prefix_text, text = self._decode_window()
        if len(text) <= len(prefix_text):
            return ""
        return self._advance(prefix_text, text)

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        prefix_text = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        text = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        return prefix_text, text

    def _advance(self, prefix_text: str, text: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text) :]


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    path = model_dir / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(template: str) -> jinja2.Template:
    """A template in the sandboxed environment transformers uses for chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)

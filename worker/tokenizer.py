"""Text <-> token ids for a HF tokenizer directory: encode/decode, chat templates, streaming detokenizing."""
from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from scheduler.sampling_params import InvalidRequestError


class TokenizerLoadError(ValueError):
    """A tokenizer directory is missing a file or holds a corrupt one; the message names it."""


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or rendering it failed."""


class Tokenizer:
    """Wraps a ``tokenizers`` tokenizer with the special-token facts from the sibling config files."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: tuple[str, ...] = (),
        extra_eos_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = self._token_id(bos_token)
        eos_ids = [self._token_id(t) for t in eos_tokens] + list(extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._token_texts: dict[int, str] = {}  # by token id, filled as token_text is asked

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus tokenizer_config.json / generation_config.json / chat_template.jinja."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(f"{tokenizer_file} is missing")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerLoadError(f"cannot parse {tokenizer_file}: {exc}") from exc
        config = _read_optional_json(directory / "tokenizer_config.json")
        generation = _read_optional_json(directory / "generation_config.json")
        bos = _token_text(config.get("bos_token"))
        eos = _token_text(config.get("eos_token"))
        # tokenizer.json's post-processor alone decides whether encode() adds BOS/EOS; like
        # transformers 5, add_bos_token/add_eos_token in tokenizer_config.json are not consulted.
        return cls(
            backend,
            bos_token=bos,
            eos_tokens=(eos,) if eos else (),
            extra_eos_ids=_eos_ids(generation.get("eos_token_id"),
                                   directory / "generation_config.json"),
            chat_template=_chat_template(directory, config),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; InvalidRequestError for a string that is not Unicode text (a
        lone surrogate: bytes that were not UTF-8, or half of an escaped pair)."""
        _check_is_text(text)
        # encode_batch, unlike encode, releases the GIL (1 MiB of text encodes for ~1 s), at
        # no cost for short texts; so a server's other threads run while a long prompt encodes
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of each sequence (transformers' name, used by ported scripts)."""
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def __len__(self) -> int:
        """The vocabulary size with added tokens, as ``len()`` of a transformers tokenizer."""
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        """The token strings (vocabulary pieces, not decoded text) of one id or a list."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens included: vLLM's ``decoded_token`` and the
        token of OpenAI's logprobs. Cached (a decode costs ~1 us, a lookup ~0.05 us)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """transformers' name for ``token_to_id``, of one token or a list."""
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    @property
    def eos_token_id(self) -> int | None:
        """As in transformers, the id of ``eos_token`` (tokenizer_config.json's); None without
        one. ``eos_token_ids`` adds the others generation_config.json names."""
        return self._token_id(self.eos_token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, also when it holds part of a UTF-8 character (which
        decodes alone as U+FFFD): a byte-fallback piece (``<0xE9>``), a byte-level BPE piece,
        a SentencePiece piece (its U+2581 a space); else its decoded text."""
        piece = self._backend.id_to_token(token_id) or ""
        kinds = self._decoder_kinds
        if "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        if "ByteLevel" in kinds and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if "Replace" in kinds and "\u2581" in piece:
            return piece.replace("\u2581", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    @functools.cached_property
    def _decoder_kinds(self) -> frozenset[str]:
        """The types of the decoder's steps (ByteLevel, ByteFallback, Replace, ...)."""
        decoder = self._backend.decoder
        if decoder is None:
            return frozenset()
        state = json.loads(decoder.__getstate__())
        return frozenset(step.get("type") for step in state.get("decoders") or [state])

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool | None = None, tokenize: bool = False, *,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            **extra: Any) -> str | list[int]:
        """Render ``messages`` with the checkpoint's template (or ``chat_template``, a template
        string): the text, or with ``tokenize`` its token ids (transformers' default is True;
        here it is the text, which is what a prompt for ``generate`` usually is). ``extra`` are
        the template's own variables.

        ``add_generation_prompt`` (default: unless ``continue_final_message``) ends the text
        where the assistant's reply begins; ``continue_final_message`` ends it right after the
        last message's text instead, so that generation carries that message on.

        The rendered text already holds the template's special tokens (BOS included, if it
        writes one), so encode it with ``add_special_tokens=False``.
        """
        _refuse_unserved(extra)
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both "
                                    "be true: one starts a new assistant message, the other "
                                    "carries the last message on")
        template = self._template() if chat_template is None else _compiled(chat_template)
        if continue_final_message:
            messages = _marked_final_message(messages)
        try:
            text = template.render(messages=messages,
                                   add_generation_prompt=add_generation_prompt,
                                   **self._template_variables(extra))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the template's own code (a filter's TypeError)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if continue_final_message:
            text = _cut_at_mark(text)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool | None = None,
                    **extra: Any) -> list[int]:
        """The token ids of ``messages`` rendered with the chat template, ending where the
        assistant's reply begins (with ``add_generation_prompt``)."""
        return self.apply_chat_template(messages, add_generation_prompt, tokenize=True, **extra)

    def _template_variables(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The special tokens and the variables transformers defines, which ``extra`` (the
        caller's own) may override, as in transformers: a ``bos_token`` among them was a
        TypeError (given twice to render)."""
        # tools and documents unset but defined, as transformers renders them: `tools is not
        # none` is false
        return {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                "tools": None, "documents": None, **extra}

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if not self.chat_template:
                raise ChatTemplateError(
                    "this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                    "chat_template.jinja); send a plain prompt instead of messages"
                )
            self._compiled_template = _compiled(self.chat_template)
        return self._compiled_template

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


# transformers' apply_chat_template arguments that shape its return value, which this one does
# not do: taken as template variables, they were silently ignored
UNSERVED_CHAT_ARGUMENTS = ("return_tensors", "return_dict", "padding", "truncation", "max_length",
                           "tokenizer_kwargs", "return_assistant_tokens_mask")


# what apply_chat_template passes the template itself, or takes as its own arguments: a server
# taking template variables from its clients refuses these names
RESERVED_TEMPLATE_NAMES = ("messages", "add_generation_prompt", "continue_final_message",
                           "chat_template", "tokenize", "bos_token", "eos_token", "tools",
                           "documents", "raise_exception", "strftime_now",
                           *UNSERVED_CHAT_ARGUMENTS)


def _refuse_unserved(extra: dict[str, Any]) -> None:
    unserved = [name for name in UNSERVED_CHAT_ARGUMENTS if extra.get(name) not in (None, False)]
    if unserved:
        raise TypeError(f"apply_chat_template() does not take {', '.join(unserved)}: it returns "
                        "the text, or with tokenize=True a list of token ids")


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled in the sandbox; cached, as a caller's override comes again."""
    try:
        return _chat_environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


# Put after the last message's text to find where it ends once rendered; its trailing space
# shows whether the template trimmed the text (transformers then cuts the trimmed text too).
CONTINUE_MARK = "<|pagedserve:continue|> "


def _marked_final_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with CONTINUE_MARK after the last one's text (the last text part's, for
    content parts); the caller's messages are left as they are."""
    if not messages:
        raise ChatTemplateError("continue_final_message needs a message to continue")
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, list):
        texts = [i for i, part in enumerate(content) if isinstance(part, dict) and "text" in part]
        if not texts:
            raise ChatTemplateError("continue_final_message: the last message has no text to "
                                    "continue")
        content, part = list(content), texts[-1]
        content[part] = {**content[part], "text": content[part]["text"] + CONTINUE_MARK}
    elif isinstance(content, str):
        content += CONTINUE_MARK
    else:
        raise ChatTemplateError("continue_final_message: the last message has no text to continue")
    return [*messages[:-1], {**last, "content": content}]


def _cut_at_mark(text: str) -> str:
    """The rendered chat up to the end of the last message's text (marked by CONTINUE_MARK)."""
    at = text.rfind(CONTINUE_MARK.rstrip())
    if at < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not write the "
                                "last message's text, so there is no place to continue it from")
    return text[:at] if text.startswith(CONTINUE_MARK, at) else text[:at].rstrip()


def byte_level_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) take the characters from U+0100 on, in
    byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


_BYTE_OF_CHAR = {char: byte for byte, char in byte_level_chars().items()}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as templates take it: OpenAI-style content parts
    (``[{"type": "text", "text": ...}]``) joined into one string, no content as "", and
    OpenAI's "developer" role as "system" (templates know only that one); other parts are
    refused (text only)."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise InvalidRequestError("a message's content parts must be text parts "
                                      "({'type': 'text', 'text': ...}); pagedserve serves text")
        content = "".join(p["text"] for p in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {**message, "role": role, "content": content or ""}


def _check_is_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the text is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start} (bytes that are not UTF-8, or half of an escaped pair)") from None


class IncrementalDetokenizer:
    """Turns a growing token stream into text deltas, never splitting a UTF-8 character.

    Each call decodes only a short window: the tokens since the last emitted text plus the few
    before them (context that decoders such as Metaspace need to get leading spaces right).
    Text whose decoding ends in U+FFFD is held back until a later token completes the character;
    :meth:`flush` releases whatever is still held when the stream ends.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids)
        self._read = len(self._ids)  # ids before this are already emitted (or are the prompt)
        self._context = max(0, self._read - self.CONTEXT_TOKENS)

    def add(self, token_ids: list[int] | int) -> str:
        """Append new token ids; return the text they complete (possibly "")."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._emit(final=False)

    def add_one(self, token_id: int) -> tuple[str, list[int] | None]:
        """Append one token; return the text it completes and, with text, where in it each
        token since the last text starts (those held back, then this one); None while held.

        A held token that adds no character to the text before it (its bytes join that
        text's unfinished last one) starts at that character; any other starts where the
        text before it stops matching the final text: after the U+FFFD of bytes that never
        made a character, however the decoder replaces them."""
        context, first = self._context, self._read
        text = self.add(token_id)
        if not text:
            return "", None
        if len(self._ids) - first == 1:  # nothing was held back: the common case
            return text, [0]
        decoded = [self._decode(context, end) for end in range(first, len(self._ids))]
        before = decoded[0]  # the text already emitted, before the held tokens
        full = before + text
        decoded.append(full)
        starts = []
        for upto, then in zip(decoded, decoded[1:]):
            if upto.endswith("\ufffd") and len(then) == len(upto) and upto != before:
                start = len(upto) - 1
            else:
                start = len(os.path.commonprefix([upto, full]))
            starts.append(min(max(start - len(before), 0), len(text)))
        return text, starts

    def flush(self) -> str:
        """Text still held back (an unfinished character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self._ids) == self._read:
            return ""
        before = self._decode(self._context, self._read)
        full = self._decode(self._context, len(self._ids))
        if len(full) <= len(before) or (full.endswith("\ufffd") and not final):
            return ""
        self._context, self._read = self._read, len(self._ids)
        return full[len(before) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)


def _read_optional_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerLoadError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{file} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def token_ids_of(value: Any) -> tuple[int, ...] | None:
    """A Hugging Face config's ``eos_token_id`` (absent, one id or a list of them) as a tuple;
    None when it is something else."""
    ids = () if value is None else (value,) if not isinstance(value, list) else tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ids):
        return None
    return ids


def _eos_ids(value: Any, file: Path) -> tuple[int, ...]:
    ids = token_ids_of(value)
    if ids is None:
        raise TokenizerLoadError(f"{file}: eos_token_id={value!r} must be a token id or a list "
                                 "of them")
    return ids


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (what transformers 5 writes) wins over tokenizer_config's entry."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used by some templates) and renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates are written for: trimmed blocks, loop controls, HF's helper names."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

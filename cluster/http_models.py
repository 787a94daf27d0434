"""The OpenAI-compatible wire format: request bodies (validated by pydantic), the error body,
and the completion / chat response objects, whole and as stream chunks."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scheduler.sampling_params import InvalidRequestError, SamplingParams
from worker.output import JobOutput, RequestOutput
from worker.sampler import TokenLogprobs
from worker.tokenizer import (RESERVED_TEMPLATE_NAMES, IncrementalDetokenizer, Tokenizer,
                              template_message)

# A logprob JSON can carry (JSON has no -Infinity); far below any real one.
LOGPROB_FLOOR = -9999.0
# A completion's max_tokens when the request leaves it unset: OpenAI's default (and vLLM's)
COMPLETION_MAX_TOKENS = 16
# What one whole (not streamed) response may hold: it is built in memory before a byte is
# sent. A token costs ~30 bytes; a logprob entry 230 (completions) to 770 bytes (chat: with its
# token's bytes) and ~10 us of CPU: 25 chat samples of 2,042 tokens with top_logprobs 20 (1.07M
# entries) took 540 MiB and 9 s; n = 256 (as SamplingParams allows) would take ~6 GiB and ~1.5
# min. The engine's own limits (n, logprobs) bound each factor, not their product. A stream
# sends as it goes.
MAX_RESPONSE_TOKENS = 1 << 22
MAX_RESPONSE_LOGPROBS = 1 << 20


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status; never a traceback."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- requests ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: no "1" for 1; forbid: a misspelt field is an error, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: object) -> object:
        """OpenAI's fields are nullable, null meaning "unset": SDKs send ``"stream": null``.
        A misspelt field stays an error, null or not."""
        if isinstance(data, dict):
            return {name: value for name, value in data.items()
                    if value is not None or name not in cls.model_fields}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI pads each chunk with random characters unless told not to; none are sent here
    include_obfuscation: bool = False


class GenerationRequest(_Strict):
    """Fields both endpoints share: OpenAI's, then pagedserve's extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    logit_bias: dict[str, float] | None = None

    def no_op_values(self) -> dict[str, tuple]:
        """OpenAI fields pagedserve does not implement -> the values that ask for nothing:
        accepted (clients that always send them work); any other value is refused by name,
        not silently ignored."""
        return {}

    def check_supported(self) -> None:
        if self.include_usage and not self.stream:  # a usage chunk, of no stream
            raise bad_request("stream_options.include_usage needs stream=true",
                              "stream_options")
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            raise bad_request("stream_options.include_obfuscation=true is not supported by "
                              "pagedserve", "stream_options")
        for name, no_ops in self.no_op_values().items():
            value = getattr(self, name)
            if value not in no_ops:
                shown = json.dumps(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise bad_request(f"{name}={shown} is not supported by pagedserve", name)

    def field_names(self) -> dict[str, str]:
        """SamplingParams field -> the request field the user wrote, where they differ."""
        return {}

    def sampling_fields(self) -> dict:
        names = ("max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "top_k", "min_p", "repetition_penalty", "ignore_eos",
                 "stop_token_ids", "min_tokens", "logit_bias", "include_stop_str_in_output",
                 "skip_special_tokens", "truncate_prompt_tokens")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def sampling_params(self, defaults: dict | None = None, **overrides) -> SamplingParams:
        """The job's SamplingParams: ``defaults`` for the fields the request leaves unset; a
        bad or unsupported value is a 400 naming the request's field."""
        self.check_supported()
        try:
            return SamplingParams(**{**(defaults or {}), **self.sampling_fields(), **overrides})
        except InvalidRequestError as exc:
            raise bad_request(*in_request_terms(str(exc), self.field_names())) from None

    def kept_length(self, prompt_ids: list[int]) -> int:
        """The prompt's length once the scheduler has applied truncate_prompt_tokens."""
        keep = self.truncate_prompt_tokens
        return min(len(prompt_ids), keep) if keep is not None and keep > 0 else len(prompt_ids)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        """The output length the client asked for, if it did."""
        return self.max_tokens

    @property
    def prompt_only(self) -> bool:
        """Whether the answer leaves the generated tokens out (see CompletionRequest)."""
        return False


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def no_op_values(self) -> dict[str, tuple]:
        return {**super().no_op_values(), "best_of": (None, self.n or 1),
                "suffix": (None, "")}

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts, as text or token ids: a string or a list of ids is one prompt; a list
        of strings or of id lists is several, whose choices follow in that order."""
        prompt = self.prompt
        several = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = prompt if several else [prompt]
        for i, one in enumerate(prompts):
            if not one:
                raise bad_request(f"prompt {i} is empty" if several else "prompt is empty",
                                  "prompt")
        return prompts

    @property
    def prompt_only(self) -> bool:
        """echo=true with max_tokens=0: the answer is the prompt (and, with logprobs, its
        scores) alone, as evaluation harnesses ask to score a text's log-likelihood."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, defaults: dict | None = None, **overrides) -> SamplingParams:
        # echo=true with logprobs also scores the echoed prompt (what evaluation harnesses ask)
        prompt_logprobs = self.logprobs if self.echo else None
        if self.prompt_only:  # the prompt's scores come with a sample's first token
            if self.min_tokens:
                raise bad_request(f"invalid min_tokens={self.min_tokens}: must be <= "
                                  "max_tokens=0", "min_tokens")
            overrides.setdefault("max_tokens", 1)
        overrides.setdefault("max_tokens", self.requested_max_tokens)
        return super().sampling_params(defaults, logprobs=self.logprobs,
                                       prompt_logprobs=prompt_logprobs, **overrides)

    @property
    def requested_max_tokens(self) -> int:
        """Unset, OpenAI's default: it must fit beside the prompt as a given one must."""
        return COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    # OpenAI's fields of a replayed assistant turn: taken while they say nothing (no tools
    # are served, so a conversation that used them cannot go on here)
    tool_calls: list[dict[str, object]] | None = None
    refusal: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        """A part of another kind (image_url, input_audio, file) is named: the union's own
        error said only that the content had a type the field does not accept."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content part {i} is of type {kind!r}: pagedserve serves "
                                     "text, and takes only text parts")
        return content

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role in ("system", "developer", "user"):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls or self.role == "tool" or self.tool_call_id is not None:
            raise ValueError("tool calls and tool messages are not supported: this server "
                             "serves no tools")
        return self

    def as_template_input(self) -> dict:
        return template_message(self.model_dump(
            exclude_none=True, exclude={"tool_calls", "refusal", "tool_call_id"}))


class ChatTemplateFields(_Strict):
    """vLLM's fields that shape how chat messages are rendered into a prompt."""

    add_generation_prompt: bool = True
    # the prompt ends inside the last (assistant) message, which the model then carries on
    continue_final_message: bool = False
    chat_template: str | None = Field(default=None, min_length=1)
    chat_template_kwargs: dict[str, object] | None = None

    def template_options(self, trust_request_template: bool) -> dict:
        """The chat template's arguments; a 400 naming the field for a combination that
        cannot render, or a chat_template the server does not take."""
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be "
                              "true: one starts a new assistant message, the other carries the "
                              "last one on (set add_generation_prompt to false)",
                              "continue_final_message")
        last = self.messages[-1].role  # the subclass's messages, which it has checked
        if self.continue_final_message and last != "assistant":
            raise bad_request("continue_final_message needs the last message to be the "
                              f"assistant's to continue, not a {last} message",
                              "continue_final_message")
        if self.chat_template is not None and not trust_request_template:
            raise bad_request("this server does not take a chat_template in the request: its "
                              "operator may allow it with http.trust_request_chat_template: "
                              "true in the server's config", "chat_template")
        variables = self.chat_template_kwargs or {}
        taken = [name for name in variables if name in RESERVED_TEMPLATE_NAMES]
        if taken:
            raise bad_request(f"chat_template_kwargs cannot set {', '.join(taken)}: the server "
                              "passes the template those itself (use the request's own fields)",
                              "chat_template_kwargs")
        return {**variables, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "chat_template": self.chat_template}


class TokenizeRequest(ChatTemplateFields):
    """``POST /tokenize``: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # for a prompt: what completions would add (BOS)

    def check_one_input(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give either prompt or messages", "prompt")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class ChatRequest(GenerationRequest, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, object] | None = None
    tools: list[dict[str, object]] | None = None
    tool_choice: str | dict[str, object] | None = None
    parallel_tool_calls: bool | None = None  # accepted and ignored: there are no tools to call
    store: bool | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None  # accepted and ignored, as user is
    # what OpenAI's SDK says replaces user: accepted and ignored as user is
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI's other chat options, none implemented: named here so that a request using one is
    # told that (not that it misspelt a field), and taken at values that ask for nothing
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    functions: list[dict[str, object]] | None = None
    function_call: str | dict[str, object] | None = None
    audio: dict[str, object] | None = None
    prediction: dict[str, object] | None = None
    web_search_options: dict[str, object] | None = None
    moderation: dict[str, object] | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, object] | None = None

    def no_op_values(self) -> dict[str, tuple]:
        return {**super().no_op_values(), "response_format": (None, {"type": "text"}),
                # with no tools, "auto" cannot call one either
                "tools": (None, []), "tool_choice": (None, "none", "auto"),
                "store": (None, False), "service_tier": (None, "auto", "default"),
                "modalities": (None, ["text"]), "reasoning_effort": (None, "none"),
                "functions": (None, []), "function_call": (None, "none", "auto"),
                **dict.fromkeys(("verbosity", "audio", "prediction", "web_search_options",
                                 "moderation", "prompt_cache_retention",
                                 "prompt_cache_options"), (None,))}

    def field_names(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs", "prompt": "messages"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names

    def sampling_params(self, defaults: dict | None = None, **overrides) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None:
                raise bad_request("give max_tokens or max_completion_tokens, not both",
                                  "max_completion_tokens")
            overrides.setdefault("max_tokens", self.max_completion_tokens)
        top = (self.top_logprobs or 0) if self.logprobs else None
        return super().sampling_params(defaults, logprobs=top, **overrides)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens


def check_response_size(prompts: list[list[int]], params: SamplingParams, echo: bool,
                        aliases: dict[str, str]) -> None:
    """A 400 for a whole response that may hold more than MAX_RESPONSE_TOKENS tokens or
    MAX_RESPONSE_LOGPROBS logprob entries (each choice repeats its echoed prompt)."""
    generated = len(prompts) * params.n * params.max_tokens
    echoed = params.n * sum(map(len, prompts)) if echo else 0
    logprobs = _entries(generated, params.logprobs) + _entries(echoed, params.prompt_logprobs)
    if generated + echoed <= MAX_RESPONSE_TOKENS and logprobs <= MAX_RESPONSE_LOGPROBS:
        return
    name = "logprobs" if logprobs > MAX_RESPONSE_LOGPROBS else "max_tokens"
    raise bad_request(
        f"this response could hold {generated + echoed} tokens and {logprobs} logprobs "
        f"({len(prompts)} prompt(s) x n={params.n} x max_tokens={params.max_tokens}"
        f"{', prompts echoed' if echo else ''}), more than a whole response may hold "
        f"({MAX_RESPONSE_TOKENS} tokens, {MAX_RESPONSE_LOGPROBS} logprobs): ask for fewer "
        "samples, tokens or logprobs, or stream it (stream=true)", aliases.get(name, name),
        code="response_too_large")


def _entries(tokens: int, top: int | None) -> int:
    """Logprob entries of ``tokens`` scored with ``top`` alternatives: theirs and their own."""
    return 0 if top is None else tokens * (top + 1)


_FIELD_IN_MESSAGE = re.compile(r"^invalid (\w+)=")


def in_request_terms(message: str, aliases: dict) -> tuple[str, str | None]:
    """The message, naming the request's own field where it has another name (chat's
    top_logprobs is SamplingParams' logprobs), and that field."""
    param = param_of(message, aliases)
    match = _FIELD_IN_MESSAGE.match(message)
    if match and param and param != match[1]:
        message = f"invalid {param}={message[match.end():]}"
    return message, param


def param_of(message: str, aliases: dict) -> str | None:
    """The request field a SamplingParams / scheduler message is about (they start with
    "invalid <field>=" or "prompt ...")."""
    match = _FIELD_IN_MESSAGE.match(message)
    name = match[1] if match else "prompt" if message.startswith("prompt") else None
    return aliases.get(name, name)


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 naming the first field pydantic rejected by its dotted path (``messages.0.role``);
    the union member types pydantic adds to the path are left out."""
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if not _is_union_member(p)) or None
    if param is None:
        return bad_request(first["msg"])
    union = len(first["loc"]) > 1 and any(_is_union_member(p) for p in first["loc"])
    reason = "has a type this field does not accept" if union else first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "not a parameter of this endpoint (misspelt?)"
    return bad_request(f"invalid {param}: {reason}", param)


def _is_union_member(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


# -- responses --------------------------------------------------------------------------------


@dataclass(slots=True)
class Echo:
    """With echo=true, what each choice of one prompt begins with."""

    text: str
    token_ids: list[int]

    def logprobs(self, scored: list[TokenLogprobs] | None) -> list[TokenLogprobs]:
        """The prompt's logprob entries, from the worker's scores of tokens 1.. (the first token
        has none)."""
        return [TokenLogprobs(self.token_ids[0], None, None), *(scored or [])]


@dataclass(slots=True)
class ResponseContext:
    """What every object of one response repeats, and how it renders tokens."""

    response_id: str
    created: int
    model: str
    chat: bool
    tokenizer: Tokenizer
    echoed: list[Echo] = field(default_factory=list)  # per prompt, with echo=true
    # for text offsets: each prompt's ids (the context its choices' text was decoded in), the
    # choices per prompt, and whether their text leaves special tokens out
    prompts: list[list[int]] = field(default_factory=list)
    n: int = 1
    skip_special_tokens: bool = True
    include_usage: bool = False  # a stream's chunks say "usage": null until the usage chunk
    # per choice, completions only: its tokens decoded so far, and the length of their text
    text_offsets: dict[int, tuple[IncrementalDetokenizer, int]] = field(default_factory=dict)

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def header(self, streaming: bool) -> dict:
        name = "chat.completion.chunk" if self.chat and streaming else self.object_name
        header = {"id": self.response_id, "object": name, "created": self.created,
                  "model": self.model}
        return {**header, "usage": None} if streaming and self.include_usage else header

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def text_offsets_of(self, index: int, token_ids: list[int]) -> list[int]:
        """Where each token starts in choice ``index``'s text, continuing its earlier chunks.
        A token holding part of a character starts where that character does, one after bytes
        that never made one (their U+FFFD), as far as this chunk's tokens show: a stream
        sends a token held back for its character before it knows; special tokens take no
        room (the text leaves them out: the BOS before an echoed prompt)."""
        decoded, at = self.text_offsets.get(index) or (self._decoder_of(index), 0)
        offsets, held = [], []
        for token_id in token_ids:
            held.append(len(offsets))
            offsets.append(at)  # unless the text that completes it says otherwise
            text, starts = decoded.add_one(token_id)
            if starts is not None:  # held tokens of an earlier chunk went out as they were
                for i, start in zip(held, starts[-len(held):]):
                    offsets[i] = at + start
                held, at = [], at + len(text)
        self.text_offsets[index] = decoded, at
        return offsets

    def _decoder_of(self, index: int) -> IncrementalDetokenizer:
        """Decodes a choice's tokens as its text was: after its prompt, or (echo) from the
        prompt's first token, whose specials (the BOS) the echoed text leaves out."""
        if self.echoed:
            return IncrementalDetokenizer(self.tokenizer, [])
        return IncrementalDetokenizer(self.tokenizer, self.prompts[index // self.n],
                                      self.skip_special_tokens)


def without_output(delta: RequestOutput) -> RequestOutput:
    """A delta of a prompt_only request, less the token generated to score its prompt."""
    return _scored_only(delta, "new_token_ids")


def job_without_output(job: JobOutput) -> JobOutput:
    """A job of a prompt_only request, less the token generated to score its prompt."""
    return dataclasses.replace(job, outputs=[_scored_only(o, "token_ids") for o in job.outputs])


def _scored_only(output, token_ids_field: str):
    # that token may have been a stop token: with it left out, the answer ended on its length
    reason = "length" if output.finish_reason == "stop" else output.finish_reason
    return dataclasses.replace(output, **{token_ids_field: []}, text="", finish_reason=reason,
                               logprobs=None if output.logprobs is None else [])


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(ctx: ResponseContext, jobs: list[JobOutput], n: int) -> dict:
    """The whole response to the jobs of one request, one per prompt: prompt i's samples are
    choices i * n to i * n + n - 1."""
    choices = []
    for i, job in enumerate(jobs):
        for o in job.outputs:
            text, logprobs = o.text, o.logprobs
            if ctx.echoed:
                text = ctx.echoed[i].text + text
                if logprobs is not None:
                    # a job's prompt_logprobs put None for the first token, as vLLM's
                    scored = (job.prompt_logprobs or [None])[1:]
                    logprobs = ctx.echoed[i].logprobs(scored) + logprobs
            choices.append(_choice(ctx, i * n + o.index, text, logprobs, o.finish_reason,
                                   streaming=False, stop_reason=o.stop_reason))
    completion_tokens = sum(len(o.token_ids) for job in jobs for o in job.outputs)
    return {**ctx.header(False), "choices": choices,
            "usage": usage(sum(job.num_prompt_tokens for job in jobs), completion_tokens)}


def stream_chunk(ctx: ResponseContext, delta: RequestOutput, index: int) -> dict:
    """A chunk of choice ``index`` (see full_response)."""
    choice = _choice(ctx, index, delta.text, delta.logprobs, delta.finish_reason,
                     streaming=True, stop_reason=delta.stop_reason)
    return {**ctx.header(True), "choices": [choice]}


def echo_chunk(ctx: ResponseContext, prompt: int, first: RequestOutput, index: int) -> dict:
    """With echo=true, choice ``index``'s stream opens with its prompt's text (and, with
    logprobs, the prompt's scores, which come with the choice's ``first`` delta)."""
    echo = ctx.echoed[prompt]
    logprobs = None if first.logprobs is None else echo.logprobs(first.prompt_logprobs)
    return {**ctx.header(True), "choices": [_choice(ctx, index, echo.text, logprobs, None,
                                                    streaming=True)]}


def role_chunk(ctx: ResponseContext, index: int) -> dict:
    """A chat stream opens each sample with the assistant role and no text."""
    return {**ctx.header(True), "choices": [{"index": index, "delta": {"role": "assistant",
                                                                       "content": ""},
                                             "logprobs": None, "finish_reason": None}]}


def usage_chunk(ctx: ResponseContext, prompt_tokens: int, completion_tokens: int) -> dict:
    return {**ctx.header(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def _choice(ctx: ResponseContext, index: int, text: str, logprobs: list | None,
            finish_reason: str | None, *, streaming: bool,
            stop_reason: int | str | None = None) -> dict:
    """vLLM's ``stop_reason`` (which stop string or stop token id ended the choice) comes
    beside OpenAI's fields, as in vLLM's server."""
    if ctx.chat:
        body = {"delta": {"content": text}} if streaming else \
            {"message": {"role": "assistant", "content": text}}
        rendered = None if logprobs is None else {"content": _chat_logprobs(ctx, logprobs)}
    else:
        body = {"text": text}
        rendered = None if logprobs is None else _completion_logprobs(ctx, index, logprobs)
    return {"index": index, **body, "logprobs": rendered, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def _chat_logprobs(ctx: ResponseContext, logprobs: list[TokenLogprobs]) -> list[dict]:
    return [{**_chat_token(ctx, lp.token_id, lp.logprob),
             "top_logprobs": [_chat_token(ctx, t, v) for t, v in lp.top]} for lp in logprobs]


def _chat_token(ctx: ResponseContext, token_id: int, logprob: float) -> dict:
    return {"token": ctx.token_text(token_id), "logprob": _finite(logprob),
            "bytes": list(ctx.tokenizer.token_bytes(token_id))}


def _completion_logprobs(ctx: ResponseContext, index: int,
                         logprobs: list[TokenLogprobs]) -> dict:
    tokens = [ctx.token_text(lp.token_id) for lp in logprobs]
    offsets = ctx.text_offsets_of(index, [lp.token_id for lp in logprobs])
    # an echoed prompt's first token has no logprob: None, as OpenAI's API gives it
    return {"tokens": tokens,
            "token_logprobs": [None if lp.logprob is None else _finite(lp.logprob)
                               for lp in logprobs],
            "top_logprobs": [None if lp.top is None else _top_with_chosen(ctx, lp)
                             for lp in logprobs],
            "text_offset": offsets}


def _top_with_chosen(ctx: ResponseContext, lp: TokenLogprobs) -> dict[str, float]:
    """The top alternatives and, as OpenAI's completions give it, the chosen token too (so
    up to logprobs + 1 entries; ``logprobs: 0`` gives the chosen one alone)."""
    top = {ctx.token_text(t): _finite(v) for t, v in lp.top}
    top[ctx.token_text(lp.token_id)] = _finite(lp.logprob)  # last: kept where texts collide
    return top


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR

"""How HTTP responses render tokens, without a daemon: text offsets and token bytes on tokenizers
whose decoding depends on context (SentencePiece's leading space) or keeps special tokens; and
how large a whole response may be."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from starlette.requests import Request

from cluster import http
from cluster.http_models import (ApiError, ChatRequest, DetokenizeRequest, ResponseContext,
                                check_response_size)
from scheduler.sampling_params import SamplingParams
from test_tokenizer import BPE_CONFIG, byte_level_bpe, metaspace_bpe, write_dir
from worker.models.tiny import tiny_model_dir
from worker.tokenizer import Tokenizer


def _offsets_as_decoded(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool):
    """Where each token starts in the text decoded after the prompt, whole sequences at a time."""
    before = len(tok.decode(prompt, skip_special_tokens=skip))
    return [len(tok.decode(prompt + ids[:i], skip_special_tokens=skip)) - before
            for i in range(len(ids))]


@pytest.mark.parametrize("raw, skip", [(metaspace_bpe, True), (byte_level_bpe, False)])
def test_text_offsets_follow_the_text_decoded_after_the_prompt(tmp_path, raw, skip):
    """The offsets were counted with no prompt before the tokens (SentencePiece then drops the
    first word's space, so every offset after it was one short) and always without special
    tokens (a kept </s> took no room)."""
    tok = Tokenizer.from_dir(write_dir(tmp_path, raw(), BPE_CONFIG))
    prompt = tok.encode("the cat sat on")
    ids = tok.encode(" the mat and the dog", add_special_tokens=False)
    ids = ids[:2] + [tok.token_to_id("</s>")] + ids[2:]
    ctx = ResponseContext("cmpl-x", 0, "m", False, tok, prompts=[prompt], n=2,
                          skip_special_tokens=skip)
    expected = _offsets_as_decoded(tok, prompt, ids, skip)
    assert expected[1] > 0 and len(set(expected)) > 3  # the case is not degenerate
    # choice 1 is the second sample of prompt 0; a stream renders it in two chunks
    assert ctx.text_offsets_of(1, ids[:3]) + ctx.text_offsets_of(1, ids[3:]) == expected


@pytest.mark.parametrize("ids, expected", [
    ([226, 130, 172, 97], [0, 0, 0, 1]),  # "€a": the euro's three bytes start where it does
    ([226, 97, 98], [0, 1, 2]),  # a lead byte never completed is a U+FFFD before the "a"
    ([226, 130, 97], [0, 0, 1]),  # two bytes of one unfinished character: one U+FFFD
    ([120, 226, 120, 226, 130, 172], [0, 1, 2, 3, 3, 3]),
    ([255, 226, 130, 172, 97], [0, 1, 1, 1, 2]),  # "\ufffd\u20aca": held together, then apart
    ([120, 255, 255, 97], [0, 1, 2, 3]),
])
def test_text_offsets_count_bytes_that_never_make_a_character_as_their_replacement(ids, expected):
    """A byte-level model can emit invalid UTF-8; its text holds a U+FFFD there, and the token
    after it starts one character later (it was given the U+FFFD's own offset)."""
    tok = Tokenizer.from_dir(tiny_model_dir())
    ctx = ResponseContext("cmpl-x", 0, "m", False, tok, prompts=[[256]], n=1)
    text = tok.decode(ids)
    assert [text[o] for i, o in zip(ids, expected) if i < 128] == [chr(i) for i in ids if i < 128]
    assert ctx.text_offsets_of(0, ids) == expected


def test_text_offsets_of_sentencepiece_byte_fallback_count_a_replacement_per_byte(tmp_path):
    """Byte fallback replaces every byte of an invalid run (even one holding a valid euro
    sign) with its own U+FFFD, where byte-level BPE gives one per broken sequence."""
    tok = Tokenizer.from_dir(write_dir(tmp_path, metaspace_bpe(), BPE_CONFIG))
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in (0xFF, 0xE2, 0x82, 0xAC)]
    ids += tok.encode(" the", add_special_tokens=False)
    prompt = tok.encode("the cat")
    ctx = ResponseContext("cmpl-x", 0, "m", False, tok, prompts=[prompt], n=1,
                          skip_special_tokens=False)  # the byte pieces are special tokens here
    text = tok.decode(prompt + ids, skip_special_tokens=False)[
        len(tok.decode(prompt, skip_special_tokens=False)):]
    assert text.startswith("\ufffd" * 4 + " the")
    assert ctx.text_offsets_of(0, ids)[:5] == [0, 1, 2, 3, 4]


def test_token_bytes_of_sentencepiece_pieces_keep_their_spaces_and_fallback_bytes(tmp_path):
    """Chat logprobs' bytes: a piece's U+2581 is a space (decoding one piece alone strips it),
    and a character the vocabulary lacks comes as <0x..> pieces, one byte each."""
    tok = Tokenizer.from_dir(write_dir(tmp_path, metaspace_bpe(), BPE_CONFIG))
    ids = tok.encode("the cat \u2603", add_special_tokens=False)
    assert any(tok._backend.id_to_token(i).startswith("<0x") for i in ids)  # ☃ falls back
    assert b"".join(tok.token_bytes(i) for i in ids) == " the cat \u2603".encode()


def test_request_bodies_are_decoded_and_validated_off_the_event_loop(monkeypatch):
    """A 1 MiB body of 50,000 chat messages took ~0.3 s on the server's event loop: every
    stream it was sending stalled meanwhile."""
    decoded_in, decode = [], http._decode
    monkeypatch.setattr(http, "_decode", lambda *args: decoded_in.append(
        threading.current_thread()) or decode(*args))
    body = json.dumps({"tokens": [1, 2]}).encode()

    async def parse() -> DetokenizeRequest:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({"type": "http", "method": "POST", "headers": []}, receive)
        return await http._parse(request, DetokenizeRequest, 1 << 20)

    assert asyncio.run(parse()).tokens == [1, 2]
    assert decoded_in and decoded_in[0] is not threading.main_thread()


CHAT = {"logprobs": "top_logprobs", "prompt": "messages"}  # ChatRequest.field_names()


@pytest.mark.parametrize("prompts, params, echo, aliases, param", [
    # chat, with no max_tokens: the room left; top_logprobs 20 for 25 samples
    ([[1] * 8], SamplingParams(n=25, max_tokens=2040, logprobs=20), False, CHAT,
     "top_logprobs"),
    # a batch of 1,024 prompts, n = 256, 17 tokens each: 4.46M tokens
    ([[1] * 8] * 1024, SamplingParams(n=256, max_tokens=17), False, {}, "max_tokens"),
    # an echoed prompt is scored in each of the n choices
    ([[1] * 1000], SamplingParams(n=64, max_tokens=1, logprobs=1, prompt_logprobs=20), True,
     {}, "logprobs"),
])
def test_a_whole_response_too_large_to_build_is_400_naming_a_field(prompts, params, echo,
                                                                   aliases, param):
    with pytest.raises(ApiError) as caught:
        check_response_size(prompts, params, echo, aliases)
    error = caught.value.body()["error"]
    assert (caught.value.status, error["param"], error["code"]) == \
        (400, param, "response_too_large")
    assert error["message"].endswith("or stream it (stream=true)")


@pytest.mark.parametrize("prompts, params, echo", [
    ([[1] * 8], SamplingParams(n=24, max_tokens=2040, logprobs=20), False),
    ([[1] * 8] * 1024, SamplingParams(n=256, max_tokens=16), False),
    ([[1] * 1000], SamplingParams(n=48, max_tokens=1, logprobs=1, prompt_logprobs=20), True),
    ([[1] * 8], SamplingParams(n=256, max_tokens=16384), False),  # no logprobs: 4M tokens
])
def test_responses_up_to_the_bounds_are_taken(prompts, params, echo):
    check_response_size(prompts, params, echo, {})


def _chat_params(**fields) -> SamplingParams:
    """A chat body read as the server reads it, to its job's SamplingParams."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            **fields}
    return http._validated(json.dumps(body).encode(), "application/json",
                           ChatRequest).sampling_params()


def test_the_replacements_openai_gives_for_user_are_ignored_as_user_is():
    """The openai SDK says user is being replaced by safety_identifier and prompt_cache_key:
    a client that followed it was refused, told that it had misspelt them."""
    assert _chat_params(safety_identifier="h1", prompt_cache_key="k") == _chat_params(user="h1")


@pytest.mark.parametrize("fields, param", [
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    ({"prompt_cache_options": {"ttl": "1h"}}, "prompt_cache_options"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options"),
])
def test_openai_chat_options_not_implemented_are_refused_as_such_not_as_misspelt(fields, param):
    """Every chat option of the openai SDK is either taken or refused as not supported: these
    were "not a parameter of this endpoint (misspelt?)"."""
    with pytest.raises(ApiError) as caught:
        _chat_params(**fields)
    error = caught.value.body()["error"]
    assert error["param"] == param and "is not supported by pagedserve" in error["message"]


@pytest.mark.parametrize("fields", [
    {"modalities": ["text"]}, {"reasoning_effort": "none"},
    {"functions": [], "function_call": "none"}, {"function_call": "auto"},
    {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
])
def test_openai_chat_options_at_values_asking_for_nothing_are_taken(fields):
    assert _chat_params(**fields) == _chat_params()


@pytest.mark.parametrize("part, kind", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "image_url"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
])
def test_a_content_part_that_is_not_text_is_named_in_the_400(part, kind):
    """What the openai SDK sends for images and audio was "has a type this field does not
    accept", which did not say what was wrong with it."""
    message = {"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}
    with pytest.raises(ApiError) as caught:
        _chat_params(messages=[message])
    error = caught.value.body()["error"]
    assert error["param"] == "messages.0.content"
    assert f"part 1 is of type '{kind}'" in error["message"] and "text" in error["message"]


def test_an_event_holds_one_line_for_readers_that_split_on_unicode_line_breaks():
    """JSON leaves U+2028, U+2029 and U+0085 unescaped, and httpx's iter_lines (which many
    clients, pagedserve's bench among them, read events with) ends a line at each: the event
    of a text holding one was cut in two, and its JSON did not parse."""
    from cluster.sse import sse_event

    payload = {"choices": [{"text": "a\u2028b\u2029c\u0085d\ne"}]}
    event = sse_event(payload).decode()
    lines = event.splitlines()
    assert lines == [lines[0], ""] and json.loads(lines[0].removeprefix("data: ")) == payload

"""The OpenAI-compatible HTTP API against a live daemon on a local Ray cluster, driven with the
official openai client and raw httpx: results equal the daemon's own, streams equal whole
responses, bad input gets the right status and error body, and the server keeps serving."""
import asyncio
import http.client as http_client
import importlib.metadata
import json
import os
import resource
import signal
import socket
import time
import urllib.parse
from pathlib import Path

import httpx
import msgpack
import openai
import pytest
import ray

from daemon_helpers import daemon_config, ready_workers, wait_for
from serving import serving

import cluster.http
from cluster import bringup, daemon_cmds
from cluster.client import Client, DaemonNotUpError, DaemonUnavailableError
from cluster.config import with_overrides
from cluster.http import create_app
from scheduler.sampling_params import SamplingParams
from scheduler.service import NAMESPACE
from worker.loader import resolve_model_path
from worker.tokenizer import Tokenizer

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py

KEY = "test-key-7f3a"
MAX_QUEUED = 32  # samples: requests of n=25 below must fit
LONG = 2000  # tokens: a job that runs for seconds on the tiny model (max_model_len 2048)
BURST = 100  # concurrent requests in an outage


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cfg = daemon_config(tmp_path_factory.mktemp("http"), max_queued_jobs=MAX_QUEUED)
    ray.init(address="local", num_cpus=2, resources={"NPU": 1}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        bringup.up(cfg, min_workers=1)
        yield cfg, Client()
    finally:
        bringup.down()
        ray.shutdown()


@pytest.fixture(scope="module")
def base_url(daemon):
    cfg, client = daemon
    with serving(create_app(client, cfg, api_keys=(KEY,))) as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(resolve_model_path("tiny"))


def greedy(**extra):
    return dict(model="tiny", max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True, **extra})


def assert_still_serves(api):
    out = api.completions.create(prompt="still there?", **greedy())
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12


def error_of(response):
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


# -- generation -------------------------------------------------------------------------------


CANDIDATE_PROMPTS = ("The cluster has", "A worker", "Tokens flow", "Blocks are paged",
                     "Scale out")


def clear_greedy_prompt(client, candidates=CANDIDATE_PROMPTS):
    """A prompt whose greedy path has no near-tie: batch composition changes float rounding
    (GEMM shapes differ), which may flip a tie between equally likely tokens on the random
    tiny model; the comparison below is about the HTTP layer, not about ties."""
    for prompt in candidates:
        out = client.result(client.submit(prompt, SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True, logprobs=2))).outputs[0]
        if all(lp.top[0][1] - lp.top[1][1] > 1e-3 for lp in out.logprobs):
            return prompt
    pytest.fail("every candidate prompt has a near-tie on its greedy path")


def test_completion_equals_the_daemons_own_result(api, daemon, tokenizer):
    _, client = daemon
    prompt = clear_greedy_prompt(client)
    out = api.completions.create(prompt=prompt, **greedy())
    own = client.result(client.submit(prompt, SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))).outputs[0]
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == own.text and out.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt_tokens, 12, prompt_tokens + 12)


def test_completion_of_token_ids_and_stop_string(api, daemon):
    _, client = daemon
    ids = [5, 17, 42, 99]
    whole = api.completions.create(prompt=ids, **greedy()).choices[0].text
    own = client.result(client.submit(ids, SamplingParams(max_tokens=12, temperature=0,
                                                         ignore_eos=True))).outputs[0].text
    assert whole == own
    stop = whole[len(whole) // 2:][:2]
    assert stop.strip()  # greedy, so always the same text: the stop check below is never skipped
    cut = api.completions.create(prompt=ids, stop=[stop], **greedy()).choices[0]
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.index(stop)]


def test_chat_uses_the_chat_template(api, daemon, tokenizer):
    _, client = daemon
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Which worker is free?"}]
    out = api.chat.completions.create(messages=messages, **greedy())
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages),
                                  add_special_tokens=False)
    own = client.result(client.submit(prompt_ids, SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))).outputs[0]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == own.text
    assert out.usage.prompt_tokens == len(prompt_ids)
    # max_completion_tokens is chat's newer name for max_tokens
    newer = api.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                        max_completion_tokens=5,
                                        extra_body={"ignore_eos": True})
    assert newer.usage.completion_tokens == 5 and own.text.startswith(
        newer.choices[0].message.content)
    # "developer" is OpenAI's newer name for the system role
    developer = [{**messages[0], "role": "developer"}, messages[1]]
    assert api.chat.completions.create(messages=developer, **greedy()).choices[0] == out.choices[0]


USER_TURN = [{"role": "user", "content": "Hi"}]
CONVERSATION = [{"role": "user", "content": "Name a worker."},
                {"role": "assistant", "content": "Worker"}]
# the tiny template's format, with a variable of its own (as Qwen3's enable_thinking)
THINKING = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is false %}<think></think>{% endif %}{% endif %}")


def chat_prompt_ids(session, client, **fields):
    """The token ids the daemon ran a chat request's job on (the response id finds the job)."""
    answer = session.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 1, "messages": CONVERSATION, **fields})
    assert answer.status_code == 200, answer.text
    return client.result(answer.json()["id"]).prompt_token_ids


def test_chat_template_fields_shape_the_prompt_as_the_tokenizer_renders_it(http, daemon,
                                                                           tokenizer):
    _, client = daemon

    def rendered(**options):
        return tokenizer.apply_chat_template(CONVERSATION, tokenize=True, **options)

    replying = chat_prompt_ids(http, client)
    assert replying == rendered(add_generation_prompt=True)
    finished = chat_prompt_ids(http, client, add_generation_prompt=False)
    assert finished == rendered(add_generation_prompt=False) != replying
    continuing = chat_prompt_ids(http, client, add_generation_prompt=False,
                                 continue_final_message=True)
    assert continuing == rendered(continue_final_message=True)
    # the prompt ends inside the assistant's message: no end-of-turn marker, no new turn
    text = tokenizer.decode(continuing, skip_special_tokens=False)
    assert text.endswith("<|assistant|>Worker") and text.count("<|assistant|>") == 1
    # a variable the checkpoint's template does not read changes nothing
    assert chat_prompt_ids(http, client, chat_template_kwargs={"enable_thinking": False}) == \
        replying
    # /tokenize counts what the same fields would send
    counted = http.post("/tokenize", json={"messages": CONVERSATION, "add_generation_prompt":
                                           False, "continue_final_message": True}).json()
    assert counted["tokens"] == continuing


@pytest.mark.parametrize("body, param, message", [
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message",
     "add_generation_prompt and continue_final_message cannot both be true"),
    ({"continue_final_message": True}, "continue_final_message", "cannot both be true"),
    ({"messages": USER_TURN, "add_generation_prompt": False, "continue_final_message": True},
     "continue_final_message", "not a user message"),
    ({"chat_template_kwargs": {"messages": [], "bos_token": "x"}}, "chat_template_kwargs",
     "cannot set messages, bos_token"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
     "cannot set add_generation_prompt"),
    ({"chat_template_kwargs": {"return_tensors": "pt"}}, "chat_template_kwargs",
     "cannot set return_tensors"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", "invalid"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt", "invalid"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "http.trust_request_chat_template"),
])
def test_bad_chat_template_fields_are_400_naming_the_field(http, body, param, message):
    answer = http.post("/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 1, "messages": CONVERSATION, **body})
    assert answer.status_code == 400
    error = error_of(answer)
    assert error["param"] == param and message in error["message"], error


def test_a_request_s_chat_template_runs_only_where_the_server_trusts_it(daemon, tokenizer):
    cfg, client = daemon
    trusting = with_overrides(cfg, http={"trust_request_chat_template": True})
    with serving(create_app(client, trusting, api_keys=(KEY,))) as url, \
            httpx.Client(base_url=url, timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"}) as session:
        thinking, plain = (chat_prompt_ids(session, client, chat_template=THINKING,
                                           chat_template_kwargs=variables)
                           for variables in ({"enable_thinking": False}, {}))
        for ids, variables in ((thinking, {"enable_thinking": False}), (plain, {})):
            assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True,
                                                        chat_template=THINKING, **variables)
        assert tokenizer.decode(thinking, skip_special_tokens=False).endswith(
            "<|assistant|><think></think>")
        assert thinking[0] == tokenizer.bos_token_id  # bos_token and eos_token are the model's
        assert plain.count(tokenizer.eos_token_id) == len(CONVERSATION)
        for template, message in [
                ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
                ("{{ 1 + messages }}", "TypeError"),
                ("{% for m in messages %}", "does not compile"),
                ("{{ messages.__class__.__mro__ }}", "chat template failed")]:
            answer = session.post("/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 1, "messages": CONVERSATION,
                "chat_template": template})
            assert answer.status_code == 400, answer.text
            error = error_of(answer)
            assert error["param"] == "chat_template" and message in error["message"], error
            assert "Traceback" not in error["message"]


def test_several_prompts_are_one_response_in_prompt_order(api, daemon):
    _, client = daemon
    first = clear_greedy_prompt(client)
    second = clear_greedy_prompt(client, [c for c in CANDIDATE_PROMPTS if c != first])
    out = api.completions.create(prompt=[first, second], n=2, **greedy())
    singles = [api.completions.create(prompt=p, **greedy()) for p in (first, second)]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt i's samples: 2i, 2i + 1
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles for _ in "ab"]
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert out.usage.completion_tokens == 4 * 12
    ids = api.completions.create(prompt=[[5, 17, 42], [99, 3]], **greedy())
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_with_include_usage_every_chunk_but_the_last_says_usage_null(http, path):
    """As OpenAI's streams do; strictly typed clients read the key on every chunk."""
    body = {"model": "tiny", "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    body |= {"prompt": "usage"} if "chat" not in path else \
        {"messages": [{"role": "user", "content": "usage"}]}
    with http.stream("POST", path, json=body) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])


def test_several_prompts_stream_as_their_whole_response(api):
    kwargs = dict(model="tiny", prompt=["Stream one", "Stream two", "Stream three"], max_tokens=10,
                  temperature=0.9, seed=11, extra_body={"ignore_eos": True, "top_k": 20})
    whole = api.completions.create(**kwargs)
    chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True},
                                         **kwargs))
    texts, finished = ["", "", ""], []
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.append(choice.index)
    assert texts == [c.text for c in whole.choices]
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage == whole.usage and whole.usage.completion_tokens == 30


def test_a_bad_prompt_among_several_queues_none(api, daemon):
    _, client = daemon

    def jobs_known():
        status = client.status()
        return status["jobs_unfinished"] + status["jobs_finished_kept"]

    before = jobs_known()
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(prompt=[[5, 6], [10 ** 6]], **greedy())
    error = caught.value.body
    assert error["message"].startswith("prompt 1: prompt_token_ids must be integers in [0, ")
    assert error["param"] == "prompt"
    assert jobs_known() == before
    assert_still_serves(api)


def test_more_prompts_than_the_queue_holds_is_400_not_429(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(prompt=["x"] * (MAX_QUEUED + 1), **greedy())
    assert caught.value.body["param"] == "prompt"
    assert f"can never fit max_queued_jobs={MAX_QUEUED}" in caught.value.body["message"]


def test_echo_puts_each_prompt_before_its_completions(api):
    kwargs = dict(model="tiny", prompt=["Echo me", "and me"], n=2, max_tokens=6,
                  temperature=0.9, seed=5, extra_body={"ignore_eos": True})
    plain = api.completions.create(**kwargs)
    echoed = api.completions.create(echo=True, **kwargs)
    assert [c.text for c in echoed.choices] == \
        [kwargs["prompt"][c.index // 2] + c.text for c in plain.choices]
    assert echoed.usage == plain.usage
    texts = [""] * 4
    for chunk in api.completions.create(echo=True, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in echoed.choices]
    # token ids are echoed as their text: 72, 105 are "H", "i" to the byte-level tokenizer
    ids = api.completions.create(prompt=[72, 105], echo=True, **greedy())
    assert ids.choices[0].text == "Hi" + api.completions.create(prompt=[72, 105],
                                                                **greedy()).choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_the_daemon_does(api, daemon):
    """What evaluation harnesses send for log-likelihoods: token ids, echo, logprobs."""
    _, client = daemon
    ids = [5, 17, 42, 99, 7, 64]
    own = client.result(client.submit(ids, SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)))
    assert own.prompt_logprobs[0] is None
    assert [lp.token_id for lp in own.prompt_logprobs[1:]] == ids[1:]
    kwargs = dict(model="tiny", prompt=[ids], max_tokens=3, temperature=0, logprobs=1,
                  echo=True, extra_body={"ignore_eos": True})
    whole = api.completions.create(**kwargs).choices[0].logprobs
    assert len(whole.tokens) == len(ids) + 3
    assert whole.token_logprobs[0] is None and whole.top_logprobs[0] is None
    assert whole.token_logprobs[1:6] == pytest.approx([lp.logprob
                                                       for lp in own.prompt_logprobs[1:]])
    assert whole.token_logprobs[6:] == pytest.approx([lp.logprob
                                                      for lp in own.outputs[0].logprobs])
    streamed = [c.choices[0].logprobs for c in api.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert sum((lp.token_logprobs for lp in streamed), []) == whole.token_logprobs
    assert sum((lp.tokens for lp in streamed), []) == whole.tokens
    # three samples: only one scores the prompt, yet every choice opens with its scores
    per_choice = [[], [], []]
    for chunk in api.completions.create(stream=True, n=3, **kwargs):
        for choice in chunk.choices:
            per_choice[choice.index] += choice.logprobs.token_logprobs if choice.logprobs else []
    # the samples may decode on two workers, in batches of other sizes than the single
    # sample's: a matmul's rounding depends on its row count (MKL on an AMD host differed in
    # the 7th digit), so the generated tokens' logprobs are equal only to a tolerance
    assert per_choice == [pytest.approx(whole.token_logprobs, abs=1e-4)] * 3


def test_echo_with_max_tokens_0_answers_the_prompt_and_its_scores_alone(api):
    """How harnesses score a text without generating (vLLM answers it so)."""
    ids = [5, 17, 42, 99, 7, 64]
    kwargs = dict(model="tiny", prompt=[ids], temperature=0, logprobs=2, echo=True)
    scored = api.completions.create(max_tokens=0, **kwargs)
    choice, generated = scored.choices[0], api.completions.create(max_tokens=1, **kwargs)
    assert choice.text == generated.choices[0].text[:len(choice.text)]
    assert choice.logprobs.tokens == generated.choices[0].logprobs.tokens[:len(ids)]
    assert choice.logprobs.token_logprobs == \
        pytest.approx(generated.choices[0].logprobs.token_logprobs[:len(ids)])
    assert (choice.finish_reason, scored.usage.completion_tokens) == ("length", 0)
    assert scored.usage.prompt_tokens == len(ids)
    # the token generated behind the scenes stops the sample: it is no part of the answer
    stopped = api.completions.create(max_tokens=0, extra_body={"stop_token_ids": list(range(262))},
                                     **kwargs).choices[0]
    assert (stopped.text, stopped.finish_reason) == (choice.text, "length")
    chunks = list(api.completions.create(max_tokens=0, stream=True,
                                         stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert sum((c.choices[0].logprobs.tokens for c in chunks if c.choices), []) == \
        choice.logprobs.tokens
    assert chunks[-1].usage.completion_tokens == 0


def test_echoed_logprobs_offsets_index_the_text(api):
    choice = api.completions.create(prompt="Hi", echo=True, logprobs=1,
                                    **greedy()).choices[0]
    lp = choice.logprobs
    assert lp.tokens[0] == "<s>" and lp.text_offset[:2] == [0, 0]  # the BOS is not in the text
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert choice.text[offset:offset + len(token)] == token


def test_split_characters_keep_offsets_in_the_text_and_their_own_bytes(api):
    """é is two byte tokens, each U+FFFD alone: offsets counted one character each (past
    the text's end), and chat's bytes were U+FFFD's own."""
    choice = api.completions.create(prompt="é!", echo=True, logprobs=0, max_tokens=3,
                                    model="tiny", temperature=0).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("é!") and lp.text_offset[:4] == [0, 0, 0, 1]  # <s> é é !
    assert all(choice.text[offset:offset + len(token)] == token
               for token, offset in zip(lp.tokens[3:], lp.text_offset[3:]))
    streamed = [c.choices[0].logprobs.text_offset for c in api.completions.create(
        prompt="é!", echo=True, logprobs=0, max_tokens=3, model="tiny", temperature=0,
        stream=True) if c.choices and c.choices[0].logprobs]
    assert sum(streamed, []) == lp.text_offset
    chat = api.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                       logprobs=True, **greedy(logit_bias={"195": 100}))
    first = chat.choices[0].logprobs.content[0]  # 195 is byte 0xC3: half of a character
    assert first.bytes == [0xC3] and first.token == "\ufffd"


def test_the_response_id_finds_the_job(api, daemon):
    _, client = daemon
    completion = api.completions.create(prompt="Find me", **greedy())
    chat = api.chat.completions.create(messages=[{"role": "user", "content": "Me too"}],
                                       **greedy())
    assert completion.id.startswith("cmpl-") and chat.id.startswith("chatcmpl-")
    assert client.result(completion.id).outputs[0].text == completion.choices[0].text
    assert client.result(chat.id).outputs[0].text == chat.choices[0].message.content


def test_the_response_id_follows_an_unfinished_job(daemon):
    _, client = daemon
    job_id = client.submit("Still going", SamplingParams(max_tokens=LONG, ignore_eos=True))
    stream = client.stream(f"cmpl-{job_id}")
    assert next(stream).new_token_ids  # the stream waits on the job's own events
    assert client.status_of(f"chatcmpl-{job_id}")["finished"] is False
    assert client.abort(f"cmpl-{job_id}") is True
    assert client.result(f"chatcmpl-{job_id}", timeout=60).outputs[0].finish_reason == "abort"
    wait_for(lambda: all(w.get("kv_used", 0) == 0 for w in ready_workers(client)),
             timeout=30, what="the job's blocks back in the pool")


def test_completion_stream_equals_the_whole_response(api):
    whole = api.completions.create(prompt="Stream this", **greedy())
    chunks = list(api.completions.create(prompt="Stream this", stream=True,
                                         stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finished == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_a_replayed_assistant_turn_with_empty_tool_fields_is_taken(api):
    """SDKs and agent frameworks replay an assistant turn as they got it: "tool_calls": []
    (and "refusal": null) were refused as misspelt parameters."""
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    replayed = [plain[0], {**plain[1], "tool_calls": [], "refusal": None}, plain[2]]
    def reply(messages):
        return api.chat.completions.create(messages=messages, **greedy()).choices[0].message.content

    assert reply(replayed) == reply(plain)
    for tools_used in ([plain[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
                       [plain[0], {"role": "tool", "tool_call_id": "c1", "content": "42"}]):
        with pytest.raises(openai.BadRequestError, match="tool calls and tool messages are "
                                                         "not supported"):
            api.chat.completions.create(messages=tools_used, **greedy())


def test_chat_stream_with_two_seeded_samples_equals_the_whole_response(api):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Name two queues"}],
                  max_tokens=10, temperature=0.9, seed=7, n=2,
                  extra_body={"ignore_eos": True, "top_k": 20})
    whole = api.chat.completions.create(**kwargs)
    texts, roles = ["", ""], [None, None]
    for chunk in api.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] = roles[choice.index] or choice.delta.role
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert roles == ["assistant", "assistant"]


def test_raw_event_stream_format(http):
    body = {"model": "tiny", "prompt": "raw", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert sum(p["choices"][0]["finish_reason"] is not None for p in payloads) == 1


def test_a_request_s_x_request_id_is_echoed_and_others_get_their_own(http, base_url):
    body = {"model": "tiny", "messages": USER_TURN, "max_tokens": 2}
    for fields, status in (({}, 200), ({"max_tokens": -1}, 400),
                           ({"chat_template_kwargs": {"messages": 1}}, 400)):
        answer = http.post("/v1/chat/completions", json={**body, **fields},
                           headers={"X-Request-Id": "trace-7"})
        assert (answer.status_code, answer.headers["x-request-id"]) == (status, "trace-7")
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                     headers={"X-Request-Id": "stream-8"}) as response:
        assert response.headers["x-request-id"] == "stream-8"
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and len(events) >= 4  # role, 2 tokens, [DONE]
    keyless = httpx.get(f"{base_url}/v1/models", headers={"X-Request-Id": "who-9"})
    assert (keyless.status_code, keyless.headers["x-request-id"]) == (401, "who-9")
    made = [http.post("/v1/chat/completions", json=body).headers["x-request-id"]
            for _ in range(2)]
    assert made[0] != made[1] and all(len(m) >= 16 for m in made)


def test_an_unexpected_error_is_500_with_the_request_id_and_keeps_the_connection(base_url,
                                                                                 monkeypatch):
    """Starlette answered it from outside every middleware, so the header was left off, and
    raised it on to uvicorn, which closed the connection: the next request on it failed."""
    def broken(server):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cluster.http, "_model_card", broken)
    connection = http_client.HTTPConnection(*urllib.parse.urlsplit(base_url).netloc.split(":"),
                                            timeout=60)  # one connection, never reopened
    answers = []
    try:
        for given in ({"X-Request-Id": "bug-10"}, {}):
            connection.request("GET", "/v1/models",
                               headers={"Authorization": f"Bearer {KEY}", **given})
            response = connection.getresponse()
            answers.append((response.status, response.getheader("x-request-id"),
                            json.loads(response.read())))
            assert connection.sock is not None, "the server closed the connection"
    finally:
        connection.close()
    assert [status for status, _, _ in answers] == [500, 500]
    assert answers[0][2]["error"]["message"] == "internal server error"
    assert answers[0][1] == "bug-10"
    assert len(answers[1][1]) >= 16  # a made one


def test_logprobs_cover_every_token(api, tokenizer):
    out = api.completions.create(prompt="log", logprobs=3, **greedy())
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens).endswith(out.choices[0].text[-3:])
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the best
    chat = api.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                       logprobs=True, top_logprobs=2, **greedy())
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 2 for t in content)


def test_completion_top_logprobs_hold_the_sampled_token_as_openai_gives_them(api):
    """Up to logprobs + 1 entries: a sampled token outside the top ones is there too, and
    logprobs=0 gives it alone (it was an empty dict)."""
    sampled = api.completions.create(model="tiny", prompt="Hello", max_tokens=8, logprobs=1,
                                     temperature=2.0, seed=5, extra_body={"ignore_eos": True})
    lp = sampled.choices[0].logprobs
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(chosen) and 1 <= len(top) <= 2
    assert any(len(top) == 2 for top in lp.top_logprobs)  # temperature 2 strays from the top
    none = api.completions.create(prompt="Hello", logprobs=0, **greedy()).choices[0].logprobs
    assert [list(top) for top in none.top_logprobs] == [[t] for t in none.tokens]


# -- errors -----------------------------------------------------------------------------------


def test_a_wrong_key_is_401_and_health_stays_open(api, base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.completions.create(prompt="hi", **greedy())
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    assert httpx.get(f"{base_url}/metrics").status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == 200
    version = httpx.get(f"{base_url}/version")
    assert version.json() == {"version": importlib.metadata.version("pagedserve")}
    assert_still_serves(api)


def test_models_lists_the_served_model_and_others_are_404(api):
    assert [m.id for m in api.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(prompt="hi", **{**greedy(), "model": "gpt-4"})
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert_still_serves(api)


@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("completions", {"prompt": ["one", ""]}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [10 ** 6]}, "prompt"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
              "top_logprobs": 99}, "top_logprobs"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),  # vLLM's max_logprobs
    ("completions", {"prompt": "x", "n": 257}, "n"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("completions", {"prompt": "x", "seed": 2 ** 70}, "seed"),
    ("completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ("completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"100000": 5}},
     "logit_bias"),  # past the vocabulary: found by the scheduler  # the journal's msgpack: 64 bits
    ("completions", {"prompt": "x", "priority": -2 ** 64}, "priority"),
    ("completions", {"prompt": "x", "priority": 5}, "priority"),  # fcfs would ignore it
    # a field all the prompts share is named as such, not as prompt 0's fault
    ("completions", {"prompt": ["x", "y"], "priority": 5}, "priority"),
    ("completions", {"prompt": ["x", "y"], "logit_bias": {"100000": 5}}, "logit_bias"),
    ("completions", {"prompt": "x", "echo": True, "max_tokens": 0, "min_tokens": 1},
     "min_tokens"),
    ("completions", {"prompt": "a" * 3000, "max_tokens": 2}, "prompt"),  # not max_tokens
    ("chat", {"messages": [{"role": "user", "content": "a" * 3000}], "max_tokens": 2},
     "messages"),
])
def test_bad_input_is_400_naming_the_field(api, endpoint, body, param):
    path = "/completions" if endpoint == "completions" else "/chat/completions"
    with pytest.raises(openai.BadRequestError) as caught:
        api.post(path, body={"model": "tiny", **body}, cast_to=object)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "Traceback" not in error["message"]
    if error["message"].startswith("invalid "):  # by the request's name (chat: top_logprobs)
        assert error["message"].startswith((f"invalid {param}=", f"invalid {param}:"))
    assert_still_serves(api)


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("endpoint, body, param, message", [
    ("completions", {"suffix": "end"}, "suffix", 'suffix="end" is not supported'),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format",
     'response_format={"type": "json_object"} is not supported'),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f" * 99}}]}, "tools",
     "tools=[{"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "is not supported"),
    ("completions", {"temprature": 0.5}, "temprature", "not a parameter of this endpoint"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options.include_usage needs stream=true"),
    ("chat", {"messages": [{"role": "user"}]}, "messages.0", "a user message needs content"),
    ("chat", {"store": True}, "store", "store=true is not supported"),
])
def test_unimplemented_openai_parameters_are_refused_by_name(api, endpoint, body, param, message):
    path = "/completions" if endpoint == "completions" else "/chat/completions"
    payload = {"prompt": "x"} if endpoint == "completions" else {"messages": USER}
    with pytest.raises(openai.BadRequestError) as caught:
        api.post(path, body={"model": "tiny", "max_tokens": 2, **payload, **body},
                 cast_to=object)
    error = caught.value.body
    assert error["param"] == param and message in error["message"]
    assert len(error["message"]) < 120  # a long value is cut short


@pytest.mark.parametrize("endpoint, body", [
    ("completions", {"logit_bias": {}, "echo": False, "best_of": 2, "n": 2, "suffix": None}),
    ("chat", {"logit_bias": None, "response_format": {"type": "text"}, "tools": [],
              "tool_choice": "auto", "parallel_tool_calls": True, "store": False,
              "service_tier": "auto", "metadata": {"team": "a"}, "safety_identifier": "u1",
              "prompt_cache_key": "k", "modalities": ["text"], "reasoning_effort": "none"}),
    ("chat", {"messages": [*USER, {"role": "assistant", "content": None}, *USER]}),
])
def test_openai_parameters_at_their_no_op_values_are_accepted(api, endpoint, body):
    path = "/completions" if endpoint == "completions" else "/chat/completions"
    payload = {"prompt": "x"} if endpoint == "completions" else {"messages": USER}
    response = api.post(path, body={"model": "tiny", "max_tokens": 2, "ignore_eos": True,
                                    **payload, **body}, cast_to=object)
    assert response["usage"]["completion_tokens"] == 2 * body.get("n", 1)


@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", {"prompt": "x" * 40, "max_tokens": 2040}, "max_tokens"),
    ("completions", {"prompt": [5] * 2000, "max_tokens": 49}, "max_tokens"),
    # OpenAI's default of 16 counts as asked (as in OpenAI's API and vLLM's): 8 tokens of
    # room gave 8 tokens and finish_reason "length"
    ("completions", {"prompt": [5] * 2040}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2048},
     "max_completion_tokens"),
])
def test_max_tokens_beyond_the_context_is_400(api, endpoint, body, param):
    path = "/completions" if endpoint == "completions" else "/chat/completions"
    with pytest.raises(openai.BadRequestError) as caught:
        api.post(path, body={"model": "tiny", **body}, cast_to=object)
    error = caught.value.body
    assert error["param"] == param and error["code"] == "context_length_exceeded"
    assert error["message"].startswith("This model's maximum context length is 2048 tokens. "
                                       "However, you requested ")
    if param not in body:
        assert "(2040 in the prompt, 16 in the completion, max_tokens by default)" in \
            error["message"]
    fits = {**body, param: 4, "ignore_eos": True}
    assert api.post(path, body={"model": "tiny", **fits}, cast_to=object)["usage"][
        "completion_tokens"] == 4


def test_a_prompt_filling_the_context_is_400_context_length_exceeded(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny",
                                    messages=[{"role": "user", "content": "a" * 3000}])
    error = caught.value.body
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert error["message"].startswith("This model's maximum context length is 2048 tokens. "
                                       "However, the prompt has ")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", rb'{"prompt": "cut \ud83d", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": "x", "stop": ["\udc00"], "max_tokens": 2}', "stop.0"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud83d"}]}',
     "messages.0.content"),
    ("/tokenize", rb'{"prompt": "\ud83d"}', "prompt"),
])
def test_a_lone_surrogate_in_a_string_is_400_not_500(api, http, path, body, param):
    """Valid JSON syntax (a JavaScript client cutting a string inside an emoji sends it), but
    no text: the tokenizer and the journal failed on it with a 500."""
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param and "surrogate" in error_of(response)["message"]
    assert_still_serves(api)


def test_null_fields_are_unset_as_in_openai(http):
    """SDKs send every unset field as null; these were refused as "not a valid boolean"."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": None, "echo": None,
            "logprobs": None, "stream_options": {"include_usage": None}}
    assert http.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"] >= 1
    chat = {"messages": USER, "max_tokens": 2, "logprobs": None, "stream": None, "n": None}
    assert len(http.post("/v1/chat/completions", json=chat).json()["choices"]) == 1
    misspelt = http.post("/v1/completions", json={**body, "max_tokns": None})
    assert misspelt.status_code == 400 and error_of(misspelt)["param"] == "max_tokns"


def test_malformed_json_is_400(api, http):
    response = http.post("/v1/completions", content=b'{"prompt": "x", ',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    assert http.post("/v1/completions", json=["a list"]).status_code == 400
    nan = http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                    headers={"Content-Type": "application/json"})
    assert nan.status_code == 400
    assert_still_serves(api)


def test_a_whole_response_too_large_to_build_is_400_and_its_stream_is_taken(api):
    """25 chat samples of up to 2,042 tokens with 20 alternatives each: ~1M logprob entries,
    ~0.8 GiB of response built in memory and seconds of the event loop. The same as a stream
    is sent as it goes."""
    body = {"model": "tiny", "messages": USER, "n": 25, "logprobs": True, "top_logprobs": 20}
    with pytest.raises(openai.BadRequestError) as caught:
        api.post("/chat/completions", body=body, cast_to=object)
    error = caught.value.body
    assert (error["param"], error["code"]) == ("top_logprobs", "response_too_large")
    assert "1072050 logprobs (1 prompt(s) x n=25 x max_tokens=2042)" in error["message"]
    with api.chat.completions.create(**body, stream=True) as stream:
        assert next(iter(stream)).choices[0].delta.role == "assistant"
    assert_still_serves(api)


def test_a_whole_response_is_built_off_the_event_loop(api, monkeypatch):
    """24 chat samples of 2,042 tokens with top_logprobs 20 (under the bound above) took the
    server's event loop ~9 s to build and encode: every other request waited meanwhile."""
    on_loop, build = [], cluster.http.full_response

    def spied(*args):
        try:
            on_loop.append(asyncio.get_running_loop() is not None)
        except RuntimeError:  # no event loop in this thread
            on_loop.append(False)
        return build(*args)

    monkeypatch.setattr(cluster.http, "full_response", spied)
    api.completions.create(prompt="x", **greedy())
    assert on_loop == [False]


def test_a_10_mb_body_is_413(api, http, daemon):
    cfg, _ = daemon
    with pytest.raises(openai.APIStatusError) as caught:
        api.completions.create(prompt="x" * 10_000_000, **greedy())
    assert caught.value.status_code == 413
    # no Content-Length (chunked): the size actually received counts
    chunks = (b" " * 65536 for _ in range(cfg.http.max_body_bytes // 65536 + 2))
    response = http.post("/v1/completions", content=chunks)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    assert_still_serves(api)


def test_overload_is_429_with_retry_after(api, daemon):
    _, client = daemon
    hogs = [client.submit("hog", SamplingParams(max_tokens=LONG, ignore_eos=True))
            for _ in range(MAX_QUEUED)]
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            api.completions.create(prompt="one more", **greedy())
        assert int(caught.value.response.headers["retry-after"]) >= 1
    finally:
        for job_id in hogs:
            client.abort(job_id)
    assert_still_serves(api)


# -- msgpack, health, metrics -----------------------------------------------------------------


def test_msgpack_round_trip(http):
    body = {"model": "tiny", "prompt": "pack me", "max_tokens": 6, "temperature": 0}
    as_json = http.post("/v1/completions", json=body).json()
    response = http.post("/v1/completions", content=msgpack.packb(body), headers={
        "Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    assert response.headers["content-type"] == "application/msgpack"
    as_msgpack = msgpack.unpackb(response.content)
    assert as_msgpack["choices"] == as_json["choices"]
    assert as_msgpack["usage"] == as_json["usage"]
    bad = http.post("/v1/completions", content=b"\xc1\xc1",
                    headers={"Content-Type": "application/msgpack",
                             "Accept": "application/msgpack"})
    assert bad.status_code == 400
    assert msgpack.unpackb(bad.content)["error"]["code"] == "invalid_body"


def test_health_reports_live_workers_to_a_key_and_the_status_alone_to_others(base_url, http,
                                                                             daemon):
    """Load balancers probe /health without a key; the details (a reason may name the journal's
    path) are for holders of one."""
    _, client = daemon
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["workers_alive"] == len(ready_workers(client))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        anonymous = httpx.get(f"{base_url}/health", headers=headers)
        assert (anonymous.status_code, anonymous.json()) == (200, {"status": "ok"})


def test_metrics_expose_daemon_gauges_and_stream_latencies(api, http, daemon):
    _, client = daemon
    counts = ("pagedserve_time_to_first_token_seconds_count",
              "pagedserve_time_per_output_token_seconds_count")
    before = [_sample(http.get("/metrics").text, name) for name in counts]
    # long enough to come in several chunks: one whose tokens all come in its first chunk
    # (as a short stream may on a loaded host) has no time per output token
    list(api.completions.create(prompt="measure me", stream=True,
                                **{**greedy(), "max_tokens": 200}))
    text = http.get("/metrics").text
    for name in ("pagedserve_requests_running", "pagedserve_requests_waiting",
                 "pagedserve_generation_tokens_per_second",
                 "pagedserve_time_to_first_token_seconds_bucket",
                 "pagedserve_time_per_output_token_seconds_bucket",
                 "pagedserve_prefix_cache_hit_rate", "pagedserve_preemptions_total",
                 "pagedserve_failovers_total", "pagedserve_http_requests_total"):
        assert f"\n{name}" in text, name
    assert "\npagedserve_hung_workers_killed_total 0.0\n" in text
    assert "\npagedserve_engine_failures_total 0.0\n" in text
    assert "\npagedserve_worker_start_failures_total 0.0\n" in text
    assert "\npagedserve_journal_unwritable 0.0\n" in text
    worker = ready_workers(client)[0]["worker_id"]
    assert f'pagedserve_kv_cache_usage_ratio{{worker="{worker}"}}' in text
    assert [_sample(text, name) - b for name, b in zip(counts, before)] == [1, 1]


def _sample(text, name):
    """A sample's value; 0 for a labelled one not counted yet."""
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert len(lines) <= 1, name
    return float(lines[0].split()[1]) if lines else 0.0


# -- clients that leave -----------------------------------------------------------------------


def test_a_client_leaving_mid_stream_aborts_its_job(http, daemon):
    _, client = daemon
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    before = http.get("/metrics").text
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        job_id = first["id"].removeprefix("cmpl-")
        wait_for(lambda: sum(client.status_of(job_id)["num_tokens"]) > 3, what="tokens")
    # the connection is closed here, long before 1500 tokens
    job = client.result(job_id, timeout=60)
    assert job.outputs[0].finish_reason == "abort"
    assert len(job.outputs[0].token_ids) < LONG
    # what it streamed still counts in the metrics (it used to be left out)
    after = http.get("/metrics").text
    for name in ("pagedserve_time_to_first_token_seconds_count",
                 'pagedserve_request_latency_seconds_count{endpoint="completions"}'):
        assert _sample(after, name) == _sample(before, name) + 1, name
    completion = 'pagedserve_http_tokens_total{kind="completion"}'
    assert 1 <= _sample(after, completion) - _sample(before, completion) <= \
        len(job.outputs[0].token_ids)
    wait_for(lambda: all(w.get("kv_used", 0) == 0 for w in ready_workers(client)),
             timeout=30, what="the job's blocks back in the pool")


def test_a_client_leaving_a_whole_response_aborts_its_job(http, base_url, daemon):
    _, client = daemon
    generated = _generated_tokens(client)
    latencies = 'pagedserve_request_latency_seconds_count{endpoint="completions"}'
    before = _sample(http.get("/metrics").text, latencies)
    body = {"model": "tiny", "prompt": "another long story", "max_tokens": LONG,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: client.status()["jobs_unfinished"] == 0, timeout=30,
             what="the job to end")
    wait_for(lambda: all(w.get("kv_used", 0) == 0 for w in ready_workers(client)),
             timeout=30, what="the job's blocks back in the pool")
    assert _generated_tokens(client) - generated < LONG  # it ended early: aborted
    # its latency counts, as a stream's does however it ended (it was left out)
    assert _sample(http.get("/metrics").text, latencies) == before + 1


def _generated_tokens(client):
    return sum(w.get("generated_tokens", 0) for w in ready_workers(client))


def test_a_journal_that_cannot_be_written_refuses_jobs_until_it_can(api, http, base_url, daemon):
    """The scheduler's process may not grow any file past the journal's size (the kernel's
    file size limit: a real write failure, as a full disk gives): no job is accepted, since
    none could be made durable, and one is again once the journal can be written."""
    cfg, client = daemon
    pid = client.status()["scheduler_pid"]
    journal = Path(cfg.scheduler.journal_path)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (journal.stat().st_size, hard))
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            api.completions.create(prompt="to the journal", **greedy())
        assert caught.value.status_code == 503
        error = caught.value.response.json()["error"]
        assert error["code"] == "journal_unwritable"
        assert error["message"].startswith(f"pagedserve cannot write its job journal (cannot "
                                           f"write {journal}: File too large)")
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["reason"] == (f"the job journal: cannot write {journal}: File too "
                                           "large")
        anonymous = httpx.get(f"{base_url}/health")
        assert (anonymous.status_code, anonymous.json()) == (503, {"status": "unavailable"})
        assert "journal: cannot write" in daemon_cmds.format_status(client.status())
        assert "\npagedserve_journal_unwritable 1.0\n" in http.get("/metrics").text
        assert client.status()["jobs_unfinished"] == 0  # the refused job does not run
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    wait_for(lambda: client.status()["journal_error"] is None, timeout=30,
             what="the journal written again")
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert_still_serves(api)


def test_a_draining_daemon_is_503_not_429():
    """`down --drain` refuses new jobs for good: a 429 would tell clients to retry here."""
    from cluster.http import _daemon_error
    from scheduler.service import DrainingError

    error = _daemon_error(DrainingError("pagedserve is draining to go down"))
    assert (error.status, error.body()["error"]["code"]) == (503, "draining")
    assert "Retry-After" not in error.headers


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_logit_bias_steers_the_tokens(api, endpoint):
    favoured = 65
    if endpoint == "completions":
        reply = api.completions.create(prompt="x", max_tokens=4, temperature=0, model="tiny",
                                       logit_bias={str(favoured): 100})
        text = reply.choices[0].text
    else:
        reply = api.chat.completions.create(messages=USER, max_tokens=4, temperature=0,
                                            model="tiny", logit_bias={str(favoured): 100})
        text = reply.choices[0].message.content
    assert text == chr(favoured) * 4  # the byte tokenizer: id 65 is "A"


def test_tokenize_counts_what_a_request_would_send_and_detokenize_reverses_it(api, http):
    prompt = "count me"
    tokens = http.post("/tokenize", json={"prompt": prompt}).json()
    reply = api.completions.create(prompt=prompt, max_tokens=1, model="tiny")
    assert tokens["count"] == len(tokens["tokens"]) == reply.usage.prompt_tokens
    assert tokens["max_model_len"] == 2048
    chat = http.post("/tokenize", json={"messages": USER}).json()
    answer = api.chat.completions.create(messages=USER, max_tokens=1, model="tiny")
    assert chat["count"] == answer.usage.prompt_tokens
    bare = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert http.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": prompt}
    for path, body, param in [("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "x", "messages": USER}, "prompt"),
                              ("/detokenize", {"tokens": [10 ** 6]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")]:
        error = http.post(path, json=body)
        assert error.status_code == 400 and error.json()["error"]["param"] == param, body


def test_truncate_prompt_tokens_and_special_tokens_through_the_api(api):
    long = api.completions.create(prompt=[5] * 3000, max_tokens=2, model="tiny",
                                  extra_body={"truncate_prompt_tokens": 100})
    assert long.usage.prompt_tokens == 100  # the context holds 2048: the tail was kept
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(prompt="x", max_tokens=2, model="tiny", echo=True,
                               extra_body={"truncate_prompt_tokens": 1})
    assert caught.value.body["param"] == "truncate_prompt_tokens"
    special = api.completions.create(prompt="x", max_tokens=2, temperature=0, model="tiny",
                                     logit_bias={"257": 100},
                                     extra_body={"ignore_eos": True,
                                                 "skip_special_tokens": False})
    assert special.choices[0].text == "</s>" * 2


# -- last: it brings the daemon down and up again under the server ---------------------------


def test_a_submit_the_stopped_scheduler_takes_late_is_aborted(http, daemon, monkeypatch):
    """A scheduler that does not answer (stopped) takes the queued submit once it runs again;
    the client had its 503 long before, so the job must not run for nobody."""
    from cluster import http as http_module

    cfg, client = daemon
    monkeypatch.setattr(http_module, "ABORT_RETRY_S", 0.2)
    monkeypatch.setattr(http_module, "HEALTH_TIMEOUT_S", 0.5)  # the context refresh's wait
    monkeypatch.setattr(client, "timeout_s", 2.0)
    pid = client.status()["scheduler_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        late = http.post("/v1/completions", json={"model": "tiny", "prompt": "too late",
                                                  "max_tokens": 1234, "ignore_eos": True})
        assert late.status_code == 503, late.text
    finally:
        os.kill(pid, signal.SIGCONT)
    monkeypatch.setattr(client, "timeout_s", 60.0)
    taken = wait_for(lambda: [j for j in client.jobs(finished_limit=20)
                              if j["max_tokens"] == 1234], timeout=30, what="the late job")
    wait_for(lambda: client.status_of(taken[0]["job_id"])["finished"], timeout=30,
             what="the late job aborted")
    assert client.status_of(taken[0]["job_id"])["finish_reasons"] == ["abort"]


def test_a_stream_rides_out_a_scheduler_restart(http, daemon):
    """The server's client waits for no `up` once the daemon is down (see the next test); a
    scheduler that Ray restarts is not down, and a stream in flight goes on through it, with
    no token lost or doubled."""
    _, client = daemon
    pid = client.status()["scheduler_pid"]
    body = {"model": "tiny", "prompt": "through a restart", "max_tokens": 300,
            "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = (line for line in response.iter_lines() if line)
        events = [next(lines)]
        os.kill(pid, signal.SIGKILL)  # Ray restarts it; its __init__ replays the journal
        events += lines
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert not [chunk for chunk in chunks if "error" in chunk]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    answer = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == answer


def test_in_an_outage_requests_fail_fast_and_their_jobs_are_aborted_once_it_is_back(
        http, daemon, monkeypatch):
    """A request answered 503 while the daemon was down used to have its job resumed by the
    next `up` and run in full for nobody. And requests waited for an `up` until the outage had
    lasted the client's timeout_s (60 s), each /health and scrape 5 s: now they fail at once."""
    from cluster import http as http_module

    cfg, client = daemon
    monkeypatch.setattr(http_module, "ABORT_RETRY_S", 0.2)
    body = {"model": "tiny", "prompt": "for nobody", "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if line)
        job_id = json.loads(next(lines).removeprefix("data: "))["id"].removeprefix("cmpl-")
        assert bringup.down() == 1  # the journal keeps the job for the next `up`
        down_at = time.monotonic()
        events = list(lines)
    assert "daemon_unavailable" in events[-2] and events[-1] == "data: [DONE]"
    assert time.monotonic() - down_at < 10
    for _ in range(2):  # the first request of the outage and a later one
        started = time.monotonic()
        late = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert late.status_code == 503 and time.monotonic() - started < 4
    started = time.monotonic()
    health = http.get("/health")
    assert health.status_code == 503 and time.monotonic() - started < 4
    assert health.json()["reason"] == "pagedserve is not up on this cluster"  # not "no answer"
    assert {r.status_code for r in asyncio.run(_refused_together(http, 6))} == {503}
    # the aborts of the nine answered requests wait for the daemon together: one try every
    # ABORT_RETRY_S for them all, not one each (2,000 requests in an outage took 52% of a
    # core, and the answer of each new one slowed down, for as long as the outage lasted)
    tries, real_abort = [], client.aabort

    async def counted_abort(job_id, **kwargs):
        tries.append(job_id)
        return await real_abort(job_id, **kwargs)

    monkeypatch.setattr(client, "aabort", counted_abort)
    time.sleep(2.0)
    # a first try of some aborts may still be on its way: only the oldest abort is tried again
    retried = {job for job in tries if tries.count(job) > 1}
    assert tries and len(retried) <= 1, f"{len(retried)} aborts tried again, not one for all"
    assert len(tries) - len(set(tries)) <= 2.0 / http_module.ABORT_RETRY_S, tries
    status = bringup.up(cfg, min_workers=1)
    assert status["jobs_resumed"] == 1
    job = Client().result(job_id, timeout=60)
    assert job.outputs[0].finish_reason == "abort" and len(job.outputs[0].token_ids) < LONG


async def _refused_together(http: httpx.Client, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=http.base_url, headers=http.headers,
                                 timeout=60) as session:
        return await asyncio.gather(*[
            session.post("/v1/completions", json={"model": "tiny", "prompt": f"x{i}",
                                                  "max_tokens": 2}) for i in range(count)])


def test_a_burst_of_requests_in_an_outage_shares_its_lookups_of_the_scheduler(
        http, daemon, monkeypatch):
    """Each request in an outage looked the scheduler up by name four times (twice for its
    submit, twice for its abort; a GCS round trip each): a burst of 500 made ~2,000."""
    import cluster.client

    cfg, _ = daemon
    lookups, real_find = [], cluster.client.find_scheduler

    def counted_find():
        lookups.append(1)
        return real_find()

    monkeypatch.setattr(cluster.client, "find_scheduler", counted_find)
    bringup.down()
    refused = []
    for _ in range(2):  # the first burst of the outage and a later one
        refused += asyncio.run(_refused_together(http, BURST))
        time.sleep(1.0)
    assert [r.status_code for r in refused] == [503] * 2 * BURST
    assert refused[-1].json()["error"]["message"].startswith("pagedserve is not up")
    # one for the first burst, one for the later (and one try of the aborts the outage
    # could not take, in the time it lasts, ABORT_RETRY_S apart): 810 before
    assert len(lookups) <= 20, f"{len(lookups)} lookups for {2 * BURST} requests"
    bringup.up(cfg, min_workers=1)
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                              "max_tokens": 2}).status_code == 200


def test_the_server_follows_a_daemon_brought_up_again_with_less_room(http, daemon, monkeypatch):
    from cluster import http as http_module

    monkeypatch.setattr(http_module, "CONTEXT_REFRESH_S", 0.0)
    assert http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"] == 2048
    cfg, client = daemon
    bringup.down()
    bringup.up(with_overrides(cfg, engine={"kv_cache_gib": 0.0002}), min_workers=1)
    fit = ready_workers(client)[0]["max_tokens_fit"]
    assert fit < 2048
    assert http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"] == fit
    chat = http.post("/v1/chat/completions",
                     json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200  # its default max_tokens is the room left: was a 400


def test_cors_is_off_by_default_and_answers_the_origins_configured(daemon, http):
    """A browser page could not call the API at all (its preflight got a 405)."""
    cfg, client = daemon
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in http.options(
        "/v1/chat/completions", headers=preflight).headers
    allowed = with_overrides(cfg, http={"cors_allowed_origins": ["https://ui.example"]})
    with serving(create_app(client, allowed, api_keys=(KEY,))) as url:
        answer = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://ui.example"
        listed = httpx.get(f"{url}/v1/models", headers={"Origin": "https://ui.example",
                                                        "Authorization": f"Bearer {KEY}"})
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "https://ui.example"
        # the page's script may read the request id
        assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()
        other = httpx.options(f"{url}/v1/chat/completions",
                              headers={**preflight, "Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def test_past_max_concurrent_requests_a_post_is_503_before_its_body_is_read(daemon):
    """Nothing bounded the requests in progress: 1,500 clients each sending most of a 1 MiB
    body grew the server by 1.5 GiB, and more would have grown it further."""
    cfg, client = daemon
    limited = with_overrides(cfg, http={"max_concurrent_requests": 2})
    with serving(create_app(client, limited)) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            for sock in slow:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b" " * 50000)
            wait_for(lambda: httpx.post(f"{url}/v1/completions", json={}).status_code == 503,
                     timeout=10, what="the slow requests in progress")
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                              headers={"X-Request-Id": "busy-11"})
            assert int(busy.headers["retry-after"]) >= 1 and busy.headers["connection"] == "close"
            assert busy.headers["x-request-id"] == "busy-11"
            assert error_of(busy)["code"] == "too_many_requests_in_progress"
            assert httpx.get(f"{url}/health").status_code == 200  # probes are still answered
        finally:
            for sock in slow:
                sock.close()
        wait_for(lambda: httpx.post(f"{url}/v1/completions", json={
            "prompt": "x", "max_tokens": 2}).status_code == 200, timeout=10,
            what="the slow requests gone")


def test_choices_carry_vllm_s_stop_reason(api, http):
    full = api.completions.create(prompt="stop reason", **greedy())
    stop = full.choices[0].text[2:4]
    body = {"model": "tiny", "prompt": "stop reason", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stop": [stop]}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", stop)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    last = json.loads(events[-2])["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
    length = http.post("/v1/completions", json={**body, "stop": None}).json()["choices"][0]
    assert (length["finish_reason"], length["stop_reason"]) == ("length", None)


def test_fields_a_request_leaves_unset_take_the_checkpoint_s_generation_config(daemon, tmp_path):
    """As vLLM's server: an instruct model's recommended temperature / top_k / top_p apply
    unless the request says otherwise; they were ignored (temperature 1 over the vocabulary)."""
    import shutil

    cfg, client = daemon
    checkpoint = tmp_path / "tiny-with-defaults"  # the daemon's weights, other sampling defaults
    shutil.copytree(resolve_model_path("tiny"), checkpoint)
    (checkpoint / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 256, "eos_token_id": 257, "top_k": 1, "max_new_tokens": 3}))
    greedy_cfg = with_overrides(cfg, engine={"model": str(checkpoint)})
    body = {"model": str(checkpoint), "prompt": "defaults", "max_tokens": 8, "ignore_eos": True}
    with serving(create_app(client, greedy_cfg, api_keys=(KEY,))) as url:
        session = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        texts = {session.post("/v1/completions", json={**body, "seed": seed}).json()[
            "choices"][0]["text"] for seed in range(3)}
        greedy_text = session.post("/v1/completions", json={**body, "temperature": 0}).json()[
            "choices"][0]["text"]
        sampled = {session.post("/v1/completions", json={**body, "seed": seed, "top_k": 0}).json()[
            "choices"][0]["text"] for seed in range(3)}
        session.close()
    assert texts == {greedy_text}  # top_k 1: the seeds do not matter
    assert len(sampled) > 1  # the request's own top_k wins


def test_a_daemon_taken_down_is_said_to_be_down_not_silent():
    """With the daemon down (`pagedserve down`), requests said it "does not answer", as they
    do while it restarts; the CLI says it is not up."""
    from cluster import http as http_module

    down = http_module._daemon_error(DaemonNotUpError("pagedserve is not up on this cluster; "
                                                      "run `pagedserve up`"))
    restarting = http_module._daemon_error(DaemonUnavailableError("no answer in 60 s"))
    assert (down.status, restarting.status) == (503, 503)
    assert down.body()["error"]["message"].startswith("pagedserve is not up on this cluster")
    assert restarting.body()["error"]["message"] == ("the pagedserve daemon does not answer; "
                                                     "retry later")
    assert down.body()["error"]["code"] == restarting.body()["error"]["code"]

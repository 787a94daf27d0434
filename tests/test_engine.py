"""Engine behaviour on the built-in tiny model: determinism, n > 1, stops, abort, logprobs,
bad input, kernels loaded at start-up, the recent tokens/s."""
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import transformers

from cluster.llm import LLM
from scheduler.prompts import prompt_token_ids
from scheduler.sampling_params import InvalidRequestError, SamplingParams
from worker.models.tiny import tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cluster", "Scale out by adding nodes and", "KV", "A dead worker loses no job because"]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", block_size=16)


def texts(outs):
    return [o.outputs[0].text for o in outs]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def seeded(i, **kw):
    return SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=100 + i,
                          ignore_eos=True, **kw)


def test_seeded_sampling_is_identical_with_and_without_preemption(llm):
    params = [seeded(i) for i in range(len(PROMPTS))]
    calm = tokens(llm.generate(PROMPTS, params))
    tight = LLM("tiny", block_size=16, kv_cache_gib=12 * 16 * 2 * 4 * 2 * 64 * 4 / 2**30)
    squeezed = tokens(tight.generate(PROMPTS, params))
    assert tight.engine.stats().num_preemptions > 0
    assert squeezed == calm


def test_seeded_job_does_not_depend_on_its_neighbours(llm):
    alone = tokens(llm.generate(PROMPTS[1], seeded(1)))[0]
    together = tokens(llm.generate(PROMPTS, [seeded(i) for i in range(len(PROMPTS))]))[1]
    assert alone == together
    assert tokens(llm.generate(PROMPTS[1], seeded(2)))[0] != alone


def test_n_samples_fork_from_one_prefill(llm):
    job = llm.generate(PROMPTS[1], seeded(1, n=3))[0]
    outs = [o.token_ids for o in job.outputs]
    assert len(outs) == 3 and all(len(t) == 40 for t in outs)
    assert outs[0] == tokens(llm.generate(PROMPTS[1], seeded(1)))[0]  # sample 0 keeps the seed
    assert len({tuple(t) for t in outs}) == 3
    greedy = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert llm.engine.stats().kv_blocks_used == 0


def test_stop_string_truncates_text_and_stops(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    text = full[0].outputs[0].text
    stop = text[10:13]
    assert stop and text.find(stop) >= 0
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                  stop=[stop]))[0].outputs[0]
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < 40


def test_a_stop_string_completed_by_the_last_allowed_token_still_ends_with_stop(llm):
    greedy = dict(temperature=0, ignore_eos=True)
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, **greedy))[0].outputs[0].text
    stop = next(full[-n:] for n in range(1, len(full)) if full.find(full[-n:]) == len(full) - n)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, stop=[stop], **greedy)
                       )[0].outputs[0]
    assert out.text == full[: -len(stop)] and len(out.token_ids) == 8
    assert out.finish_reason == "stop"  # was "length": the budget ran out on the same token


def test_stop_token_ends_the_output(llm):
    full = tokens(llm.generate(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0,
                                                          ignore_eos=True)))[0]
    stop_id = full[7]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full[: full.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_result(llm):
    seen = {}

    def on_output(index, delta):
        seen.setdefault(index, []).append(delta)

    outs = llm.generate(PROMPTS, [seeded(i) for i in range(len(PROMPTS))], on_output=on_output)
    for i, job in enumerate(outs):
        deltas = seen[i]
        assert sum((d.new_token_ids for d in deltas), []) == job.outputs[0].token_ids
        assert "".join(d.text for d in deltas) == job.outputs[0].text
        assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    assert engine.abort(rid)
    assert engine.stats().kv_blocks_used == 0
    final = engine.step()
    assert [(o.request_id, o.finish_reason) for o in final] == [(rid, "abort")]
    assert not engine.has_unfinished()


def test_a_request_id_in_use_by_a_job_or_sample_is_refused_until_it_is_done(llm):
    """An aborted id re-added before the next step, a job id that is another job's sample id,
    or one job id twice were accepted: the next step raised (KeyError, 'already has blocks')
    or two jobs' outputs were mixed, and blocks leaked."""
    engine, params = llm.engine, SamplingParams(max_tokens=4, temperature=0)
    engine.add_request([1, 2, 3], params, request_id="x")
    engine.step()
    engine.abort("x")
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, n=2),
                       request_id="pair")
    for taken, n in [("x", 1), ("pair/1", 1), ("pair", 1), ("pair", 2)]:
        with pytest.raises(InvalidRequestError, match=f"'{taken}' is already in use"):
            engine.add_request([4, 5], SamplingParams(max_tokens=4, n=n), request_id=taken)
    with pytest.raises(InvalidRequestError, match="leave nothing to generate"):
        engine.add_request([4, 5], params, request_id="done", resumed_token_ids=[7] * 4)
    engine.step()  # the abort's output goes out: "x" is free again
    engine.add_request([4, 5], params, request_id="x")
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    finished = sorted((o.request_id, o.index) for o in outputs if o.finish_reason)
    assert finished == [("pair", 0), ("pair", 1), ("x", 0)]
    assert engine.stats().kv_blocks_used == 0


def test_tokens_per_s_counts_only_the_recent_window(llm, monkeypatch):
    monkeypatch.setattr("worker.engine.RATE_WINDOW_S", 0.5)
    llm.generate(["rate"], SamplingParams(max_tokens=8, ignore_eos=True))
    assert llm.engine.stats().tokens_per_s > 0
    time.sleep(0.6)  # idle for longer than the window: no step has run since
    assert llm.engine.stats().tokens_per_s == 0.0


def test_stats_read_from_another_thread_while_the_engine_steps(llm, monkeypatch):
    """A daemon's worker answers stats on its event loop while its engine thread steps: both
    pruned the rate window, and stats raised 'deque mutated during iteration' (or an
    IndexError) in either thread."""
    monkeypatch.setattr("worker.engine.RATE_WINDOW_S", 0.002)  # every step leaves it at once
    errors, done = [], threading.Event()

    def read_stats():
        while not done.is_set():
            try:
                llm.engine.stats()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(exc))

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the two threads as often as the GIL allows
    reader = threading.Thread(target=read_stats)
    reader.start()
    try:
        outs = llm.generate(["threads "] * 8, SamplingParams(max_tokens=60, ignore_eos=True))
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(switch_interval)
    assert errors == [] and all(len(o.outputs[0].token_ids) == 60 for o in outs)


def test_stats_count_every_prompt_token_computed_and_every_token_generated(llm):
    """A prompt's last token (computed in the step that samples) and the first token of each
    extra sample of an n > 1 job (drawn from the parent's row) went uncounted."""
    params = SamplingParams(max_tokens=5, n=3, ignore_eos=True)
    prompts = ["counted 1", "counted, too"]
    before = llm.engine.stats()
    jobs = llm.generate(prompts, params)
    after = llm.engine.stats()
    computed = sum(len(llm.engine.tokenizer.encode(p)) for p in prompts) - (
        after.prefix_hit_tokens - before.prefix_hit_tokens)
    assert after.prompt_tokens - before.prompt_tokens == computed
    assert after.generated_tokens - before.generated_tokens == 2 * 3 * 5 == sum(
        len(sample.token_ids) for job in jobs for sample in job.outputs)


def test_tokens_per_s_just_after_a_step_counts_the_step_s_own_time(llm, monkeypatch):
    """It divided by the time since the oldest counted step ended: 2 tokens read 1 ms after
    their step were 2,000 tokens/s (a daemon's status once showed ~70,000)."""
    clock = [time.monotonic() + 60.0]  # the module's earlier steps are out of the window
    monkeypatch.setattr("worker.engine.time.monotonic", lambda: clock[0])
    execute = llm.engine.runner.execute

    def model_takes_a_tenth_of_a_second(*args):
        clock[0] += 0.1
        return execute(*args)

    monkeypatch.setattr(llm.engine.runner, "execute", model_takes_a_tenth_of_a_second)
    for prompt in ("tick", "tock"):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    llm.engine.step()
    clock[0] += 0.001
    assert llm.engine.stats().tokens_per_s == pytest.approx(2 / 0.101)
    llm.engine.step()
    assert llm.engine.stats().tokens_per_s == pytest.approx(4 / 0.201)
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_logprobs_are_sorted_and_match_the_tokens(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, logprobs=3,
                                                  ignore_eos=True))[0].outputs[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.logprob <= 0
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token


def test_each_logprob_has_its_token_decoded_as_transformers_decodes_it_alone(llm):
    """vLLM's Logprob.decoded_token, of generated and prompt positions alike: the token's text
    alone, special tokens included (</s> here), U+FFFD for part of a character. It was None."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir() / "tokenizer.json"))
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=4, prompt_logprobs=2,
                            ignore_eos=True, logit_bias={257: 100})
    job = llm.generate(["é cluster"], params)[0]
    positions = job.outputs[0].logprobs + job.prompt_logprobs[1:]
    assert job.outputs[0].token_ids == [257] * 3 and len(positions) == 3 + 10
    for position in positions:
        assert {t: lp.decoded_token for t, lp in position.items()} == {
            t: hf.decode([t]) for t in position}
    assert job.outputs[0].logprobs[0][257].decoded_token == "</s>"
    assert job.prompt_logprobs[1][job.prompt_token_ids[1]].decoded_token == "\ufffd"  # é's 1st byte


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt is empty"),
    ([], SamplingParams(), "prompt_token_ids is empty"),
    ([1, 99999], SamplingParams(), r"prompt_token_ids must be integers in \[0, 262\); got \[99999\]"),
    ("x" * 3000, SamplingParams(), "max_model_len"),
])
def test_bad_requests_are_rejected_and_others_go_on(llm, prompt, params, message):
    engine = llm.engine
    good = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, params)
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good]


@pytest.mark.parametrize("argument, message", [
    ({"resumed_token_ids": [10 ** 6]}, r"resumed_token_ids must be integers in \[0, 262\)"),
    ({"resumed_token_ids": [1.5]}, "resumed_token_ids must be integers"),
    ({"cache_salt": ["tenant"]}, "cache_salt=.* must be a string"),
    ({"queued_at": None}, "queued_at=None: must be a finite number"),
    ({"queued_at": float("nan")}, "queued_at=nan: must be a finite number"),
])
def test_bad_daemon_arguments_are_refused_and_others_go_on(llm, argument, message):
    """The scheduler's own arguments of add_request were not checked: the next step raised
    (an IndexError in the embedding, an unhashable prefix key, a failed queue comparison)
    and took every request of the batch with it."""
    engine = llm.engine
    good = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=5), **argument)
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good]


def _changed(field, value):
    params = SamplingParams(max_tokens=4, temperature=0)
    setattr(params, field, value)
    return params


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 2.0), ("max_tokens", 0), ("stop_token_ids", [-1]), ("n", 0)])
def test_sampling_params_changed_after_construction_are_checked_again(llm, field, value):
    """A SamplingParams checks itself when built; one changed afterwards reached the batch
    unchecked (a negative temperature ran as greedy, max_tokens=0 was refused as "0 resumed
    tokens leave nothing to generate"). The engine takes a validated copy, so later changes
    cannot reach the job."""
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match=f"^invalid {field}="):
        engine.add_request(PROMPTS[0], _changed(field, value))
    params = SamplingParams(max_tokens=4, temperature=0)
    request_id = engine.add_request(PROMPTS[0], params)
    params.max_tokens = 1  # after the job took its copy
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    assert sum(len(o.new_token_ids) for o in outputs) == 4


def test_the_stop_token_is_in_the_token_ids_but_not_the_text(llm):
    """As in vLLM: the EOS or stop token that ends a sample is not rendered into its text
    (a stop string is not either) unless include_stop_str_in_output."""
    free = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0))[0]
    tokens = free.outputs[0].token_ids
    at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    for include in (False, True):
        params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tokens[at]],
                                include_stop_str_in_output=include)
        out = llm.generate([PROMPTS[1]], params)[0].outputs[0]
        assert out.token_ids == tokens[:at + 1] and out.finish_reason == "stop"
        assert out.text == llm.tokenizer.decode(tokens[:at + 1 if include else at])


def _streamed(engine, params, resumed=()):
    """Tokens, text, finish reason of one job of PROMPTS[0], and (tokens, text) so far after
    each of its outputs."""
    request_id = engine.add_request(PROMPTS[0], params, resumed_token_ids=list(resumed))
    tokens, text, sent, finish = [], "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                tokens, text = tokens + out.new_token_ids, text + out.text
                sent.append((len(tokens), text))
                finish = out.finish_reason
    return tokens, text, finish, sent


def test_a_sample_resumed_after_any_output_ends_as_it_would_have_with_a_stop_string(llm):
    """On failover a sample goes on from the tokens its stream had, on a new worker. That
    worker's text began empty: the tail held back as the possible start of a stop string was
    never sent (text lost from the middle of the output), and a stop string begun before the
    failover was not found (the job ran on to max_tokens)."""
    free = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0))[0]
    stop = free.outputs[0].text[20:23]
    assert free.outputs[0].text.find(stop) == 20
    params = SamplingParams(max_tokens=40, temperature=0, stop=[stop])
    tokens, text, finish, sent = _streamed(llm.engine, params)
    assert text == free.outputs[0].text[:20] and finish == "stop" and len(sent) > 20
    for count, text_sent in sent[:-1]:  # a failover after each output but the last
        more, rest, end, _ = _streamed(llm.engine, params, tokens[:count])
        assert (tokens[:count] + more, text_sent + rest, end) == (tokens, text, "stop"), count


def test_a_text_prompt_must_encode_into_the_models_vocabulary(llm):
    # a tokenizer with more tokens than the model's embedding used to crash the model step
    ids = llm.tokenizer.encode("hello")
    assert prompt_token_ids("hello", llm.tokenizer, vocab_size=max(ids) + 1) == ids
    with pytest.raises(InvalidRequestError,
                       match=rf"outside the model's vocabulary \[0, {max(ids)}\): \[{max(ids)}"):
        prompt_token_ids("hello", llm.tokenizer, vocab_size=max(ids))


def test_prompt_logprobs_survive_one_token_chunks_beside_decodes(llm):
    """With a 2-token step budget a prompt advances one token per step beside a decoding job:
    steps of single tokens, which must still score the prompt positions."""
    prompt = list(range(40, 60))
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    reference = llm.generate([prompt], scored)[0].prompt_logprobs
    tight = LLM("tiny", block_size=16, max_num_batched_tokens=2, enable_chunked_prefill=True)
    outs = tight.generate([[3], prompt], [SamplingParams(max_tokens=30, ignore_eos=True), scored])
    got = outs[1].prompt_logprobs[1:]
    assert [lp.token_id for lp in got] == prompt[1:]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in reference[1:]],
                                                       abs=1e-4)


@pytest.mark.parametrize("workers", [0, -1, "2", True])
def test_llm_refuses_a_worker_count_that_is_not_a_positive_integer(workers):
    # 0 used to bring up a daemon with no workers, whose jobs would wait forever
    with pytest.raises(ValueError, match=f"workers must be an integer >= 1.*got {workers!r}"):
        LLM("tiny", workers=workers)


def test_chat_replies_to_the_conversation_rendered_with_the_chat_template(llm):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    second = [{"role": "user", "content": "Which worker?"}]
    replies = llm.chat([first, second], greedy)
    rendered = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c),
                                     add_special_tokens=False) for c in (first, second)]
    assert [r.outputs[0].token_ids for r in replies] == \
        [o.outputs[0].token_ids for o in llm.generate(rendered, greedy)]
    assert replies[0].num_prompt_tokens == len(rendered[0])
    assert [r.outputs[0].text for r in llm.chat(first, greedy)] == [replies[0].outputs[0].text]
    with pytest.raises(InvalidRequestError, match="conversation 1 must be a non-empty list"):
        llm.chat([first, []], greedy)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("n", 0),
    ("temperature", float("inf")), ("repetition_penalty", float("inf")),
    ("presence_penalty", float("nan")), ("seed", 2 ** 63), ("top_k", 2 ** 64),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_logit_bias_keys_are_ascii_digits():
    """str.isdigit() also holds for "²" (int() then raised a bare ValueError) and for "١",
    which was taken as token 1."""
    assert SamplingParams(logit_bias={"12": 1.0}).logit_bias == {12: 1.0}
    for key in ("²", "١"):
        with pytest.raises(InvalidRequestError, match="^invalid logit_bias="):
            SamplingParams(logit_bias={key: 1.0})


def test_numpy_numbers_are_taken_as_the_plain_numbers_they_hold(llm):
    """vLLM takes them; they were refused ("invalid top_k=np.int64(3): must be an integer"),
    so a script sweeping np.arange or np.float32 values failed."""
    params = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5),
                            top_k=np.int64(3), seed=np.uint64(7), stop_token_ids=np.array([5]),
                            logit_bias={np.int64(5): np.float32(1.0)}, top_p=np.float64(0.5))
    plain = SamplingParams(max_tokens=4, temperature=0.5, top_k=3, seed=7, stop_token_ids=[5],
                           logit_bias={5: 1.0}, top_p=0.5)
    assert params == plain
    assert all(type(value) in (int, float) for value in (
        params.max_tokens, params.temperature, params.top_k, params.seed, params.top_p,
        *params.stop_token_ids, *params.logit_bias, *params.logit_bias.values()))
    assert llm.generate("hi", params)[0].outputs[0].token_ids == \
        llm.generate("hi", plain)[0].outputs[0].token_ids


def test_n_is_capped_where_one_job_would_hold_the_scheduler():
    """A job of n = 200,000 samples held the daemon's scheduler for minutes."""
    assert SamplingParams(n=256).n == 256
    with pytest.raises(InvalidRequestError, match=r"invalid n=200000: must be an integer in "
                                                  r"\[1, 256\]"):
        SamplingParams(n=200_000)


def test_stop_strings_are_capped_and_a_refusal_does_not_print_them_all():
    """Every token is searched for each stop string: 10,000 of them slowed the jobs beside."""
    assert len(SamplingParams(stop=["s" * 1000] * 64).stop) == 64
    for stop in (["a"] * 65, ["a" * 1001]):
        with pytest.raises(InvalidRequestError, match="must be a list of at most 64 non-empty "
                                                      "strings of up to 1000 characters") as err:
            SamplingParams(stop=stop * 150)
        assert len(str(err.value)) < 1000


def test_stop_token_ids_and_logit_bias_are_capped_and_a_refusal_does_not_print_them_all():
    """Each step pays for every id of both in every sample: 150,000 stop token ids (1 MiB of
    JSON) made a worker's steps 135x slower for every job beside them."""
    assert len(SamplingParams(stop_token_ids=list(range(1024))).stop_token_ids) == 1024
    assert len(SamplingParams(logit_bias=dict.fromkeys(range(1024), 1.0)).logit_bias) == 1024
    for field, value, allowed in (
            ("stop_token_ids", list(range(150_000)), "a list of at most 1024 token ids"),
            ("logit_bias", dict.fromkeys(range(1025), 1.0), "a map of at most 1024 token ids")):
        with pytest.raises(InvalidRequestError, match=f"^invalid {field}=.*must be {allowed}"
                           ) as err:
            SamplingParams(**{field: value})
        assert len(str(err.value)) < 1000


def test_null_stop_lists_are_empty_and_other_non_lists_are_refused_by_name():
    """JSON null, as OpenAI's API reads it; a number or a map was a raw TypeError, or taken."""
    params = SamplingParams.from_dict({"stop": None, "stop_token_ids": None})
    assert params.stop == [] and params.stop_token_ids == []
    for field, value in (("stop", 5), ("stop", {"ab": 1}), ("stop_token_ids", 3)):
        with pytest.raises(InvalidRequestError, match=f"^invalid {field}="):
            SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(params=[SamplingParams()] * 3), ValueError, "3 SamplingParams for 2 prompts"),
    (dict(params="greedy"), TypeError, "got str"),
    (dict(params=[SamplingParams(), {"max_tokens": 2}]), TypeError, "sequence of them"),
    (dict(priorities=[1]), ValueError, "1 priority for 2 prompts"),
    (dict(prompts=5), TypeError, "prompts must be a string, a list of token ids, or a seq"),
])
def test_generate_refuses_arguments_that_do_not_match_the_prompts(llm, kwargs, error, message):
    with pytest.raises(error, match=message):
        llm.generate(**{"prompts": ["one", "two"], **kwargs})
    assert not llm.engine.has_unfinished()  # nothing was queued


def test_resumed_output_continues_exactly_where_it_stopped(llm):
    params = SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True,
                            frequency_penalty=0.5)
    full = llm.generate(PROMPTS[1], params)[0].outputs[0]
    engine = llm.engine
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    rid = engine.add_request(prompt_ids, params, resumed_token_ids=full.token_ids[:12])
    new_tokens, text = [], ""
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            new_tokens += out.new_token_ids
            text += out.text
    assert new_tokens == full.token_ids[12:]
    assert full.text.endswith(text) and len(text) > 0


LOADED_KERNELS_SCRIPT = textwrap.dedent("""
    import json
    from cluster.llm import LLM
    import worker.backends.cpu_numba as attention
    import worker.models.fused_ops as ops
    LLM("tiny")  # no request yet
    kernels = [ops._add_rms_norm, ops._add_rms_norm_parallel, ops._rotate_qk,
               ops._rotate_qk_parallel, ops._silu_mul_parallel, attention.paged_attention_fp32]
    print(json.dumps({k.py_func.__name__: len(k.signatures) for k in kernels}))
""")


def test_a_new_engine_loads_its_cpu_kernels_before_the_first_request():
    """Loading numba's kernels takes ~0.6 s in a new process: the engine pays it at start-up,
    not the first request (a fresh process, so nothing is loaded already)."""
    result = subprocess.run([sys.executable, "-c", LOADED_KERNELS_SCRIPT], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded and all(count >= 1 for count in loaded.values()), loaded


def test_an_interrupted_generate_leaves_the_engine_clean_for_the_next_call(llm):
    """Ctrl-C in a notebook: the next generate used to fail with a KeyError on the first
    output of a request the interrupted call had left running."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate(["after"], greedy)[0].outputs[0].token_ids
    seen = []

    def interrupt(index, delta):
        seen.append(index)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c"], SamplingParams(max_tokens=50, ignore_eos=True),
                     on_output=interrupt)
    assert not llm.engine.has_unfinished() and llm.engine.kv.stats().used == 0
    assert llm.generate(["after"], greedy)[0].outputs[0].token_ids == expected


def test_min_tokens_holds_stop_strings_off_until_reached(llm):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = llm.generate(["min tokens"], greedy)[0].outputs[0]
    stop = full.text[1]  # the byte tokenizer: one character per token here
    params = dict(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    early = llm.generate(["min tokens"], SamplingParams(**params))[0].outputs[0]
    assert early.text == full.text[:full.text.index(stop)] and early.finish_reason == "stop"
    held = llm.generate(["min tokens"], SamplingParams(**params, min_tokens=6))[0].outputs[0]
    assert len(held.token_ids) >= 6 and held.token_ids == full.token_ids[:len(held.token_ids)]
    assert held.text.startswith(full.text[:2])  # the stop string before token 6 did not stop it
    # a longer stop string beside it, found nowhere, must not widen the search back into the
    # text before min_tokens (it did: the early stop string then ended the output)
    longer = llm.generate(["min tokens"], SamplingParams(**{**params, "stop": [stop, "\x00" * 9]},
                                                         min_tokens=6))[0].outputs[0]
    assert longer.text == held.text and longer.finish_reason == held.finish_reason
    with pytest.raises(InvalidRequestError, match=r"min_tokens=5: must be an integer in \[0, "
                                                   r"max_tokens=4\]"):
        SamplingParams(max_tokens=4, min_tokens=5)
    vocab = llm.engine.model_config.vocab_size
    every_id = SamplingParams(max_tokens=4, min_tokens=3, stop_token_ids=list(range(vocab)))
    with pytest.raises(InvalidRequestError, match=r"^invalid min_tokens=3: stop_token_ids name "
                                                   "every token id of the vocabulary"):
        llm.generate(["min tokens"], every_id)  # it ended after one stop token, early


def test_stop_reason_names_the_stop_string_or_stop_token_that_ended_a_sample(llm):
    """vLLM's CompletionOutput.stop_reason: which stop ended the sample; None for an EOS or
    any other end."""
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = llm.generate(["stop reasons"], SamplingParams(**greedy))[0].outputs[0]
    assert (full.finish_reason, full.stop_reason) == ("length", None)
    stop = full.text[3:5]
    by_text = llm.generate(["stop reasons"], SamplingParams(
        **greedy, stop=["\x00" * 3, stop]))[0].outputs[0]
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", stop)
    token = full.token_ids[4]
    by_token = llm.generate(["stop reasons"], SamplingParams(
        **greedy, stop_token_ids=[token]))[0].outputs[0]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", token)
    eos = llm.engine.tokenizer.eos_token_id  # also a stop token: the EOS decides, as in vLLM
    by_eos = llm.generate(["stop reasons"], SamplingParams(
        max_tokens=3, temperature=0.0, logit_bias={eos: 100}, stop_token_ids=[eos]))[0].outputs[0]
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None)


def test_include_stop_str_in_output_keeps_the_stop_string_streamed_too(llm):
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = llm.generate(["stop strings"], SamplingParams(**greedy))[0].outputs[0].text
    stop = full[3:5]
    cut = full[:full.index(stop)]
    pieces = []
    kept = llm.generate(["stop strings"],
                        SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=True),
                        on_output=lambda i, delta: pieces.append(delta.text))[0].outputs[0]
    assert kept.text == "".join(pieces) == cut + stop and kept.finish_reason == "stop"
    dropped = llm.generate(["stop strings"], SamplingParams(**greedy, stop=[stop]))
    assert dropped[0].outputs[0].text == cut


def test_truncate_prompt_tokens_keeps_the_prompts_tail(llm):
    greedy = dict(max_tokens=5, temperature=0.0, ignore_eos=True)
    long = [10 + i % 240 for i in range(3000)]  # longer than the 2048-token context
    cut = llm.generate([long], SamplingParams(**greedy, truncate_prompt_tokens=7))[0]
    tail = llm.generate([long[-7:]], SamplingParams(**greedy))[0]
    assert cut.num_prompt_tokens == 7
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens=0"):
        SamplingParams(truncate_prompt_tokens=0)


def test_skip_special_tokens_false_keeps_them_in_the_text(llm):
    eos = dict(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={257: 100})
    skipped = llm.generate(["x"], SamplingParams(**eos))[0].outputs[0]
    kept = llm.generate(["x"], SamplingParams(**eos, skip_special_tokens=False))[0].outputs[0]
    assert skipped.token_ids == kept.token_ids == [257] * 3
    assert skipped.text == "" and kept.text == llm.tokenizer.decode(
        [257] * 3, skip_special_tokens=False) == "</s>" * 3


@pytest.mark.parametrize("include", [False, True])
def test_the_eos_that_ends_a_sample_is_in_its_text_only_with_include_stop_str(llm, include):
    """vLLM's rule, whatever skip_special_tokens says: the EOS that ends a sample stays out of
    its text unless include_stop_str_in_output; kept in, it shows only if specials are kept."""
    params = dict(max_tokens=3, temperature=0.0, logit_bias={257: 100},
                  include_stop_str_in_output=include)
    for skip, text in ((True, ""), (False, "</s>" if include else "")):
        out = llm.generate(["x"], SamplingParams(**params, skip_special_tokens=skip))[0].outputs[0]
        assert (out.token_ids, out.text, out.finish_reason) == ([257], text, "stop")


def test_a_closed_llm_refuses_to_generate_and_keeps_its_tokenizer():
    llm = LLM("tiny", block_size=16, kv_cache_gib=0.01)
    llm.close()
    assert "engine" not in vars(llm)  # its model and KV cache are freed
    with pytest.raises(RuntimeError, match="this LLM is closed"):
        llm.generate("after close")
    assert llm.tokenizer.decode(llm.tokenizer.encode("still here")) == "still here"


def test_a_priority_that_is_not_an_integer_is_refused_and_the_engine_goes_on():
    """It reached the priority queue, whose comparison failed mid-step, and every later call
    then raised a KeyError."""
    llm = LLM("tiny", policy="priority", kv_cache_gib=0.01)
    params = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(InvalidRequestError,
                       match=r"job 0: invalid priority=None: must be an integer"):
        llm.generate(["a", "b"], params, priorities=[None, 1])
    assert len(llm.generate("c", params)[0].outputs[0].token_ids) == 3


def test_numpy_priorities_order_the_jobs_as_ints_do():
    """They were refused ("must be an integer"), though numpy token ids are taken."""
    llm = LLM("tiny", policy="priority", max_num_seqs=1, kv_cache_gib=0.01)
    jobs = llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2, temperature=0),
                        priorities=np.array([5, -1, 3]))
    assert sorted("abc", key=lambda p: jobs["abc".index(p)].metrics.first_token_time) == \
        ["b", "c", "a"]


def test_a_priority_under_fcfs_is_refused_not_ignored(llm):
    """fcfs ran such a job in arrival order as if it had none (vLLM refuses it too)."""
    with pytest.raises(InvalidRequestError, match=r"job 1: invalid priority=3: the scheduling "
                                                  r"policy is fcfs, which ignores priorities"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=2), priorities=[0, 3])
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("prompt", ["caf\udce9", "\ud83d cut"])
def test_a_prompt_that_is_not_unicode_text_is_refused(llm, prompt):
    """A command line's non-UTF-8 bytes, or a JSON escape of half a pair: the tokenizer failed
    with a TypeError traceback."""
    with pytest.raises(InvalidRequestError, match="not valid Unicode: a lone surrogate"):
        llm.generate(prompt)
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": prompt}])


def test_chat_joins_openai_content_parts_instead_of_sending_their_repr(llm):
    params = SamplingParams(max_tokens=4, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"},
                                          {"type": "text", "text": "i"}]}]
    plain = [{"role": "user", "content": "hi"}]
    assert tokens(llm.chat(parts, params)) == tokens(llm.chat(plain, params))
    assert llm.chat(parts, params)[0].num_prompt_tokens == llm.chat(plain, params)[0] \
        .num_prompt_tokens
    with pytest.raises(InvalidRequestError, match="content parts must be text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    # OpenAI's "developer" is the templates' "system", as over HTTP
    system = [{"role": "system", "content": "be brief"}, *plain]
    developer = [{"role": "developer", "content": "be brief"}, *plain]
    assert tokens(llm.chat(developer, params)) == tokens(llm.chat(system, params))


class _CountingList(list):
    """Token ids that count the entries their slices copy."""

    copied = 0

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(index, slice):
            self.copied += len(item)
        return item


def test_a_stream_step_reads_only_the_new_tokens_however_long_the_output(llm):
    """Each step's absorb and emit copied the whole output so far: a sample's steps cost its
    length, and a 40,000-token generation spent seconds in its stream alone."""
    from scheduler.request import Request
    from worker.streams import SampleStream

    prompt = llm.tokenizer.encode("The cluster")
    req = Request("long", prompt, SamplingParams(max_tokens=100_000),
                  token_ids=_CountingList(prompt + [ord("a")] * 20_000))
    stream = SampleStream(req, "long", 0, llm.tokenizer)
    stream.absorb()
    stream.emit()
    req.token_ids.copied = 0
    for _ in range(100):
        req.append_token(ord("b"))
        stream.absorb()
        assert stream.emit().new_token_ids == [ord("b")]
    copied = req.token_ids.copied
    assert copied <= 100 * 4  # a few per step, not 20,000


def test_a_fork_that_recomputes_does_not_score_the_prompt_again():
    """One running sequence at most: sample 1 of an n = 2 job cannot join its parent's blocks and
    recomputes its prompt; as a fork that joins, it must leave the prompt's scores to sample 0
    and take the prefix cache's hits (scoring needs every position's logits, so no hits)."""
    prompt = list(range(40, 88))
    narrow = LLM("tiny", block_size=16, max_num_seqs=1)
    params = SamplingParams(max_tokens=3, temperature=0, n=2, prompt_logprobs=1)
    engine = narrow.engine
    engine.add_request(prompt, params, request_id="job")
    scored_by = set()
    while engine.has_unfinished():
        scored_by.update(o.index for o in engine.step() if o.prompt_logprobs is not None)
    assert scored_by == {0}
    stats = engine.stats()
    assert stats.prefix_hit_tokens == 48  # sample 1 (49 tokens) reused its 3 full blocks
    assert stats.prompt_tokens == len(prompt)  # so the prompt was computed once

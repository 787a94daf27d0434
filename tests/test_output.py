"""The msgpack forms: engine outputs as workers report them to the scheduler, and a finished
job as the journal keeps it."""
import time

import msgpack

from cluster.client import _job_output
from cluster.llm import LLM
from scheduler.jobs import JobState
from scheduler.sampling_params import SamplingParams
from scheduler.service import job_summary
from worker.output import (JobOutput, Logprob, RequestOutput, TokenLogprobs, pack_outputs,
                           unpack_outputs)


def test_step_outputs_survive_the_wire_form():
    """Real engine outputs (logprobs with alternatives, finish reasons, text, emission times)
    come back equal, field for field."""
    engine = LLM("tiny").engine
    engine.add_request("The cluster", SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True))
    engine.add_request("KV", SamplingParams(max_tokens=3, temperature=0.8, seed=3, n=2))
    engine.add_request("stop", SamplingParams(max_tokens=2, logit_bias={66: 100},
                                              stop_token_ids=[66]))
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    outputs = [out for step in steps for out in step]
    assert any(o.logprobs for o in outputs) and any(o.finish_reason for o in outputs)
    assert any(o.logprobs is None for o in outputs) and any(o.stop_reason == 66 for o in outputs)
    assert all(len(lp.decoded) == 3 for o in outputs for lp in o.logprobs or ())  # token, top 2
    for step in steps:
        assert unpack_outputs(pack_outputs(step)) == step
    assert unpack_outputs(pack_outputs([])) == []


def test_a_finished_job_survives_the_journal_form():
    """What the journal keeps of a finished job (msgpack, as written) gives back an equal job:
    tokens, text and its offsets, logprobs, prompt logprobs, finish reasons and times."""
    engine = LLM("tiny").engine
    params = SamplingParams(max_tokens=6, logprobs=2, prompt_logprobs=1, temperature=0.7,
                            seed=5, n=2, stop=["a"], logit_bias={ord("a"): 100}, min_tokens=3)
    prompt = engine.tokenizer.encode("The cluster")
    job = JobState("job", prompt, params)
    for index in range(2):
        engine.add_request(prompt, job.sample_params(index), request_id=f"job/{index}/0")
    while engine.has_unfinished():
        for out in engine.step():
            assert job.apply(int(out.request_id.split("/")[1]), 0, out)
    assert job.finished and job.samples[0].prompt_logprobs and job.samples[1].logprobs
    assert "a" in [s.stop_reason for s in job.samples]
    record = msgpack.unpackb(msgpack.packb(job.to_record()), strict_map_key=False)
    restored = JobState.from_record("job", record)
    assert job_summary(restored) == job_summary(job)
    kept = ("token_ids", "text", "text_offsets", "logprobs", "prompt_logprobs", "finish_reason",
            "stop_reason", "worker_id", "emitted_at")
    for got, sample in zip(restored.samples, job.samples, strict=True):
        assert [getattr(got, f) for f in kept] == [getattr(sample, f) for f in kept]
    assert [(d.new_token_ids, d.text) for d in restored.deltas_since([2, 0])] == [
        (d.new_token_ids, d.text) for d in job.deltas_since([2, 0])]


def test_a_journal_record_written_before_stop_reason_was_kept_still_reads():
    job = JobState("old", [1, 2], SamplingParams(max_tokens=1))
    assert job.apply(0, 0, RequestOutput("old", 0, [7], "x", 2, "length"))
    record = job.to_record()
    record["samples"] = [sample[:9] for sample in record["samples"]]  # an older scheduler's
    restored = JobState.from_record("old", record)
    assert restored.samples[0].stop_reason is None and restored.samples[0].token_ids == [7]


def test_logprobs_in_a_journal_record_written_before_ranks_were_kept_still_read():
    job = JobState("old", [1, 2], SamplingParams(max_tokens=1, logprobs=1))
    scored = TokenLogprobs(7, -0.5, [(7, -0.5)], rank=1)
    assert job.apply(0, 0, RequestOutput("old", 0, [7], "x", 2, "length", [scored]))
    record = job.to_record()
    sample = list(record["samples"][0])
    sample[4] = [entry[:3] for entry in sample[4]]  # an older scheduler's (id, logprob, top)
    record["samples"] = [sample]
    restored = JobState.from_record("old", record).samples[0].logprobs
    assert restored == [TokenLogprobs(7, -0.5, [(7, -0.5)])] and restored[0][7].rank == 1


def test_a_jobs_logprobs_grow_in_place_and_are_not_the_deltas_own_list():
    """Each delta's logprobs were added by copying every earlier one: quadratic in the output
    (40,000 tokens took 8 s in LLM.generate)."""
    job = JobOutput.start("job", 1, 0.0)
    first = RequestOutput("job", 0, [7], "x", 2, logprobs=[TokenLogprobs(7, -0.5, [])])
    job.add(first, 0.0)
    kept = job.outputs[0].logprobs
    assert kept == first.logprobs and kept is not first.logprobs
    job.add(RequestOutput("job", 0, [8], "y", 2, logprobs=[TokenLogprobs(8, -1.0, [])]), 0.0)
    assert job.outputs[0].logprobs is kept and [lp.token_id for lp in kept] == [7, 8]


def test_a_positions_logprobs_equal_the_dict_vllm_gives():
    """vLLM hands out each position as a plain dict, and ported code compares it with one: a
    TokenLogprobs equal to that dict compared unequal (the dataclass's == knew only its class)."""
    scored = TokenLogprobs(7, -0.5, [(3, -0.25), (7, -0.5)], rank=2)
    as_dict = {7: Logprob(-0.5, 2), 3: Logprob(-0.25, 1)}
    assert scored == as_dict and as_dict == scored and dict(scored) == as_dict
    assert scored != {7: Logprob(-0.5, 2)} and scored != {**as_dict, 3: Logprob(-0.25, 3)}
    assert scored == TokenLogprobs(7, -0.5, [(3, -0.25), (7, -0.5)], rank=2)
    assert scored != TokenLogprobs(3, -0.25, [(3, -0.25), (7, -0.5)], rank=1)
    assert scored != [7, 3] and scored != None  # noqa: E711


def test_a_jobs_metrics_time_it_on_the_wall_clock_as_vllm_s_and_the_daemons_do():
    """vLLM's RequestOutput.metrics; there was none, and LLM's own times were time.monotonic()
    where the daemon's (and vLLM's) are time.time()."""
    before = time.time()
    job = LLM("tiny").generate("The cluster", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    m = job.metrics
    assert before <= m.arrival_time < m.first_token_time < m.last_token_time
    assert m.last_token_time == m.finished_time <= time.time()  # the last token ended it


def test_the_daemon_keeps_a_jobs_last_token_time_for_its_clients_and_journal():
    job = JobState("j", [1, 2], SamplingParams(max_tokens=2))
    assert job.apply(0, 0, RequestOutput("j", 0, [7], "x", 2))
    first = job.last_token_time
    assert job.apply(0, 0, RequestOutput("j", 0, [8], "y", 2, "length"))
    m = _job_output(job_summary(job)).metrics
    assert m.arrival_time <= m.first_token_time == first <= m.last_token_time <= m.finished_time
    record = job.to_record()
    assert JobState.from_record("j", record).last_token_time == m.last_token_time
    record["times"] = record["times"][:3]  # an older scheduler's
    assert JobState.from_record("j", record).last_token_time is None

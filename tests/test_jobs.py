"""A job's samples as the scheduler tracks them: which sample scores the prompt, and what a
stream sees of each."""
from scheduler.jobs import JobState
from scheduler.sampling_params import SamplingParams
from worker.output import RequestOutput, TokenLogprobs

PROMPT = [5, 6, 7]
SCORES = [TokenLogprobs(6, -1.0, [(6, -1.0)]), TokenLogprobs(7, -2.0, [(7, -2.0)])]


def output(index: int, tokens: list[int], prompt_logprobs=None, finish=None) -> RequestOutput:
    return RequestOutput(f"job/{index}/0", 0, tokens, "x" * len(tokens), len(PROMPT), finish,
                         prompt_logprobs=prompt_logprobs)


def test_only_sample_0_scores_the_prompt_and_every_stream_opens_with_its_scores():
    job = JobState("job", PROMPT, SamplingParams(n=3, prompt_logprobs=1, max_tokens=4,
                                                 seed=3))
    assert [job.sample_params(i).prompt_logprobs for i in range(3)] == [1, None, None]
    assert job.sample_params(1).n == 1 and job.sample_params(1).seed != job.params.seed
    job.apply(1, 0, output(1, [11, 12]))
    assert job.deltas_since([0, 0, 0]) == []  # sample 1's stream waits for the prompt's scores
    job.apply(0, 0, output(0, [21], prompt_logprobs=SCORES))
    deltas = job.deltas_since([0, 0, 0])
    assert [(d.index, d.new_token_ids, d.prompt_logprobs) for d in deltas] == [
        (0, [21], SCORES), (1, [11, 12], SCORES)]
    job.apply(1, 0, output(1, [13]))
    assert [(d.index, d.new_token_ids, d.prompt_logprobs) for d in job.deltas_since([1, 2, 0])
            ] == [(1, [13], None)]  # once per stream
    assert job.samples[1].prompt_logprobs is None  # the scheduler keeps one copy


def test_a_stream_is_not_held_for_scores_that_will_never_come():
    job = JobState("job", PROMPT, SamplingParams(n=2, prompt_logprobs=1, max_tokens=4))
    job.apply(1, 0, output(1, [11]))
    job.apply(0, 0, output(0, [], finish="abort"))
    assert [(d.index, d.new_token_ids) for d in job.deltas_since([0, 0])] == [(0, []), (1, [11])]


def test_without_prompt_logprobs_no_stream_waits():
    job = JobState("job", PROMPT, SamplingParams(n=2, max_tokens=4))
    job.apply(1, 0, output(1, [11]))
    assert [(d.index, d.prompt_logprobs) for d in job.deltas_since([0, 0])] == [(1, None)]


def test_a_stream_resumed_past_where_a_rerun_ended_is_still_told_it_ended():
    # A restarted scheduler runs the job again from its first token; a stream that had seen 5
    # tokens resumes with that cursor. The rerun is aborted (or fails, or stops sooner on a
    # near-tie) at 2: the stream must hear of it, or it ends as if the job had gone on.
    job = JobState("job", PROMPT, SamplingParams(max_tokens=10))
    job.apply(0, 0, output(0, [11, 12]))
    job.finish_sample(job.samples[0], "abort")
    assert [(d.new_token_ids, d.text, d.finish_reason) for d in job.deltas_since([5])] == [
        ([], "", "abort")]
    assert job.deltas_since([3]) == []  # 2 tokens and the finish: seen

"""Job state owned by the scheduler: every sample's tokens and text so far, cursors for streams,
attempt numbers so that a re-routed sample never takes output twice, and a finished job's
record for the journal."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams, params_for_sample
from worker.output import RequestOutput, pack_logprobs, unpack_logprobs

# Tells apart jobs of one id in this process: a client may choose the id of a job that was
# aborted and forgotten while the worker that ran it still has a report of it on the way.
_JOB_SERIALS = itertools.count()


@dataclass(slots=True)
class SampleState:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    text_offsets: list[int] = field(default_factory=lambda: [0])  # len(text) after k tokens
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None  # sample 0's: as its worker scored the prompt, if asked
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    attempt: int = 0  # bumped at each re-route; reports of older attempts are stale
    worker_id: str | None = None
    emitted_at: float | None = None  # when the worker produced the newest token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class JobState:
    """One job. The scheduler routes each sample on its own, as an n = 1 engine request whose id
    is ``job_id/index/serial.attempt`` (see parse_engine_request_id)."""

    job_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # with the seed fixed at acceptance, so a replay repeats the output
    priority: int = 0
    samples: list[SampleState] = field(default_factory=list)
    error: str | None = None
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finish_time: float | None = None
    last_token_time: float | None = None
    serial: int = field(default_factory=lambda: next(_JOB_SERIALS))

    def __post_init__(self) -> None:
        if not self.samples:
            self.samples = [SampleState(i) for i in range(self.params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def progress(self) -> dict:
        """Where the job stands, for `status_of` and the job list (no tokens, no text)."""
        return {"job_id": self.job_id, "finished": self.finished, "error": self.error,
                "num_tokens": [len(s.token_ids) for s in self.samples],
                "workers": [s.worker_id for s in self.samples],
                "finish_reasons": [s.finish_reason for s in self.samples],
                "max_tokens": self.params.max_tokens,
                "num_prompt_tokens": len(self.prompt_token_ids),
                "arrival_time": self.arrival_time, "finish_time": self.finish_time}

    def kept_bytes(self) -> int:
        """Roughly what the job's state takes in the scheduler's memory (CPython objects:
        ~40 bytes a token, ~110 a logprob alternative, ~70 a decoded token text), to bound the
        finished jobs kept."""
        logprobs = [lp for s in self.samples for lp in s.logprobs if lp is not None]
        logprobs += [lp for s in self.samples for lp in s.prompt_logprobs or [] if lp is not None]
        tokens = len(self.prompt_token_ids) + sum(len(s.token_ids) for s in self.samples)
        return (1000 + 40 * tokens + sum(2 * len(s.text) for s in self.samples)
                + sum(120 + 110 * len(lp.top) + 70 * len(lp.decoded or ()) for lp in logprobs))

    def to_record(self) -> dict:
        """The finished job as msgpack-able values, for the journal to keep its result across a
        scheduler restart (:meth:`from_record` is the inverse)."""
        return {"prompt_token_ids": self.prompt_token_ids, "params": self.params.to_dict(),
                "priority": self.priority, "error": self.error,
                "times": [self.arrival_time, self.first_token_time, self.finish_time,
                          self.last_token_time],
                "samples": [[s.index, s.token_ids, s.text, s.text_offsets,
                             pack_logprobs(s.logprobs), pack_logprobs(s.prompt_logprobs),
                             s.finish_reason, s.worker_id, s.emitted_at, s.stop_reason]
                            for s in self.samples]}

    @classmethod
    def from_record(cls, job_id: str, record: dict) -> "JobState":
        """Raises ValueError, TypeError or KeyError for a record it cannot read."""
        samples = [SampleState(index, token_ids, text, text_offsets, unpack_logprobs(logprobs),
                               unpack_logprobs(prompt_logprobs), finish_reason,
                               stop_reason=stop_reason[0] if stop_reason else None,
                               worker_id=worker_id, emitted_at=emitted_at)
                   for index, token_ids, text, text_offsets, logprobs, prompt_logprobs,
                   finish_reason, worker_id, emitted_at, *stop_reason in record["samples"]]
        job = cls(job_id, record["prompt_token_ids"], SamplingParams.from_dict(record["params"]),
                  record["priority"], samples, record["error"])
        job.arrival_time, job.first_token_time, job.finish_time, *last = record["times"]
        job.last_token_time = last[0] if last else None  # not in records of older schedulers
        if not job.finished or len(samples) != job.params.n:
            raise ValueError("not a finished job's record")
        return job

    def engine_request_id(self, sample: SampleState) -> str:
        return f"{self.job_id}/{sample.index}/{self.serial}.{sample.attempt}"

    def sample_params(self, index: int) -> SamplingParams:
        return params_for_sample(self.params, index)

    @property
    def awaits_prompt_logprobs(self) -> bool:
        """The prompt's logprobs are asked for and will still come, with sample 0."""
        first = self.samples[0]
        return (self.params.prompt_logprobs is not None and first.prompt_logprobs is None
                and not first.finished)

    def pending_tokens(self, sample_index: int) -> int:
        """Tokens a worker still has to compute for a sample: its prompt until the first output
        token arrives, plus the outputs still allowed (an estimate: it counts no prefix-cache hits,
        nor a re-routed sample's recompute of its earlier tokens)."""
        sample = self.samples[sample_index]
        if sample.finished:
            return 0
        generated = len(sample.token_ids)
        to_prefill = 0 if generated else len(self.prompt_token_ids)
        return to_prefill + max(0, self.params.max_tokens - generated)

    def apply(self, sample_index: int, attempt: int, out: RequestOutput) -> bool:
        """Take a worker's output for one sample; False (ignored) if it is stale or late."""
        sample = self.samples[sample_index]
        if attempt != sample.attempt or sample.finished:
            return False
        if out.new_token_ids:
            self.last_token_time = time.time()
            if self.first_token_time is None:
                self.first_token_time = self.last_token_time
        sample.token_ids.extend(out.new_token_ids)
        sample.text += out.text
        # text is attributed to the last token of the chunk that produced it
        sample.text_offsets.extend([sample.text_offsets[-1]] * (len(out.new_token_ids) - 1))
        if out.new_token_ids:
            sample.text_offsets.append(len(sample.text))
        else:
            sample.text_offsets[-1] = len(sample.text)
        if out.logprobs:
            sample.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None and sample.prompt_logprobs is None:
            sample.prompt_logprobs = out.prompt_logprobs
        sample.emitted_at = out.emitted_at
        if out.finish_reason is not None:
            sample.stop_reason = out.stop_reason
            self.finish_sample(sample, out.finish_reason)
        return True

    def finish_sample(self, sample: SampleState, reason: str) -> None:
        sample.finish_reason = reason
        if self.finished and self.finish_time is None:
            self.finish_time = time.time()

    def fail(self, message: str) -> None:
        self.error = message
        for sample in self.samples:
            if not sample.finished:
                self.finish_sample(sample, "error")

    def deltas_since(self, cursor: list[int]) -> list[RequestOutput]:
        """What a stream that has seen ``cursor[i]`` tokens of sample i has not seen yet;
        ``cursor[i] == len(tokens) + 1`` means that stream has also seen the sample finish.
        A cursor further on comes from before a scheduler restart, and the sample's rerun
        ended sooner (aborted, failed, or stopped early on a near-tie): its end is news."""
        out = []
        prompt_logprobs = self.samples[0].prompt_logprobs
        for sample, seen in zip(self.samples, cursor):
            new = sample.token_ids[seen:]
            if not new and not (sample.finished and seen != len(sample.token_ids) + 1):
                continue
            if seen == 0 and self.awaits_prompt_logprobs:  # a stream opens with them
                continue
            out.append(RequestOutput(
                request_id=self.job_id, index=sample.index, new_token_ids=new,
                text=sample.text[sample.text_offsets[min(seen, len(sample.token_ids))]:],
                num_prompt_tokens=len(self.prompt_token_ids),
                finish_reason=sample.finish_reason,
                logprobs=sample.logprobs[seen:] if self.params.logprobs is not None else None,
                emitted_at=sample.emitted_at,
                prompt_logprobs=prompt_logprobs if seen == 0 else None,
                stop_reason=sample.stop_reason))
        return out


def parse_engine_request_id(request_id: str) -> tuple[str, int, int, int]:
    """(job id, sample index, job serial, attempt) of JobState.engine_request_id."""
    job_id, index, run = request_id.rsplit("/", 2)
    serial, attempt = run.split(".")
    return job_id, int(index), int(serial), int(attempt)

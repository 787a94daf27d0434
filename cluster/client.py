"""Client: submit jobs to the daemon, stream or wait for their results, from any driver."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from cluster.bringup import connect, find_scheduler
from scheduler.sampling_params import InvalidRequestError, SamplingParams
from scheduler.service import OverloadedError, UnknownJobError
from worker.output import CompletionOutput, JobOutput, RequestOutput

USER_ERRORS = (InvalidRequestError, OverloadedError, UnknownJobError, TimeoutError)
SCHEDULER_GONE = (RayActorError, ActorUnavailableError)


class JobFailedError(RuntimeError):
    """The job was accepted but a worker could not run it (the message says why)."""


class DaemonNotUpError(ConnectionError):
    """The cluster runs, but pagedserve's scheduler is not up on it."""


class Client:
    """Talks to the scheduler actor. Owns nothing but job ids: any driver can pick a job up
    again by its id, and calls ride out a scheduler restart (up to ``timeout_s``)."""

    def __init__(self, address: str = "auto", *, timeout_s: float = 60.0) -> None:
        connect(address)
        self.timeout_s = timeout_s
        self._scheduler = self._lookup()

    def _lookup(self):
        deadline = time.monotonic() + self.timeout_s
        while True:
            scheduler = find_scheduler()
            if scheduler is not None:
                return scheduler
            if time.monotonic() > deadline:
                raise DaemonNotUpError("pagedserve is not up on this cluster; run `pagedserve up`")
            time.sleep(0.5)

    def _call(self, method: str, *args, timeout: float | None = None):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(getattr(self._scheduler, method).remote(*args), timeout=timeout)
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except SCHEDULER_GONE:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # the scheduler is restarting: same name, new actor
                self._scheduler = self._lookup()

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams | dict | None = None, *,
               priority: int = 0, job_id: str | None = None) -> str:
        """Queue a job and return its id. Bad input raises InvalidRequestError; a full queue
        raises OverloadedError."""
        params = _params_dict(params)
        job_id = job_id or uuid.uuid4().hex  # chosen here, so a retried submit is not doubled
        try:
            return self._call("submit", prompt, params, priority, job_id)
        except InvalidRequestError as exc:
            if "already in use" in str(exc) and self._known(job_id):
                return job_id  # an earlier try went through before the scheduler restarted
            raise

    def _known(self, job_id: str) -> bool:
        try:
            self.status_of(job_id)
            return True
        except UnknownJobError:
            return False

    def submit_many(self, prompts: Sequence[str | list[int]],
                    params: SamplingParams | dict | Sequence | None = None, *,
                    progress: bool = False) -> list[str]:
        per_job = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        from tqdm import tqdm

        ids = []
        for prompt, p in tqdm(list(zip(prompts, per_job)), desc="submit", unit="job",
                              disable=not progress):
            ids.append(self.submit(prompt, p))
        return ids

    def stream(self, job_id: str) -> Iterator[RequestOutput]:
        """New output of every sample as it is produced, until the job finishes. Resumes
        where it stopped if the scheduler restarts: no token twice, none missing."""
        cursor: list[int] | None = None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                for ref in self._scheduler.stream.remote(job_id, cursor):
                    for delta in ray.get(ref):
                        cursor = _advance(cursor, delta)
                        yield delta
                return
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except SCHEDULER_GONE:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                self._scheduler = self._lookup()

    def result(self, job_id: str, timeout: float | None = None) -> JobOutput:
        """Wait for the job and return its whole output; JobFailedError if it failed."""
        summary = self._call("result", job_id, timeout)
        if summary["error"]:
            raise JobFailedError(f"job {job_id} failed: {summary['error']}")
        return _job_output(summary)

    def results(self, job_ids: Sequence[str], *, progress: bool = False,
                timeout: float | None = None) -> list[JobOutput]:
        from tqdm import tqdm

        return [self.result(j, timeout) for j in tqdm(job_ids, desc="jobs", unit="job",
                                                       disable=not progress)]

    def abort(self, job_id: str) -> bool:
        return self._call("abort", job_id)

    def status(self) -> dict:
        return self._call("status")

    def status_of(self, job_id: str) -> dict:
        return self._call("job_status", job_id)


def _params_dict(params) -> dict:
    if params is None:
        return {}
    if isinstance(params, SamplingParams):
        return params.to_dict()
    return SamplingParams.from_dict(dict(params)).to_dict()  # validate before sending


def _advance(cursor: list[int] | None, delta: RequestOutput) -> list[int]:
    """Track tokens seen per sample exactly as the scheduler's JobState.deltas_since counts."""
    cursor = cursor or []
    while len(cursor) <= delta.index:
        cursor.append(0)
    cursor[delta.index] += len(delta.new_token_ids)
    if delta.finish_reason is not None:
        cursor[delta.index] += 1
    return cursor


def _unwrap(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, USER_ERRORS) else exc


def _job_output(summary: dict) -> JobOutput:
    outputs = [CompletionOutput(o["index"], o["token_ids"], o["text"], o["finish_reason"],
                                o["logprobs"]) for o in summary["outputs"]]
    return JobOutput(summary["job_id"], outputs, summary["arrival_time"],
                     summary["num_prompt_tokens"], summary["first_token_time"],
                     summary["finish_time"])

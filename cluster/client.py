"""Client: submit jobs to the daemon, stream or wait for their results, from any driver."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from cluster.batch_submit import BatchSubmitter, PacedSubmit
from cluster.bringup import connect, find_scheduler
from cluster.caller_token import CallerToken
from cluster.liveness import Liveness
from cluster.scheduler_lookup import SharedLookup
from cluster.stream_cancel import read_or_cancelled
from scheduler.sampling_params import InvalidRequestError, SamplingParams, in_batch
from scheduler.service import (NAMESPACE, OverloadedError, UnknownJobError, answers_stats,
                               worker_actor_name)
from scheduler.wording import counted
from worker.output import (CompletionOutput, JobOutput, RequestOutput,
                           with_unscored_first)

USER_ERRORS = (InvalidRequestError, OverloadedError, UnknownJobError, TimeoutError)
SCHEDULER_GONE = (RayActorError, ActorUnavailableError)
RETRY_DELAY_S = 0.5
WAITING_METHODS = frozenset({"result", "results"})  # they wait for jobs, as long as asked
SUBMIT_BATCH = 256  # jobs per scheduler call in submit_many: one round trip and one fsync each
IN_FLIGHT_WAIT_S = 2.0  # how long an abort waits for an unanswered submit to arrive
IN_FLIGHT_RETRY_S = 0.1
RESULTS_BATCH = 256  # job ids per scheduler call in iter_results
FEED_INTERVAL_S = 0.5  # how often a reader waiting on a paced submit's job sends more jobs
# asyncio callers wait out an outage here, not in the loop's default executor, which an
# HTTP server's other work (tokenizing) shares
_RECONNECTS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pagedserve-reconnect")


class JobFailedError(RuntimeError):
    """The job was accepted but a worker could not run it (the message says why)."""


class DaemonUnavailableError(ConnectionError):
    """pagedserve's scheduler cannot be reached: not up, gone too long, or not answering."""


class DaemonNotUpError(DaemonUnavailableError):
    """The cluster runs, but pagedserve's scheduler is not up on it."""


class ClientDisconnectedError(RuntimeError):
    """The Ray connection a Client was made on has been shut down: a new Client is needed."""


class Client:
    """Talks to the scheduler actor. Owns nothing but job ids: any driver can pick a job up
    again by its id, and calls ride out a scheduler restart (up to ``timeout_s``).
    ``find_timeout_s``: how long the constructor waits for a scheduler that is not there
    (default ``timeout_s``; a command line wants to hear at once that the daemon is not up).
    ``down_wait_s``: how long calls wait for an `up` once they find the daemon down (its
    scheduler gone, not restarting), counted from the start of that outage (default
    ``timeout_s``; an HTTP server answers 503 at once instead)."""

    def __init__(self, address: str = "auto", *, timeout_s: float = 60.0,
                 find_timeout_s: float | None = None,
                 down_wait_s: float | None = None) -> None:
        connect(address)
        self._connection = _connection_id()  # the scheduler's handle belongs to this one
        self.timeout_s = timeout_s
        self.down_wait_s = down_wait_s
        # since when calls have not found the scheduler at all (the daemon is down), until one
        # does: a call meeting that outage later waits only what is left of down_wait_s
        self._gone_since: float | None = None
        # one lookup for the calls that look at once (a burst of 500 HTTP requests in an
        # outage made 2,000); find_scheduler is read when called, so that tests can count them
        self._find = SharedLookup(lambda: find_scheduler(), RETRY_DELAY_S)
        self._scheduler = self._lookup(timeout_s if find_timeout_s is None else find_timeout_s)
        # lent to the calls that wait on jobs (and to submits that leave jobs in this process's
        # care): Ray fails it when the process dies (a SIGKILL cancels nothing), and the
        # scheduler then ends those calls, which would hold their max_waiting_calls slots until
        # their jobs end
        self._caller = CallerToken()
        self.cluster_gone: DaemonUnavailableError | None = None  # see mark_cluster_gone
        self._liveness = Liveness(lambda: self._scheduler, lambda: self.timeout_s,
                                  lambda: self.cluster_gone)

    def mark_cluster_gone(self, reason: str) -> None:
        """The Ray cluster is gone (its GCS stopped answering: `ray stop`): calls waiting now
        or later end with DaemonUnavailableError at once, not after timeout_s, and none waits
        for it to come back (Ray's own driver gives up on a lost GCS after a minute)."""
        self.cluster_gone = DaemonUnavailableError(f"the Ray cluster is gone ({reason})")

    def _lookup(self, timeout: float | None = None):
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        while True:
            self._check_connected()  # a wait for `up` that outlives the connection ends
            scheduler = self._find()
            if scheduler is not None:
                return scheduler
            if time.monotonic() > deadline:
                raise DaemonNotUpError("pagedserve is not up on this cluster; run `pagedserve up`")
            time.sleep(0.5)

    def _call(self, method: str, *args):
        return self._call_noting_retry(method, *args)[0]

    def _call_noting_retry(self, method: str, *args) -> tuple:
        """The call's answer, and whether an earlier try was lost to a scheduler restart (that
        try may have done its work before the scheduler went)."""
        lost_at, retried = None, False
        with self._lent(method in WAITING_METHODS) as caller:
            while True:
                if lost_at is None:  # since when it has not answered
                    asked_at = time.monotonic()
                try:
                    ref = self._remote(method, args, retried, caller)
                    if method in WAITING_METHODS:
                        self._liveness.block(ref, self._silent(method))
                    return ray.get(ref, timeout=self._answer_timeout(method)), retried
                except (RayTaskError, *SCHEDULER_GONE) as exc:  # before TimeoutError: a job's
                    lost_at = self._call_lost_since(method, exc, lost_at, retried, asked_at)
                except GetTimeoutError:
                    raise self._not_answering(method) from None
                lost_at, retried = self._reconnect(lost_at), True

    async def _acall(self, method: str, *args):
        return (await self._acall_noting_retry(method, *args))[0]

    async def _acall_noting_retry(self, method: str, *args) -> tuple:
        lost_at, retried = None, False
        with self._lent(method in WAITING_METHODS) as caller:
            while True:
                if lost_at is None:  # since when it has not answered
                    asked_at = time.monotonic()
                try:
                    ref = self._remote(method, args, retried, caller)
                    if method in WAITING_METHODS:
                        return await self._liveness.wait(ref, self._silent(method)), retried
                    return await self._liveness.wait(ref, timeout=self.timeout_s), retried
                except (RayTaskError, *SCHEDULER_GONE) as exc:  # see _call
                    lost_at = self._call_lost_since(method, exc, lost_at, retried, asked_at)
                except asyncio.TimeoutError:
                    raise self._not_answering(method) from None
                lost_at, retried = await self._areconnect(lost_at), True

    def _lent(self, needed: bool):
        """``with`` it around calls: ``[token]`` (see ``_caller``) for calls that need one,
        else None."""
        self._check_connected()
        return self._caller.lent() if needed else contextlib.nullcontext()

    def _check_connected(self) -> None:
        """A Client whose Ray connection was shut down raises here: its handles belong to that
        connection, and a Ray call would start a new local cluster (with no NPUs) for it."""
        if not ray.is_initialized() or _connection_id() != self._connection:
            raise ClientDisconnectedError(
                "this Client was made on a Ray connection that has since been shut down "
                "(ray.shutdown()); create a new Client")

    def _remote(self, method: str, args: tuple, retried: bool, caller: list | None):
        """Send the call. A wait on jobs names its ``caller``, and sent again after a
        scheduler restart is marked ``resumed``: the new scheduler lets it past
        max_waiting_calls, where new calls may already have taken every slot
        (RESUMED_CALLS_FACTOR)."""
        call = getattr(self._scheduler, method)
        if caller is not None:
            return call.remote(*args, resumed=retried, caller=caller)
        return call.remote(*args)

    def _reconnect(self, lost_at: float) -> float | None:
        """After a failed call: find the scheduler again; None (the outage is over) once it
        answers, so that a long wait outlives more than one restart, each given timeout_s."""
        time.sleep(RETRY_DELAY_S)  # the scheduler is restarting: same name, new actor
        return self._find_again(lost_at)

    async def _areconnect(self, lost_at: float) -> float | None:
        if not self._down_wait_over(lost_at):  # a known outage past it needs no grace period
            await asyncio.sleep(RETRY_DELAY_S)  # not in a pool thread: they are few
        # a reconnect can hang on a lost cluster for a minute: the wait ends once it is gone
        return await self._liveness.wait(asyncio.get_running_loop().run_in_executor(
            _RECONNECTS, self._find_again, lost_at))

    def _find_again(self, lost_at: float) -> float | None:
        if self.cluster_gone is not None:
            raise self.cluster_gone
        self._check_connected()
        scheduler = self._find()
        if scheduler is None:  # not restarting but gone (`down`): no call waits it out twice
            gone_since = self._gone_since
            if gone_since is None:
                gone_since = self._gone_since = lost_at
            scheduler = self._lookup(self._down_wait_left(lost_at, gone_since))
        self._gone_since = None
        self._scheduler = scheduler
        while True:  # until it answers, so that the call goes on with this outage over
            self._check_connected()
            try:
                ray.get(self._scheduler.ping.remote(), timeout=RETRY_DELAY_S * 4)
                self._liveness.answered()
                return None
            except (*SCHEDULER_GONE, GetTimeoutError):
                if time.monotonic() - lost_at > self.timeout_s:
                    return lost_at  # the call's next try tells whether it came back
                time.sleep(RETRY_DELAY_S)

    def _down_wait_left(self, lost_at: float, gone_since: float) -> float:
        """How long a call lost at ``lost_at`` may still wait for an `up` in an outage found
        at ``gone_since``: calls made later in it count from its start."""
        down_wait_s = self.timeout_s if self.down_wait_s is None else self.down_wait_s
        return max(0.0, min(lost_at, gone_since) + down_wait_s - time.monotonic())

    def _down_wait_over(self, lost_at: float) -> bool:
        """Whether a lookup found the daemon down and calls have waited for an `up` as long
        as they may: the next lookup (shared) tells at once whether it is back."""
        gone_since = self._gone_since  # read once: a pool thread may clear it meanwhile
        return gone_since is not None and self._down_wait_left(lost_at, gone_since) == 0.0

    def _answer_timeout(self, method: str) -> float | None:
        """How long a call may go unanswered: calls that wait for jobs have their own timeout;
        the others answer at once, unless the scheduler is stuck (or stopped)."""
        return None if method in WAITING_METHODS else self.timeout_s

    def _not_answering(self, method: str,
                       error: BaseException | None = None) -> DaemonUnavailableError:
        """``error``: what Ray raised instead of an answer, when it did (then the scheduler
        may be gone, too)."""
        raised = "" if error is None else f" ({type(error).__name__})"
        or_gone = "" if error is None else ", or gone"
        return DaemonUnavailableError(
            f"the pagedserve scheduler did not answer {method} within {self.timeout_s:g} "
            f"s{raised}: it is stuck or stopped{or_gone} (`pagedserve status` and `ray status` "
            "show more)")

    def _silent(self, method: str) -> Callable[[], DaemonUnavailableError]:
        """The error for a call that waits for jobs (no answer timeout of its own) once the
        scheduler has answered nothing for timeout_s: stuck or stopped, it would never end."""
        return lambda: DaemonUnavailableError(
            f"the pagedserve scheduler has not answered for {self.timeout_s:g} s while "
            f"{method} waited: it is stuck or stopped (`pagedserve status` and `ray status` "
            "show more)")

    def _call_lost_since(self, method: str, exc: BaseException, lost_at: float | None,
                         retried: bool, asked_at: float) -> float:
        """``_lost_since`` for a call (``asked_at``: when it was first asked since the scheduler
        last answered), except that one that does not wait for jobs counts the outage from
        then: a process not yet connected to a stopped scheduler hears ActorUnavailableError
        from Ray only after ~20 s of trying, and waited timeout_s more on top of that."""
        if method in WAITING_METHODS or isinstance(exc, RayTaskError):
            return self._lost_since(exc, lost_at, retried)
        if time.monotonic() - asked_at > self.timeout_s:
            raise self._not_answering(method, exc) from None
        return asked_at

    def _lost_since(self, exc: BaseException, lost_at: float | None,
                    retried: bool = False) -> float:
        """Raise the user's error for a failed call (marked ``after_retry`` when an earlier try
        was lost to a restart); else the scheduler is gone: return since when, so the caller
        retries, until it has been gone for ``timeout_s``."""
        if isinstance(exc, RayTaskError):
            error = _unwrap(exc)
            error.after_retry = retried
            raise error from None
        now = time.monotonic()
        if lost_at is not None and now - lost_at > self.timeout_s:
            raise DaemonUnavailableError(
                f"the pagedserve scheduler has been gone for {self.timeout_s:g} s and did not "
                f"come back ({type(exc).__name__}); `pagedserve status` shows the daemon's state"
            ) from exc
        return now if lost_at is None else lost_at

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams | dict | None = None, *,
               priority: int = 0, job_id: str | None = None) -> str:
        """Queue a job and return its id. Bad input raises InvalidRequestError; a full queue
        raises OverloadedError."""
        return self._submit(_submit_args(prompt, params, priority, job_id), job_id is None)

    def _submit(self, args: tuple, fresh_id: bool) -> str:
        try:
            return self._call("submit", *args)
        except InvalidRequestError as exc:
            if _our_earlier_try(exc, fresh_id) and self._known(args[-1]):
                return args[-1]
            raise

    async def asubmit(self, prompt: str | list[int], params: SamplingParams | dict | None = None,
                      *, priority: int = 0, job_id: str | None = None) -> str:
        """``submit`` for asyncio code."""
        return await self._asubmit(_submit_args(prompt, params, priority, job_id), job_id is None)

    async def _asubmit(self, args: tuple, fresh_id: bool, owner: list | None = None) -> str:
        try:
            return await self._acall("submit", *args, owner)
        except InvalidRequestError as exc:
            if _our_earlier_try(exc, fresh_id) and await self._aknown(args[-1]):
                return args[-1]
            raise

    def _known(self, job_id: str) -> bool:
        try:
            self.status_of(job_id)
            return True
        except UnknownJobError:
            return False

    async def _aknown(self, job_id: str) -> bool:
        try:
            await self.astatus_of(job_id)
            return True
        except UnknownJobError:
            return False

    def submit_many(self, prompts: Sequence[str | list[int]],
                    params: SamplingParams | dict | Sequence | None = None, *,
                    priorities: Sequence[int] | None = None, progress: bool = False,
                    batch_size: int | None = None, wait_for_room: bool = False,
                    on_wait: Callable[[dict], None] | None = None) -> list[str]:
        """Queue many jobs, ``batch_size`` per scheduler call (fewer of n > 1: at most that many
        samples), and return their ids in order.
        ``params`` is one for all or one per prompt; every job's params are checked before any
        is sent, and with more than one batch the scheduler checks every job before any is
        sent too. Each batch is accepted whole or not at all: on a bad job or a full queue the
        error says which job. Any exception (an interrupt too) carries the ids of the batches
        already accepted as ``submitted``, and as ``in_flight`` those of a batch sent but not
        answered (an interrupt while the scheduler accepts it), which the scheduler may or may
        not have accepted. A batch larger than the scheduler's ``max_queued_jobs`` is refused
        (BatchTooLargeError). ``wait_for_room``: when the queue is full, wait until jobs finish
        and go on in batches that fit, so any number of jobs can be sent (still an
        OverloadedError if no worker is serving, as the queue would never drain; ``on_wait``
        hears of a long wait, see BatchSubmitter). To read the results of more jobs than the
        scheduler keeps finished, use ``submit_paced``."""
        from tqdm import tqdm

        submitter = self._submitter(prompts, params, priorities, batch_size, on_wait)
        try:
            with tqdm(total=len(prompts), desc="submit", unit="job", disable=not progress) as bar:
                while not submitter.done:
                    submitter.send_batch(wait_for_room)
                    bar.update(len(submitter.submitted) - bar.n)
        except BaseException as exc:  # also an interrupt: the caller may withdraw these
            exc.submitted = submitter.submitted
            exc.in_flight = submitter.in_flight
            if isinstance(exc, OverloadedError) and submitter.submitted:
                raise _said_accepted(exc) from None  # it read as if nothing was accepted
            raise
        return submitter.submitted

    def submit_paced(self, prompts: Sequence[str | list[int]],
                     params: SamplingParams | dict | Sequence | None = None, *,
                     priorities: Sequence[int] | None = None,
                     on_wait: Callable[[dict], None] | None = None) -> PacedSubmit:
        """Queue a batch of any size as it is read: iterating the returned PacedSubmit yields
        the job ids in input order, submitting (waiting for room) a bounded number of jobs
        ahead of the one handed out, so that none finishes and is forgotten before the caller
        reads it. The scheduler holds their results for this process until read, whatever
        other clients do (they do not count toward its max_finished_jobs meanwhile). Its
        ``submitted`` and ``in_flight`` are what to withdraw if the caller stops. Params are
        checked, and ``on_wait`` called, as in ``submit_many``."""
        status = self.status()
        batch_size = min(SUBMIT_BATCH, status["max_queued_jobs"])  # a bigger one never fits
        submitter = self._submitter(prompts, params, priorities, batch_size, on_wait, hold=True)
        return PacedSubmit(submitter, status["max_finished_jobs"])

    def _submitter(self, prompts, params, priorities, batch_size, on_wait=None, hold=False
                   ) -> BatchSubmitter:
        per_job = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        priorities = [0] * len(prompts) if priorities is None else list(priorities)
        if not len(per_job) == len(priorities) == len(prompts):
            raise InvalidRequestError(
                f"got {counted(len(prompts), 'prompt')}, {len(per_job)} SamplingParams and "
                f"{counted(len(priorities), 'priority', 'priorities')}: give one of each per "
                "prompt")
        specs = [_batch_args(prompts, per_job, priorities, i) for i in range(len(prompts))]
        batch_size = SUBMIT_BATCH if batch_size is None else batch_size
        submitter = BatchSubmitter(self, specs, batch_size, on_wait, hold)
        if len(specs) > batch_size:  # one batch is refused whole anyway
            submitter.check_all()
        return submitter

    async def asubmit_many(self, prompts: Sequence[str | list[int]],
                           params: SamplingParams | dict | None = None, *,
                           priority: int = 0, tied: bool = False) -> list[str]:
        """Queue every prompt with the same params in one scheduler call, for asyncio code:
        all are accepted or none (a bad one raises, naming its index as ``job_index``). A
        DaemonUnavailableError carries the ids sent as ``in_flight``: the scheduler may have
        taken them (before it went, or once it answers again). ``tied``: the jobs are aborted
        once this process is gone (an HTTP server's requests, which nobody else reads); after
        a scheduler restart, such a job waits until this process waits on it again
        (``stream``, ``result``), and is aborted if it has not within
        scheduler.tied_job_claim_s."""
        same = [params] * len(prompts)
        specs = [_batch_args(prompts, same, [priority] * len(prompts), i)
                 for i in range(len(prompts))]
        try:
            with self._lent(tied) as owner:
                try:
                    return await self._acall("submit_many", specs, 0, None, owner)
                except InvalidRequestError as exc:
                    if not _id_in_use(exc):
                        raise
                # see _submit_batch
                return [await self._asubmit(spec, fresh_id=True, owner=owner) for spec in specs]
        except DaemonUnavailableError as exc:
            exc.in_flight = [spec[-1] for spec in specs]
            raise

    def _submit_batch(self, specs: list[tuple], first_index: int, hold: bool = False
                      ) -> list[str]:
        """``hold``: the scheduler keeps the jobs' results for this process until it reads
        them (see submit_paced)."""
        try:
            with self._lent(hold) as holder:
                return self._call("submit_many", specs, first_index, holder)
        except InvalidRequestError as exc:
            if not _id_in_use(exc):
                raise
        # An earlier try went through before the scheduler restarted (our ids are fresh uuids):
        # submit one by one, which tells apart the jobs already accepted.
        return [self._submit(spec, fresh_id=True) for spec in specs]

    def stream(self, job_id: str) -> Iterator[RequestOutput]:
        """New output of every sample as it is produced, until the job finishes. Resumes
        where it stopped if the scheduler restarts: no token twice, none missing."""
        with self._lent(True) as caller:
            yield from self._stream_as(caller, job_id)

    def _stream_as(self, caller: list, job_id: str) -> Iterator[RequestOutput]:
        cursors: list[list[int] | None] = [None]
        lost_at, resumed = None, False
        while True:
            try:
                stream = self._scheduler.stream.remote([job_id], cursors, resumed, caller)
                with read_or_cancelled(stream) as reading:
                    while True:
                        self._liveness.block(stream, self._silent("stream"))
                        ref = next(stream, None)
                        if ref is None:
                            reading.ended = True
                            return
                        outputs, lost_at = ray.get(ref), None  # it answers: any outage is over
                        for _, delta in outputs:
                            cursors[0] = _advance(cursors[0], delta)
                            yield delta
            except (RayTaskError, *SCHEDULER_GONE) as exc:
                lost_at = self._lost_since(exc, lost_at)
            lost_at, resumed = self._reconnect(lost_at), True

    async def astream(self, job_id: str) -> AsyncIterator[RequestOutput]:
        """``stream`` for asyncio code."""
        async with contextlib.aclosing(await self.aopen_stream([job_id])) as outputs:
            async for _, delta in outputs:
                yield delta

    async def aopen_stream(self, job_ids: list[str]
                           ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """One stream of several jobs' new outputs, as ``(place in job_ids, output)``, until
        all have finished (resuming as ``stream`` does). It is one call to the scheduler,
        one of its ``max_waiting_calls`` however many jobs; this returns once the scheduler
        has taken it, so a refusal (overloaded, unknown job) raises here, before any output."""
        outputs = self._astream_outputs(job_ids)
        await anext(outputs)
        return outputs

    async def _astream_outputs(self, job_ids: list[str]
                               ) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """``None`` once the scheduler has taken the first call, then the outputs."""
        with self._lent(True) as caller:
            async with contextlib.aclosing(self._astream_as(caller, job_ids)) as outputs:
                async for output in outputs:
                    yield output

    async def _astream_as(self, caller: list, job_ids: list[str]
                          ) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        cursors: list[list[int] | None] = [None] * len(job_ids)
        lost_at, opened, resumed = None, False, False
        while True:
            try:
                stream = self._scheduler.stream.remote(job_ids, cursors, resumed, caller)
                with read_or_cancelled(stream) as reading:
                    while True:
                        try:
                            ref = await self._liveness.wait(anext(stream), self._silent("stream"))
                        except StopAsyncIteration:
                            reading.ended = True
                            return
                        outputs, lost_at = await ref, None  # see stream
                        if not opened:
                            opened = True
                            yield None
                        for place, delta in outputs:
                            cursors[place] = _advance(cursors[place], delta)
                            yield place, delta
            except (RayTaskError, *SCHEDULER_GONE) as exc:
                lost_at = self._lost_since(exc, lost_at)
            lost_at, resumed = await self._areconnect(lost_at), True

    def result(self, job_id: str, timeout: float | None = None) -> JobOutput:
        """Wait for the job and return its whole output; JobFailedError if it failed."""
        return _checked_output(self._call("result", job_id, timeout))

    async def aresult(self, job_id: str, timeout: float | None = None) -> JobOutput:
        """``result`` for asyncio code."""
        return _checked_output(await self._acall("result", job_id, timeout))

    def results(self, job_ids: Iterable[str], *, progress: bool = False,
                timeout: float | None = None) -> list[JobOutput]:
        """``result`` of each job, in order; ``job_ids`` may be a PacedSubmit."""
        from tqdm import tqdm

        total = len(job_ids) if hasattr(job_ids, "__len__") else None
        outcomes = tqdm(self.iter_results(job_ids, timeout), total=total, desc="jobs",
                        unit="job", disable=not progress)
        return [_raise_if_failed(outcome) for _, outcome in outcomes]

    async def aresults(self, job_ids: Sequence[str]) -> list[JobOutput]:
        """``results`` for asyncio code: one scheduler call waits at a time, however many
        jobs (JobFailedError for the first failed one, in order)."""
        outputs = []
        for chunk in _slices(list(job_ids), RESULTS_BATCH):
            while chunk:
                summaries = await self._acall("results", chunk)
                outputs += [_checked_output(summary) for summary in summaries]
                chunk = chunk[len(summaries):]
        return outputs

    def iter_results(self, job_ids: Iterable[str], timeout: float | None = None
                     ) -> Iterator[tuple[str, JobOutput | JobFailedError]]:
        """(job id, its output or the JobFailedError saying why it failed) of each job, in
        order, as each is done; the jobs already done come many to a call (``job_ids`` may be
        a PacedSubmit)."""
        paced = job_ids if isinstance(job_ids, PacedSubmit) else None
        chunks = (paced.chunks(RESULTS_BATCH) if paced is not None
                  else _slices(list(job_ids), RESULTS_BATCH))
        for chunk in chunks:
            while chunk:
                summaries = self._results_feeding(chunk, timeout, paced)
                for summary in summaries:
                    yield summary["job_id"], _output_or_error(summary)
                chunk = chunk[len(summaries):]

    def _results_feeding(self, job_ids: list[str], timeout: float | None,
                         paced: PacedSubmit | None) -> list[dict]:
        """The scheduler's ``results``; while it waits on a paced submit's job, the submit
        goes on sending the jobs after it (a long job must not leave the workers idle)."""
        if paced is None:
            return self._call("results", job_ids, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self._call("results", job_ids, FEED_INTERVAL_S if left is None
                                  else min(left, FEED_INTERVAL_S))
            except TimeoutError:
                if left is not None and left <= FEED_INTERVAL_S:
                    raise TimeoutError(f"job {job_ids[0]} has not finished after {timeout} s"
                                       ) from None
            paced.send_ahead()

    def abort(self, job_id: str, *, in_flight: bool = False) -> bool:
        """True if the job was unfinished and is aborted now. After a try lost to a scheduler
        restart, which may have done the abort, True if the job ended aborted at all.
        ``in_flight``: the job's submit went unanswered and may reach the scheduler after the
        abort (Ray does not keep the order of calls to an async actor): an id it does not know
        is tried again for IN_FLIGHT_WAIT_S, then taken as never submitted (False)."""
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while True:
            try:
                aborted, retried = self._call_noting_retry("abort", job_id)
                return aborted or (retried and _aborted(self.status_of(job_id)))
            except UnknownJobError:
                if not _still_arriving(in_flight, deadline):
                    raise
            time.sleep(IN_FLIGHT_RETRY_S)

    async def aabort(self, job_id: str, *, in_flight: bool = False) -> bool:
        """``abort`` for asyncio code."""
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while True:
            try:
                aborted, retried = await self._acall_noting_retry("abort", job_id)
                return aborted or (retried and _aborted(await self.astatus_of(job_id)))
            except UnknownJobError:
                if not _still_arriving(in_flight, deadline):
                    raise
            await asyncio.sleep(IN_FLIGHT_RETRY_S)

    def withdraw(self, job_ids: Sequence[str], in_flight: Sequence[str] = ()) -> int:
        """Abort the jobs of an interrupted ``submit_many`` (its exception's ``submitted`` and
        ``in_flight``); returns how many were still unfinished."""
        aborted = sum(bool(self.abort(job_id)) for job_id in job_ids)
        if not in_flight:
            return aborted
        # one batch, which the scheduler takes whole or not at all: its first id answers for
        # every one (waiting IN_FLIGHT_WAIT_S for each of 250 ids that never arrived took
        # minutes after a Ctrl-C)
        try:
            aborted += bool(self.abort(in_flight[0], in_flight=True))
        except UnknownJobError:  # never arrived: nothing to abort
            return aborted
        for job_id in in_flight[1:]:
            with contextlib.suppress(UnknownJobError):
                aborted += bool(self.abort(job_id))
        return aborted

    def status(self) -> dict:
        return self._call("status")

    async def astatus(self) -> dict:
        return await self._acall("status")

    def logs(self, lines: int = 40, worker_ids: list[str] | None = None) -> list[dict]:
        """The last ``lines`` lines of the scheduler's log, then of each worker's, then of each
        of the workers gone most recently (only those of ``worker_ids`` if given), read on
        their own nodes: ``[{"source" ("scheduler" or a worker id), "node_id", "pid", "file",
        "lines"}]``, a gone worker's with ``gone`` (why) and ``gone_for_s``; one whose log
        could not be read has an ``error`` instead of lines."""
        return self._call("logs", lines, worker_ids)

    def status_of(self, job_id: str) -> dict:
        return self._call("job_status", job_id)

    async def astatus_of(self, job_id: str) -> dict:
        return await self._acall("job_status", job_id)

    def jobs(self, finished_limit: int = 20) -> list[dict]:
        """``status_of`` of every unfinished job, oldest first, then of up to ``finished_limit``
        finished ones, newest first."""
        if not isinstance(finished_limit, int) or finished_limit < 0:
            raise ValueError(f"finished_limit must be an integer >= 0, got {finished_limit!r}")
        return self._call("list_jobs", finished_limit)

    async def alive_workers(self, status: dict, timeout: float = 5.0) -> list[str]:
        """Ids of the ready workers in ``status`` that answer a stats call within ``timeout``."""
        ready = [w["worker_id"] for w in status["workers"] if w.get("ready")]
        answers = await asyncio.gather(*(self._ping_worker(w, timeout) for w in ready))
        return [w for w, ok in zip(ready, answers) if ok]

    @staticmethod
    async def _ping_worker(worker_id: str, timeout: float) -> bool:
        try:
            actor = await asyncio.to_thread(ray.get_actor, worker_actor_name(worker_id),
                                            NAMESPACE)
        except ValueError:  # no such actor (any more)
            return False
        return await answers_stats(actor, timeout)


def _connection_id() -> str:
    """This process's Ray connection: another one after ray.shutdown() and ray.init()."""
    return ray.get_runtime_context().get_worker_id()


def _said_accepted(exc: OverloadedError) -> OverloadedError:
    """``exc`` saying how many jobs of its submit_many were accepted before it."""
    said = type(exc)(f"{exc} ({counted(len(exc.submitted), 'job')} of this call accepted "
                     "before it: withdraw() them, or submit the rest)")
    said.submitted, said.in_flight = exc.submitted, exc.in_flight
    return said


def _submit_args(prompt, params, priority: int, job_id: str | None) -> tuple:
    # The id is chosen here, so a submit retried across a scheduler restart is not doubled.
    return prompt, _params_dict(params), priority, job_id or uuid.uuid4().hex


def _batch_args(prompts, params, priorities, index: int) -> tuple:
    try:
        return _submit_args(prompts[index], params[index], priorities[index], None)
    except InvalidRequestError as exc:
        raise in_batch(exc, index) from None


def _id_in_use(exc: InvalidRequestError) -> bool:
    return "already in use" in str(exc)


def _our_earlier_try(exc: InvalidRequestError, fresh_id: bool) -> bool:
    """Whether a submit refused for its id in use was refused because an earlier try of it
    went through before the scheduler restarted: always so for an id this client made (a fresh
    uuid), only after a lost try for an id the caller chose (it may be another job's)."""
    return _id_in_use(exc) and (fresh_id or getattr(exc, "after_retry", False))


def _checked_output(summary: dict) -> JobOutput:
    return _raise_if_failed(_output_or_error(summary))


def _output_or_error(summary: dict) -> JobOutput | JobFailedError:
    if summary["error"]:
        return JobFailedError(f"job {summary['job_id']} failed: {summary['error']}")
    return _job_output(summary)


def _raise_if_failed(outcome: JobOutput | JobFailedError) -> JobOutput:
    if isinstance(outcome, JobFailedError):
        raise outcome
    return outcome


def _slices(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _params_dict(params) -> dict:
    if params is None:
        return {}
    if isinstance(params, SamplingParams):
        return params.to_dict()
    if not isinstance(params, Mapping):
        raise InvalidRequestError(f"params must be a SamplingParams or a dict of its fields, "
                                  f"got {type(params).__name__}")
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


def _still_arriving(in_flight: bool, deadline: float) -> bool:
    return in_flight and time.monotonic() < deadline


def _aborted(progress: dict) -> bool:
    """Whether a job's progress shows it aborted: asked after an abort whose first try was lost
    to a scheduler restart, as that try may have aborted it before the scheduler went."""
    return "abort" in progress["finish_reasons"]


def _unwrap(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, USER_ERRORS) else exc


def _job_output(summary: dict) -> JobOutput:
    outputs = [CompletionOutput(o["index"], o["token_ids"], o["text"], o["finish_reason"],
                                o["logprobs"], o.get("stop_reason")) for o in summary["outputs"]]
    return JobOutput(summary["job_id"], outputs, summary["arrival_time"],
                     summary["num_prompt_tokens"], summary["first_token_time"],
                     summary["finish_time"], with_unscored_first(summary.get("prompt_logprobs")),
                     prompt_token_ids=summary.get("prompt_token_ids"),
                     last_token_time=summary.get("last_token_time"))

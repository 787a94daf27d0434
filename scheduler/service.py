"""The scheduler actor: owns every job, routes samples to worker actors, relays their tokens to
client streams, re-routes the work of dead workers, and spawns workers for the cluster's NPUs."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scheduler.batching import check_priority
from scheduler.callers import Callers
from scheduler.gone_workers import GoneWorkers
from scheduler.in_order import InOrder
from scheduler.jobs import JobState, SampleState, parse_engine_request_id
from scheduler.logs import check_log_request, log_tails
from scheduler.prompts import job_prompt_ids
from scheduler.quarantine import Quarantine
from scheduler.retention import FinishedJobs
from scheduler.router import NoWorkerError, WorkerLoad, make_router
from scheduler.sampling_params import InvalidRequestError, SamplingParams, in_batch
from scheduler.wording import counted
from worker.output import RequestOutput, unpack_outputs

log = logging.getLogger("pagedserve.scheduler")

NAMESPACE = "pagedserve"
SCHEDULER_NAME = "pagedserve-scheduler"
MAX_SPAWN_FAILURES = 3
# A job whose sample was on this many workers that died fails: a job that crashes worker
# processes (rather than raising in the engine, see Quarantine) must not take down every worker
# in turn; a job that merely shared a batch with it rarely meets it 3 times.
MAX_WORKER_DEATHS_PER_SAMPLE = 3
PING_TIMEOUT_S = 10.0  # how long a quiet worker has to answer before it is taken as hung
# A watch round this much later than due means the scheduler itself was held up (its process
# stopped, its host swapping, a long call blocking its event loop).
HELD_UP_S = 2.0
# Once enough workers are ready, how long wait_ready still waits for workers already loading, so
# that `up` reports the capacity being brought up; bounded, because a worker whose actor cannot
# be placed (its CPUs are missing) stays "starting" until resources appear.
STARTING_GRACE_S = 30.0
# How long held samples (a backlog resumed from the journal, jobs taken with no worker ready)
# wait for workers still loading before they go to those ready: bounded for the same reason.
PENDING_HOLD_S = 30.0
# Calls that answer at once (workers' reports, submit, abort, status) always find room beside
# the result/stream calls that wait on jobs (see RESUMED_CALLS_FACTOR): the actor runs this
# many more at a time. Without that room, 1,000 waits (the actor's default) left no slot for
# the reports that end them.
ANSWERING_CALLS = 1000
# A restarted scheduler counts no waits, and new calls can take every slot before the calls of
# the clients it had (their waits lost with the old process) come back: those resumed calls
# (marked so by the client) are refused only once the waits reach this many times
# max_waiting_calls.
RESUMED_CALLS_FACTOR = 2
# How often the scheduler looks whether the processes whose calls wait on it still live: a
# client killed with SIGKILL cancels nothing, and its waits held their slots until their jobs
# ended (never, for a job that does not run). Ray takes ~1.5 s more to see the process gone.
CALLER_CHECK_S = 1.0


WITHDRAWN_WITH_NODE = "worker %s withdrawn before it started: its node is gone"


def worker_actor_name(worker_id: str) -> str:
    """The Ray name of a worker actor, so drivers can find one (status, health, tests)."""
    return f"pagedserve-worker-{worker_id}"


class OverloadedError(RuntimeError):
    """Too many unfinished jobs; the client should retry later."""


class BatchTooLargeError(OverloadedError):
    """A batch of more jobs than the queue holds: no retry can succeed, only smaller batches."""


class UnavailableError(OverloadedError):
    """The daemon takes no new jobs for now, for a reason that room in the queue does not fix;
    ``code`` names it for the HTTP API."""

    code = "unavailable"


class DrainingError(UnavailableError):
    """The daemon is finishing its jobs to go down (`pagedserve down --drain`): no new ones."""

    code = "draining"


class GoingDownError(UnavailableError):
    """`pagedserve down` has stopped the workers and closed the journal; the actor goes next."""

    code = "going_down"


class JournalUnwritableError(UnavailableError):
    """The job journal cannot be written (a full disk): no job is accepted until it can."""

    code = "journal_unwritable"


class UnknownJobError(KeyError):
    """No job with that id (never submitted, or forgotten long after it finished)."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(slots=True)
class ServiceOptions:
    """The scheduler's settings, as plain values (cluster/config.py builds them)."""

    engine_options: dict
    torch_threads: int = 1
    worker_num_cpus: float = 1.0
    resource_poll_interval_s: float = 2.0
    max_queued_jobs: int = 1024
    max_waiting_calls: int = 16384  # result/stream calls held open at once; more are refused
    max_finished_jobs: int = 10_000  # finished jobs kept for their results, the latest
    max_finished_gib: float = 2.0  # past this, forget the finished jobs already read first
    router: str = "least_loaded"
    worker_stall_timeout_s: float = 60.0  # 0: never
    # how long a tied job resumed from the journal (an HTTP server's request) waits, unrouted,
    # for a call of its client after a restart before it is aborted: a client that lives
    # calls again within seconds (Client retries every 0.5 s); one gone with its cluster never
    tied_job_claim_s: float = 15.0
    worker_env: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the config it was built from, less http


@dataclass(slots=True, eq=False)
class WorkerSlot:
    worker_id: str
    actor: object
    node_id: str  # the node it was started on
    info: dict | None = None  # set when the worker has loaded its model
    load: WorkerLoad | None = None
    samples: set = field(default_factory=set)  # (job_id, sample index) running here
    stats: dict = field(default_factory=dict)
    reports: InOrder = field(default_factory=InOrder)  # the worker's reports, in step order
    # when it last reported, or was given work while it had none (time.monotonic())
    last_heard: float = field(default_factory=time.monotonic)
    killed_why: str | None = None  # why the scheduler killed it, if it did


class LargerWorkerComing(Exception):
    """No ready worker can hold the job, but a larger one is starting (see _loads_that_hold)."""


class SchedulerService:
    """Use through the Ray actor ``SchedulerActor`` (below); every method runs on its event loop."""

    def __init__(self, options: ServiceOptions, journal_factory) -> None:
        from worker.loader import load_config, resolve_model_path
        from worker.tokenizer import Tokenizer

        self.options = options
        path = resolve_model_path(options.engine_options.get("model", "tiny"))
        self.tokenizer = Tokenizer.from_dir(path)
        model_config = load_config(path)
        self.vocab_size = model_config.vocab_size
        self.max_model_len = model_config.context_length(
            options.engine_options.get("max_model_len"))
        self.router = make_router(options.router)
        self.journal = journal_factory()
        self.workers: dict[str, WorkerSlot] = {}
        self.gone_workers = GoneWorkers()  # the last few, for `pagedserve logs` and status
        self.jobs: dict[str, JobState] = {}
        self.finished = FinishedJobs(options.max_finished_jobs,
                                     int(options.max_finished_gib * 2**30))
        # per job, the events of the streams reading it: set at every change of the job
        self.watchers: dict[str, set[asyncio.Event]] = {}
        # set once, when the job finishes: result() waiters are not woken by every token
        self.finished_events: dict[str, asyncio.Event] = {}
        self.pending: collections.deque[tuple[str, int]] = collections.deque()
        self.pending_held_since: float | None = None  # see _drain_pending
        # samples that only a larger worker than those ready can hold, while one is coming
        # back (see _loads_that_hold); kept apart so that they hold up no other job
        self.held_for_size: list[tuple[str, int]] = []
        self.node_fit: dict[str, int] = {}  # per node, the most KV tokens a worker there held
        self.quarantine = Quarantine()  # samples held when an engine failed
        self.failovers = 0
        self.engine_failures = 0
        self.jobs_not_resumed = 0  # journal jobs dropped at start as no longer valid
        self.results_restored = 0  # finished jobs whose results the journal kept
        self.stalled_workers_killed = 0
        self.waiting_calls = 0  # result/stream calls open now (waiting_call caps them)
        self.unfinished_samples = 0  # of the unfinished jobs: what max_queued_jobs bounds
        # the client processes of those calls, of paced submits and of tied jobs, watched for
        # death
        self.callers = Callers()
        # tied jobs resumed from the journal, not routed until a waiting call of their client
        # claims them: job id -> when to abort it, unclaimed (see claim)
        self.unclaimed: dict[str, float] = {}
        self.tied_jobs_aborted = 0
        self.draining = False
        self.going_down = False  # see shutdown
        # per node, its failed worker starts in a row: one that fails MAX_SPAWN_FAILURES gets
        # no more, while the other nodes' NPUs still get workers when theirs die
        self.node_spawn_failures: collections.Counter[str] = collections.Counter()
        self.last_spawn_error: str | None = None
        self.worker_start_failures = 0
        # the workers each live node can hold (its NPUs, as far as its CPUs allow), as last
        # reconciled; nodes that can hold none are left out
        self.npu_nodes: dict[str, int] = {}
        self.placeable_workers = 0
        self.placement_problem: str | None = None
        self.started_at = time.time()
        self._self_handle = ray.get_runtime_context().current_actor
        self.jobs_resumed = self._resume_from_journal()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reconcile_forever()),
                       loop.create_task(self._watch_callers_forever())]

    # -- jobs ------------------------------------------------------------------------------

    def submit_many(self, specs: list[tuple], first_index: int = 0,
                    holder: list | None = None, owner: list | None = None) -> list[str]:
        """Accept every job of ``specs`` (``(prompt, params, priority, job_id)`` each) or none:
        a bad job raises, naming it as job ``first_index + its place``, and a batch that would
        pass ``max_queued_jobs`` (which counts samples) is refused whole. With ``holder``
        (``[token]``, an object the submitting process owns: a paced submit, which reads every
        job it sends), each job's result is held for it, kept whatever max_finished_jobs says,
        until it is read, the job is aborted, or that process is seen dead. With ``owner``
        (likewise a token: an HTTP server's requests, which nobody else reads), the jobs are
        aborted once that process is seen dead, also when it went while a scheduler restarted
        (see claim)."""
        self._check_not_going_down()
        if self.draining:
            raise DrainingError("pagedserve is draining to go down: it finishes its jobs and "
                                "takes no new ones")
        jobs = self._new_jobs(specs, first_index, " (no job of its batch was accepted)")
        self._check_room(list(jobs.values()))
        for job in jobs.values():
            self.journal.record_accepted(job.job_id, job.prompt_token_ids, job.params.to_dict(),
                                         job.priority, {"tied": True} if owner else None)
            self._track(job)
        if holder:
            self.callers.hold(holder[0], list(jobs))
        if owner:
            self.callers.own(owner[0], list(jobs))
        self._dispatch([(job, sample) for job in jobs.values() for sample in job.samples])
        return list(jobs)

    def _check_room(self, jobs: list[JobState]) -> None:
        """Refuse jobs that would pass max_queued_jobs, which counts samples: a job of n
        samples is n engine requests, routed each on its own, so it takes n places."""
        limit, samples = self.options.max_queued_jobs, sum(job.params.n for job in jobs)
        if len(jobs) == 1:
            what, adds = f"a job of n={samples}", f"; this job adds {samples}" * (samples > 1)
        else:
            of_n = f" ({samples} samples)" if samples != len(jobs) else ""
            what = f"a batch of {len(jobs)} jobs{of_n}"
            adds = f"; this batch adds {len(jobs)}{of_n}"
        if samples > limit:
            raise BatchTooLargeError(f"{what} can never fit max_queued_jobs={limit} (which "
                                     "counts samples); send fewer")
        if self.unfinished_samples + samples > limit:
            raise OverloadedError(
                f"overloaded: the queue holds {counted(self.unfinished_samples, 'sample')} "
                f"(max_queued_jobs={limit}, a job counting as its n samples){adds}; retry later")

    def check_many(self, specs: list[tuple], first_index: int = 0) -> None:
        """Raise what submit_many would for a bad job of ``specs``, accepting none: a client
        that sends many batches checks them all first, so that a bad job in a late batch
        refuses the lot before any job has run."""
        self._new_jobs(specs, first_index, " (no job was submitted)")

    def _new_jobs(self, specs: list[tuple], first_index: int, refused: str
                  ) -> dict[str, JobState]:
        """The validated jobs of ``specs`` by id, not yet accepted; a bad one raises, named as
        job ``first_index + its place`` (with ``refused`` added) unless it is a lone job."""
        jobs: dict[str, JobState] = {}
        for i, spec in enumerate(specs):
            try:
                job = self._new_job(*spec, batch=jobs)
            except InvalidRequestError as exc:
                if len(specs) == 1 and first_index == 0:  # a plain submit: no place to name
                    raise
                raise in_batch(exc, first_index + i, refused) from None
            jobs[job.job_id] = job
        return jobs

    def _new_job(self, prompt, params: dict | None, priority: int, job_id: str | None,
                 batch: dict[str, JobState]) -> JobState:
        """A validated job, not yet accepted; its id must be new here and in ``batch``."""
        params = SamplingParams.from_dict(params or {})
        check_priority(priority, self.options.engine_options.get("policy", "fcfs"))
        prompt_ids = self._validate_prompt(prompt, params)
        if params.seed is None:  # fixed now, so a replay after a restart repeats the output
            params.seed = random.getrandbits(63)
        job_id = uuid.uuid4().hex if job_id is None else _checked_job_id(job_id)
        if job_id in self.jobs or job_id in batch:
            raise InvalidRequestError(f"job id {job_id!r} is already in use")
        return JobState(job_id, prompt_ids, params, priority)

    def _validate_prompt(self, prompt, params: SamplingParams) -> list[int]:
        ids = job_prompt_ids(prompt, params, self.tokenizer, self.vocab_size)
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        fits = [w.info["max_tokens_fit"] for w in self.workers.values() if w.info]
        needed = self._kv_tokens_needed(len(ids), params)
        if fits and needed > max(fits):  # then a worker coming back larger may still hold it
            most = max(max(fits), self._largest_fit_coming())
            if needed > most:
                raise InvalidRequestError(
                    f"job needs up to {needed} tokens of KV cache but a worker holds at most "
                    f"{most}; shorten the prompt or max_tokens")
        return ids

    def _kv_tokens_needed(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The KV slots a job's longest sequence takes: what a worker checks it can hold."""
        return min(num_prompt_tokens + params.max_tokens, self.max_model_len)

    @property
    def unfinished_jobs(self) -> int:
        return len(self.jobs) - len(self.finished)

    def _track(self, job: JobState) -> None:
        self.jobs[job.job_id] = job
        self.finished_events[job.job_id] = asyncio.Event()
        if not job.finished:
            self.unfinished_samples += len(job.samples)

    def _dispatch(self, samples: list[tuple[JobState, SampleState]]) -> None:
        """Route each sample to a worker, or hold it in ``pending`` while none is ready. Loads
        are counted once per call, then grow by each routed sample's tokens, so a batch
        spreads out without recounting every sample each time. A sample that has ended since
        it was picked (its job failed or was aborted meanwhile) is dropped."""
        samples = [(job, sample) for job, sample in samples if not sample.finished]
        if self.pending_held_since is not None:  # behind the held backlog, in order
            self.pending.extend((job.job_id, sample.index) for job, sample in samples)
            return
        ready = [w for w in self.workers.values() if w.info and w.load]
        for w in ready:
            w.load.pending_tokens = sum(self.jobs[j].pending_tokens(i) for j, i in w.samples
                                        if j in self.jobs)
        for job, sample in samples:
            try:
                worker = self.workers[self.router.choose(job.prompt_token_ids,
                                                         self._loads_that_hold(job, ready))]
            except LargerWorkerComing:
                self.held_for_size.append((job.job_id, sample.index))
                continue
            except NoWorkerError:  # also when no worker is ready
                self.pending.append((job.job_id, sample.index))
                continue
            sample.worker_id = worker.worker_id
            if not worker.samples:  # an idle worker's silence so far is not a stall
                worker.last_heard = time.monotonic()
            worker.samples.add((job.job_id, sample.index))
            worker.load.pending_tokens += job.pending_tokens(sample.index)
            worker.actor.add.remote(job.engine_request_id(sample), job.prompt_token_ids,
                                    job.sample_params(sample.index).to_dict(), job.priority,
                                    list(sample.token_ids), job.arrival_time)

    def _loads_that_hold(self, job: JobState, ready: list[WorkerSlot]) -> list[WorkerLoad]:
        """The loads of the ready workers whose KV cache can hold the job's longest sequence
        (caches differ with the device's memory). When none can: LargerWorkerComing while a
        worker that may is starting (the job's worker died and it failed over, or it was
        resumed from the journal); else all of them, whose engine then refuses the job,
        failing it with why."""
        needed = self._kv_tokens_needed(len(job.prompt_token_ids), job.params)
        holding = [w.load for w in ready if w.info["max_tokens_fit"] >= needed]
        if holding or not ready:  # none ready: the router says so
            return holding
        if self._may_come_larger(needed):
            raise LargerWorkerComing()
        return [w.load for w in ready]

    def _may_come_larger(self, needed: int) -> bool:
        """Whether a worker starting now may hold ``needed`` KV tokens: one on a node whose
        worker did, or whose size is not known yet (a restarted scheduler knows none) unless
        some worker cannot be placed: a worker may wait for CPUs that others hold, and this
        hold, unlike the backlog's in _drain_pending, has no time limit."""
        unknown = 0 if self.placement_problem else needed
        return any(self.node_fit.get(node, unknown) >= needed
                   for node in self._nodes_getting_workers())

    def _largest_fit_coming(self) -> int:
        """The most KV tokens a worker held on a node that is getting a new worker: what that
        one will hold, as far as is known. Once every NPU there has a worker ready again, none
        is coming (a replacement may hold less than the worker it replaced)."""
        return max((self.node_fit.get(node, 0) for node in self._nodes_getting_workers()),
                   default=0)

    def _nodes_getting_workers(self) -> set[str]:
        """The live nodes with a worker starting, or an NPU without one (spawned at the next
        reconcile), that have not given up starting them."""
        slots = collections.Counter(slot.node_id for slot in self.workers.values())
        starting = {slot.node_id for slot in self.workers.values() if slot.info is None}
        return {node for node, npus in self.npu_nodes.items()
                if self.node_spawn_failures[node] < MAX_SPAWN_FAILURES
                and (node in starting or slots[node] < npus)}

    def _drain_pending(self) -> None:
        """Route the held samples. While other workers are still loading (a scheduler just
        restarted with a backlog from the journal) this waits for them, up to
        PENDING_HOLD_S, so that the first worker ready does not get the whole backlog (also
        where some NPU cannot be placed: a node gets only the workers it can hold, so those
        loading are coming)."""
        ready = any(w.info is not None for w in self.workers.values())
        if self.held_for_size and ready:  # again: a larger worker is ready, or none will be
            held, self.held_for_size = self.held_for_size, []
            self._dispatch(self._samples_of(held))
        if not self.pending or not ready:
            return
        now = time.monotonic()
        loading = any(w.info is None for w in self.workers.values())
        if loading:
            if self.pending_held_since is None:
                self.pending_held_since = now  # from the first worker ready
            if now - self.pending_held_since < PENDING_HOLD_S:
                return
        self.pending_held_since = None
        waiting, self.pending = self.pending, collections.deque()
        self._dispatch(self._samples_of(waiting))

    def _samples_of(self, entries) -> list[tuple[JobState, SampleState]]:
        """The samples of held ``(job id, index)`` entries whose job is still known."""
        jobs = ((self.jobs.get(job_id), index) for job_id, index in entries)
        return [(job, job.samples[index]) for job, index in jobs if job is not None]

    def report(self, worker_id: str, number: int, outputs: list, rejected: list,
               load: dict) -> None:
        """A worker's outputs of one step (and adds it refused), with its load after the step.

        Ray does not keep the order of calls to an async actor, and a report that overtook an
        earlier one would put a sample's tokens out of order: reports are applied by number."""
        worker = self.workers.get(worker_id)
        if worker is None:  # gone (its samples went elsewhere), or a previous scheduler's, whose
            return          # attempt numbers a job resumed from the journal may share: stale
        worker.last_heard = time.monotonic()
        for outputs, rejected, load in worker.reports.push(number, (outputs, rejected, load)):
            self._update_load(worker, load)
            self._apply_report(worker, outputs, rejected)

    def _apply_report(self, worker: WorkerSlot, outputs: list, rejected: list) -> None:
        for out in outputs:
            job_id, index, serial, attempt = parse_engine_request_id(out.request_id)
            job = self._job_of_serial(job_id, serial)
            if job is not None and job.apply(index, attempt, out):
                if out.finish_reason is not None:
                    worker.samples.discard((job_id, index))
                self._changed(job)
        for request_id, message in rejected:
            job_id, index, serial, _ = parse_engine_request_id(request_id)
            job = self._job_of_serial(job_id, serial)
            if job is None:  # an earlier job of that id, forgotten
                continue
            worker.samples.discard((job_id, index))  # the worker does not run it
            if not job.finished:
                self._fail(job, message)

    def _job_of_serial(self, job_id: str, serial: int) -> JobState | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.serial == serial else None

    def _update_load(self, worker: WorkerSlot, load: dict) -> None:
        worker.stats = load
        worker.load.free_blocks = load["free_blocks"]

    def _changed(self, job: JobState) -> None:
        if self.quarantine.cleared(job):
            self._release_suspect()
        for event in self.watchers.get(job.job_id, ()):
            event.set()
        if job.finished and job.job_id not in self.finished:
            self._retire(job)

    def _retire(self, job: JobState) -> None:
        self.unfinished_samples -= len(job.samples)
        self.callers.disown(job.job_id)
        self.unclaimed.pop(job.job_id, None)
        reason = "error" if job.error else job.samples[0].finish_reason
        self.journal.record_finished(job.job_id, reason, job.to_record())
        self.finished_events[job.job_id].set()
        self._forget(self.finished.add(job.job_id, job.kept_bytes(),
                                       held=self.callers.holds(job.job_id)))

    def _read(self, job: JobState) -> dict:
        """The finished job's summary, for a client that reads its result."""
        summary = job_summary(job)
        self.callers.unhold(job.job_id)
        self._forget(self.finished.mark_read(job.job_id))
        return summary

    def _forget(self, job_ids: list[str]) -> None:
        self.journal.forget_results(job_ids)
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
            self.finished_events.pop(job_id, None)

    def abort(self, job_id: str) -> bool:
        self._check_not_going_down()
        job = self._job(job_id)
        # aborted: not read by its submitter (a withdrawn paced submit aborts its finished
        # jobs too)
        self._unhold(job.job_id)
        if job.finished:
            return False
        self._withdraw_samples(job)
        for sample in job.samples:
            if not sample.finished:
                job.finish_sample(sample, "abort")
        self._changed(job)
        return True

    def _unhold(self, job_id: str) -> None:
        self.callers.unhold(job_id)
        self._forget(self.finished.release(job_id))

    def _withdraw_samples(self, job: JobState) -> None:
        """Take the job's unfinished samples back from the workers running them, which drop
        them and free their blocks."""
        for sample in job.samples:
            worker = self.workers.get(sample.worker_id or "")
            if sample.finished or worker is None:
                continue
            if (job.job_id, sample.index) in worker.samples:
                worker.actor.abort.remote(job.engine_request_id(sample))
                worker.samples.discard((job.job_id, sample.index))

    def job_status(self, job_id: str) -> dict:
        return self._job(job_id).progress()

    def list_jobs(self, finished_limit: int) -> list[dict]:
        """Every unfinished job in arrival order, then up to ``finished_limit`` of the finished
        ones kept, newest first."""
        unfinished = [job for job in self.jobs.values() if not job.finished]
        newest = [self.jobs[j] for j in self.finished.newest(finished_limit)]
        return [job.progress() for job in unfinished + newest]

    def _find(self, job_id: str) -> JobState | None:
        """The job of ``job_id``, also given as an HTTP response id."""
        if not isinstance(job_id, str):
            return None
        return self.jobs.get(job_id) or self.jobs.get(_without_http_prefix(job_id))

    def _job(self, job_id: str) -> JobState:
        job = self._find(job_id)
        if job is None:
            raise UnknownJobError(
                f"unknown job id {job_id!r}: never submitted, or finished and forgotten (the "
                "scheduler keeps the last "
                f"{counted(self.options.max_finished_jobs, 'finished job')}, "
                f"fewer once their results pass {self.options.max_finished_gib:g} GiB and have "
                "been read)")
        return job

    async def stream(self, job_ids: list[str], cursors: list[list[int] | None] | None = None):
        """Yields ``[]`` at once (the call is taken), then lists of ``(place, output)``: the
        new outputs of ``job_ids[place]``, until every job has finished. Resume with the
        cursors of tokens already seen per sample (see JobState.deltas_since)."""
        jobs = [self._job(job_id) for job_id in job_ids]
        cursors = [_full_cursor(job, cursor)
                   for job, cursor in zip(jobs, list(cursors or []) + [None] * len(jobs))]
        woken = asyncio.Event()
        for job in jobs:
            self.watchers.setdefault(job.job_id, set()).add(woken)
        try:
            yield []
            reading = set(range(len(jobs)))
            while reading:
                woken.clear()
                batch = []
                for place in sorted(reading):
                    deltas = _advance_cursor(jobs[place], cursors[place])
                    if deltas:
                        batch += [(place, delta) for delta in deltas]
                    elif jobs[place].finished:
                        self._read(jobs[place])
                        reading.discard(place)
                if batch:
                    yield batch
                elif reading:
                    await _wait(woken, 5.0)
        finally:
            for job in jobs:
                watching = self.watchers.get(job.job_id)
                if watching is not None:
                    watching.discard(woken)
                    if not watching:
                        del self.watchers[job.job_id]

    async def result(self, job_id: str, timeout: float | None = None) -> dict:
        _check_timeout(timeout)
        job = self._job(job_id)
        job_id = job.job_id
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} has not finished after {timeout} s")
            await _wait(self.finished_events[job_id], min(left or 5.0, 5.0))
        return self._read(job)

    async def results(self, job_ids: list[str], timeout: float | None = None) -> list[dict]:
        """``result`` of the first job, then of those after it while they are finished: at
        least one summary, in order, so a client reads many finished jobs in one call."""
        summaries = [await self.result(job_ids[0], timeout)]
        for job_id in job_ids[1:]:
            job = self._find(job_id)
            if job is None or not job.finished:  # an unknown id fails as the next call's first
                break
            summaries.append(self._read(job))
        return summaries

    @contextlib.contextmanager
    def waiting_call(self, job_ids: list[str], resumed: bool = False,
                     caller: list | None = None):
        """Hold one of max_waiting_calls for a call that waits on ``job_ids``, or refuse it.
        With ``caller`` (``[token]``, an object the calling process owns), the call is ended
        (cancelled) once that process is seen dead. Counted only past what can raise: a
        refused call must not keep its slot."""
        limit = self.options.max_waiting_calls
        if self.waiting_calls >= limit * (RESUMED_CALLS_FACTOR if resumed else 1):
            raise OverloadedError(f"overloaded: {counted(limit, 'call')} already waiting on "
                                  "jobs (scheduler.max_waiting_calls); retry later")
        self.claim([job for job in map(self._find, job_ids) if job is not None], caller)
        task = asyncio.current_task()
        self.waiting_calls += 1
        if caller:
            self.callers.open_call(caller[0], task)
        try:
            yield
        finally:
            self.waiting_calls -= 1
            if caller:
                self.callers.close_call(caller[0], task)

    async def _watch_callers_forever(self) -> None:
        """End the waiting calls of client processes that died, so that they give back their
        max_waiting_calls slots, let go of the results they held, and abort the jobs they
        owned (and the tied jobs resumed from the journal that no client claimed)."""
        while True:
            await asyncio.sleep(CALLER_CHECK_S)
            try:
                watched = self.callers.watched()
                alive = await asyncio.gather(*(_owner_alive(token) for _, token in watched))
                for (key, _), lives in zip(watched, alive):
                    if not lives:
                        self._caller_gone(key)
                self._abort_unclaimed()
            except Exception:  # never let the watcher die
                log.exception("watching callers failed")

    def _caller_gone(self, key: str) -> None:
        calls, held, owned = self.callers.forget(key)
        for task in calls:
            task.cancel()
        for job_id in held:
            self._unhold(job_id)
        for job_id in owned:
            self._abort_for_nobody(job_id, "the client process that owned it died")

    def claim(self, jobs: list[JobState], caller: list | None) -> None:
        """A waiting call on ``jobs``: tied jobs resumed from the journal, which wait
        unrouted, are claimed by its caller (their client, back after the restart), which
        owns them from now on, and run."""
        for job in jobs:
            if self.unclaimed.pop(job.job_id, None) is None:
                continue
            if caller:
                self.callers.own(caller[0], [job.job_id])
            self._dispatch([(job, sample) for sample in job.samples])

    def _abort_unclaimed(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, deadline in self.unclaimed.items() if now > deadline]:
            del self.unclaimed[job_id]
            self._abort_for_nobody(job_id, "no client claimed it in scheduler.tied_job_claim_s "
                                           "after the scheduler restarted")

    def _abort_for_nobody(self, job_id: str, why: str) -> None:
        if job_id in self.jobs and self.abort(job_id):  # False once it has finished
            log.warning("job %s aborted: %s", job_id, why)
            self.tied_jobs_aborted += 1

    # -- workers ---------------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        due = time.monotonic()
        while True:
            try:
                self._excuse_silence_while_held_up(time.monotonic() - due)
                await self._kill_hung_workers()
                self._reconcile()
                self._drain_pending()  # held past PENDING_HOLD_S for workers still loading
            except Exception:  # never let the watcher die: log and try again next round
                log.exception("reconcile failed")
            due = time.monotonic() + self.options.resource_poll_interval_s
            await asyncio.sleep(self.options.resource_poll_interval_s)

    def _excuse_silence_while_held_up(self, late_s: float) -> None:
        """Workers' reports wait in Ray's queue while this scheduler is held up, so their
        silence says nothing about them: it is timed from now. (Pinged at once, every worker
        answered and was logged as "has not finished a step for N s".)"""
        if late_s < HELD_UP_S:
            return
        log.warning("the scheduler was held up for %.0f s (its process stopped, its host "
                    "overloaded, or a long call); workers' silence is timed from now", late_s)
        now = time.monotonic()
        for slot in self.workers.values():
            slot.last_heard = now
            if slot.reports.missing_since is not None:
                slot.reports.missing_since = now

    def _reconcile(self) -> None:
        """One worker per NPU in the cluster that can be placed: spawn for NPUs that have none
        (new nodes, dead workers' freed NPUs), withdraw workers still starting for NPUs that
        are gone."""
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        # a node gets the workers it can hold: one more would wait for its CPUs forever
        # ("starting" in status, `up` waiting for it), or, with none, fail as unschedulable
        placeable = {node["NodeID"]: self._placeable_on(node["Resources"]) for node in nodes}
        self.npu_nodes = {node_id: count for node_id, count in placeable.items() if count}
        self._check_placement(nodes, placeable)
        self._withdraw_orphans({node["NodeID"] for node in nodes})
        held = collections.Counter(slot.node_id for slot in self.workers.values())
        for node_id, count in self.npu_nodes.items():
            if self.node_spawn_failures[node_id] < MAX_SPAWN_FAILURES:
                for _ in range(count - held[node_id]):
                    self._spawn(node_id)

    def _placeable_on(self, resources: dict) -> int:
        """How many workers a node of these resources holds at once: each takes 1 NPU and
        worker_num_cpus CPUs."""
        cpus = self.options.worker_num_cpus
        return min(_npus(resources), int(resources.get("CPU", 0) // cpus))

    def _withdraw_orphans(self, live_nodes: set[str]) -> None:
        """A worker still starting on a node that is gone (crashed, or removed) can never be
        placed there: withdraw it (its node's NPUs are no longer wanted)."""
        for slot in [slot for slot in self.workers.values()
                     if slot.info is None and slot.node_id not in live_nodes]:
            log.warning(WITHDRAWN_WITH_NODE, slot.worker_id)
            del self.workers[slot.worker_id]
            ray.kill(slot.actor, no_restart=True)

    async def _kill_hung_workers(self) -> None:
        """A worker that has samples to run but has not reported a step for
        worker_stall_timeout_s is asked for its stats, which it answers while it steps. One
        that does not answer in time is hung (a deadlock, a frozen or stopped process), though
        Ray still counts it alive: it is killed, its samples fail over as a dead worker's do,
        and its NPU gets a new worker. One that answers is only slow (a long step, or a device
        call that does not return): it is logged and looked at again a timeout later.

        A worker whose report went missing that long is killed too: its later reports wait
        for it, so its samples would never move again (Ray gives up on calls in flight to an
        actor that stops answering for minutes, and reports are not sent twice)."""
        timeout = self.options.worker_stall_timeout_s
        now = time.monotonic()
        for slot in [slot for slot in self.workers.values() if timeout and
                     now - (slot.reports.missing_since or now) > timeout]:
            log.error("worker %s: its report %d has not come for %.0f s, and %d later ones "
                      "wait for it: killing it so that its samples fail over", slot.worker_id,
                      slot.reports.next_number, now - slot.reports.missing_since,
                      slot.reports.held)
            self._kill_stalled(slot, "killed: a report of it went missing")
        quiet = [slot for slot in self.workers.values()
                 if timeout and slot.info and slot.samples and now - slot.last_heard > timeout]
        heard = [slot.last_heard for slot in quiet]
        answers = await asyncio.gather(*(answers_stats(slot.actor, min(timeout, PING_TIMEOUT_S))
                                         for slot in quiet))
        for slot, last_heard, answered in zip(quiet, heard, answers):
            if slot.last_heard != last_heard or self.workers.get(slot.worker_id) is not slot:
                continue  # it reported while pinged (a long step ended), or went
            silent_s = time.monotonic() - last_heard
            slot.last_heard = time.monotonic()
            if answered:
                log.warning("worker %s has not finished a step for %.0f s, but answers",
                            slot.worker_id, silent_s)
                continue
            log.error("worker %s has not stepped for %.0f s with %d samples to run and does "
                      "not answer: killing it", slot.worker_id, silent_s, len(slot.samples))
            self._kill_stalled(slot, f"killed: hung (no step for {silent_s:.0f} s, no answer)")

    def _kill_stalled(self, slot: WorkerSlot, why: str) -> None:
        self.stalled_workers_killed += 1
        slot.killed_why = why
        # once is enough, _watch then sees it gone: not missing, nor quiet, until it has
        slot.reports.missing_since = None
        slot.last_heard = time.monotonic()
        ray.kill(slot.actor, no_restart=True)

    def _check_placement(self, nodes: list[dict], placeable: dict[str, int]) -> None:
        """Says why, when the live ``nodes`` can hold fewer workers at once (``placeable``, per
        node) than they have NPUs, and which nodes lack the CPUs."""
        cpus = self.options.worker_num_cpus
        wanted = sum(_npus(node["Resources"]) for node in nodes)
        self.placeable_workers = sum(placeable.values())
        self.placement_problem = None
        if wanted == 0:  # `up` would otherwise wait out its whole timeout
            self.placement_problem = (
                "the Ray cluster has no NPU resources: start its nodes with "
                "`ray start --resources='{\"NPU\": N}'` (logical NPUs on CPU hosts) or add "
                "nodes with NPUs")
        elif self.placeable_workers < wanted:
            short = [_node_resources(node) for node in nodes
                     if placeable[node["NodeID"]] < _npus(node["Resources"])]
            more = f" and {len(short) - 3} more" if len(short) > 3 else ""
            where = (f"node {short[0]} has" if len(short) == 1
                     else f"nodes {', '.join(short[:3])}{more} have")
            self.placement_problem = (
                f"only {self.placeable_workers} of {counted(wanted, 'worker')} can be placed: "
                f"each needs 1 NPU and {counted(cpus, 'CPU')} (cluster.worker_num_cpus), more "
                f"than {where}; lower cluster.worker_num_cpus or add CPUs")

    def _spawn(self, node_id: str) -> None:
        """A worker for one NPU of the node ``node_id``."""
        from worker.actor import WorkerActor

        worker_id = f"w{uuid.uuid4().hex[:8]}"
        actor = WorkerActor.options(
            name=worker_actor_name(worker_id), namespace=NAMESPACE,
            resources={"NPU": 1}, num_cpus=self.options.worker_num_cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": self.options.worker_env} if self.options.worker_env else None,
        ).remote(worker_id, self.options.engine_options, self.options.torch_threads,
                 self._self_handle)
        slot = WorkerSlot(worker_id, actor, node_id)
        self.workers[worker_id] = slot
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch(slot)))

    async def _watch(self, slot: WorkerSlot) -> None:
        """Wait for the worker to load, then for its run() to end: then it is dead."""
        try:
            info = await slot.actor.info.remote()
        except Exception as exc:  # the constructor failed: a config or model error
            if self.workers.get(slot.worker_id) is not slot:  # withdrawn (_withdraw_orphans)
                return
            self.workers.pop(slot.worker_id, None)
            if _node_alive(slot.node_id):
                self._count_start_failure(slot, exc)
            else:  # it went with its node: no start error, but the log says where it went
                log.warning(WITHDRAWN_WITH_NODE, slot.worker_id)
            self._drain_pending()  # held for this one, perhaps
            return
        if self.workers.get(slot.worker_id) is not slot:  # withdrawn as its answer came
            return
        slot.info = info
        del self.node_spawn_failures[slot.node_id]
        self.node_fit[slot.node_id] = max(info["max_tokens_fit"],
                                          self.node_fit.get(slot.node_id, 0))
        slot.load = WorkerLoad(slot.worker_id, slot.info["num_blocks"], slot.info["num_blocks"],
                               slot.info["block_size"])
        log.info("worker %s ready on %s", slot.worker_id, slot.info["device"])
        self._drain_pending()
        engine_error, why = None, "stopped"
        try:
            await slot.actor.run.remote()
        except RayTaskError as exc:  # its step loop raised (a device error, a bad request)
            engine_error = _one_line(exc)
            why = f"its engine failed: {engine_error}"
            self.engine_failures += 1
            log.error("worker %s: %s", slot.worker_id, why)
        except Exception as exc:
            why = f"died: {_death_reason(exc)}"
            log.warning("worker %s %s", slot.worker_id, why)
        self._on_worker_gone(slot, why, engine_error)

    def _count_start_failure(self, slot: WorkerSlot, exc: Exception) -> None:
        # a config or model error (see WorkerActor.info): every retry would fail alike
        config_error = isinstance(exc, RayTaskError) and isinstance(exc.cause, ValueError)
        if config_error:
            ray.kill(slot.actor, no_restart=True)  # it is still up, holding its NPU
        self.node_spawn_failures[slot.node_id] += MAX_SPAWN_FAILURES if config_error else 1
        self.worker_start_failures += 1
        self.last_spawn_error = _one_line(exc)
        log.error("worker %s failed to start: %s", slot.worker_id, self.last_spawn_error)

    def _on_worker_gone(self, slot: WorkerSlot, why: str,
                        engine_error: str | None = None) -> None:
        """Re-route the unfinished samples of a worker that is gone. If its engine raised,
        they are suspects (see Quarantine) and run again one at a time."""
        if self.workers.pop(slot.worker_id, None) is None:
            return
        self.gone_workers.add(slot, slot.killed_why or why)  # Ray's word is "ray.kill"
        self.router.forget(slot.worker_id)
        ray.kill(slot.actor, no_restart=True)  # a failed step loop leaves a process on the NPU
        orphans = []
        for job_id, index in slot.samples:
            job = self.jobs.get(job_id)
            if job is None or job.samples[index].finished:
                continue
            sample = job.samples[index]
            sample.attempt += 1  # anything the dead worker still sends is stale
            sample.worker_id = None
            if sample.attempt >= MAX_WORKER_DEATHS_PER_SAMPLE:  # a job that kills its workers
                self._fail(job, f"{sample.attempt} workers died while running it")
                continue
            self.failovers += 1
            orphans.append((job, sample))
        if engine_error is None:
            self._dispatch(orphans)
            return
        culprit = self.quarantine.take_culprit(orphans)
        if culprit is not None:
            self._fail(culprit[0], f"it made the engine fail twice ({engine_error}); not "
                                   "retried")
            orphans.remove(culprit)
        self.quarantine.hold(orphans)
        self._release_suspect()

    def _release_suspect(self) -> None:
        suspect = self.quarantine.release()
        if suspect is not None:
            self._dispatch([suspect])

    def _fail(self, job: JobState, message: str) -> None:
        """Fail the job; its other samples still running (n > 1) are withdrawn."""
        log.error("job %s failed: %s", job.job_id, message)
        self._withdraw_samples(job)
        job.fail(message)
        self._changed(job)

    def _resume_from_journal(self) -> int:
        """Takes back the finished jobs whose results the journal kept, and queues the jobs a
        previous scheduler left unfinished; returns how many of those. One that is no longer
        valid (this version checks more, or the model changed) is dropped with a warning: it
        must not keep the scheduler from starting."""
        self._restore_finished(self.journal.take_replayed_results())
        for entry in self.journal.unfinished():
            try:
                params = SamplingParams.from_dict(entry.params)
                prompt_ids = self._validate_prompt(list(entry.prompt_token_ids), params)
            except (InvalidRequestError, TypeError) as exc:
                log.warning("journal job %s cannot be resumed and is dropped: %s",
                            entry.job_id, exc)
                self.journal.record_finished(entry.job_id, "error")
                self.jobs_not_resumed += 1
                continue
            job = JobState(entry.job_id, prompt_ids, params, entry.priority,
                           arrival_time=entry.accepted_at)
            self._track(job)
            if (entry.extra or {}).get("tied"):  # it runs once its client is back for it
                self.unclaimed[job.job_id] = time.monotonic() + self.options.tied_job_claim_s
            else:
                self.pending.extend((job.job_id, s.index) for s in job.samples)
        if self.unfinished_jobs:
            log.info("resuming %s from the journal",
                     counted(self.unfinished_jobs, "unfinished job"))
        return self.unfinished_jobs

    def _restore_finished(self, records: dict[str, dict]) -> None:
        """Finished jobs, oldest first, as they were before the restart (none read yet)."""
        unreadable = []
        for job_id, record in records.items():
            try:
                job = JobState.from_record(job_id, record)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("journal result of job %s is unreadable and dropped: %s", job_id, exc)
                unreadable.append(job_id)
                continue
            self._track(job)
            self.finished_events[job_id].set()
            self._forget(self.finished.add(job_id, job.kept_bytes()))
        self.journal.forget_results(unreadable)
        self.results_restored = len(self.finished)
        if records:
            log.info("kept the results of %s from the journal",
                     counted(len(self.finished), "finished job"))

    # -- status ----------------------------------------------------------------------------

    async def wait_ready(self, min_workers: int = 1, timeout: float = 120.0) -> dict:
        """The status once ``min_workers`` are ready and the others loading have joined them
        (or STARTING_GRACE_S has passed)."""
        deadline = time.monotonic() + timeout
        grace_ends = None
        while time.monotonic() < deadline:
            ready = sum(1 for w in self.workers.values() if w.info)
            if ready >= min_workers:
                grace_ends = grace_ends or time.monotonic() + STARTING_GRACE_S
                if ready == len(self.workers) or time.monotonic() >= grace_ends:
                    return self.status()
            if self._starts_blocked_everywhere():
                raise RuntimeError(f"workers fail to start: {self.last_spawn_error}")
            if self.placement_problem and self.placeable_workers < min_workers:
                raise RuntimeError(self.placement_problem)
            await asyncio.sleep(0.2)
        raise TimeoutError(f"fewer than {counted(min_workers, 'worker')} ready after {timeout} s; "
                           f"NPU resources in the cluster: "
                           f"{ray.cluster_resources().get('NPU', 0):g}")

    def _starts_blocked_everywhere(self) -> bool:
        """Every node with NPUs has failed MAX_SPAWN_FAILURES worker starts in a row."""
        return bool(self.npu_nodes) and all(
            self.node_spawn_failures[node] >= MAX_SPAWN_FAILURES for node in self.npu_nodes)

    def status(self) -> dict:
        workers = []
        for w in self.workers.values():
            entry = {"worker_id": w.worker_id, "ready": w.info is not None, "node_id": w.node_id,
                     **(w.info or {})}
            entry.update({k: v for k, v in w.stats.items() if k != "worker_id"})
            entry.setdefault("kv_total", (w.info or {}).get("num_blocks", 0))
            workers.append(entry)
        unfinished = self.unfinished_jobs
        return {
            "workers": workers, "jobs_unfinished": unfinished,
            "samples_unfinished": self.unfinished_samples,
            "max_queued_jobs": self.options.max_queued_jobs,
            "waiting_calls": self.waiting_calls,
            "max_waiting_calls": self.options.max_waiting_calls,
            "jobs_finished_kept": len(self.finished),
            "jobs_finished_held": self.finished.held,
            "finished_kept_bytes": self.finished.total_bytes,
            "max_finished_jobs": self.options.max_finished_jobs,
            "pending_samples": len(self.pending) + len(self.held_for_size),
            "failovers": self.failovers, "jobs_resumed": self.jobs_resumed,
            "jobs_not_resumed": self.jobs_not_resumed,
            "results_restored": self.results_restored,
            "stalled_workers_killed": self.stalled_workers_killed, "draining": self.draining,
            "tied_jobs_aborted": self.tied_jobs_aborted,
            "journal_error": self.journal.write_error,
            "journal_damage": _first_few(self.journal.replay_problems),
            "engine_failures": self.engine_failures,
            "quarantined_samples": len(self.quarantine),
            "uptime_s": time.time() - self.started_at, "started_at": self.started_at,
            "scheduler_pid": os.getpid(),
            "last_spawn_error": self.last_spawn_error,
            "worker_start_failures": self.worker_start_failures,
            "placement_problem": self.placement_problem,
            "placeable_workers": self.placeable_workers,
            "gone_workers": self.gone_workers.summaries(),
            "workers_gone": self.gone_workers.total,
            "config": self.options.config,
        }

    def _check_not_going_down(self) -> None:
        if self.going_down:
            raise GoingDownError("pagedserve is going down (`pagedserve down`): it takes no "
                                 "jobs or aborts until the next `pagedserve up`, which resumes "
                                 "the unfinished jobs")

    def set_draining(self, draining: bool) -> int:
        """Refuse new jobs from now on (the unfinished ones go on), or take them again (a drain
        given up); returns how many jobs are unfinished."""
        self.draining = draining
        return self.unfinished_jobs

    async def shutdown(self) -> int:
        """Stops the workers; returns how many unfinished jobs the journal keeps. Until the
        caller kills this actor, submits and aborts are refused (the journal is closed)."""
        self.going_down = True
        for task in self._tasks:
            task.cancel()
        for slot in list(self.workers.values()):
            ray.kill(slot.actor, no_restart=True)
        self.workers.clear()
        try:
            self.journal.close()
        except OSError as exc:  # only "finished" records can be lost: submits wait for the disk
            log.warning("journal: %s; jobs that finished since the last write may run again "
                        "after `up`", exc)
        return self.unfinished_jobs


def _npus(resources: dict) -> int:
    """A node's NPUs, from its Ray resources."""
    return int(resources.get("NPU", 0))


def _node_resources(node: dict) -> str:
    """A node as `status` shows it, with the NPUs and CPUs that place workers there."""
    resources = node["Resources"]
    return (f"{node['NodeID'][:8]} ({counted(_npus(resources), 'NPU')}, "
            f"{counted(resources.get('CPU', 0), 'CPU')})")


def _first_few(problems: list[str], shown: int = 3) -> str | None:
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more if problems else None


def _without_http_prefix(job_id: str) -> str:
    """The job id in an HTTP response id (``cmpl-<job id>``, ``chatcmpl-<job id>``)."""
    return re.sub(r"^(chat)?cmpl-", "", job_id)


MAX_JOB_ID_LEN = 256


def _checked_job_id(job_id: object) -> str:
    """A job id a client chose: printable text with no whitespace (a line of ids on stdin is
    read back stripped), of at most MAX_JOB_ID_LEN characters."""
    if not (isinstance(job_id, str) and 0 < len(job_id) <= MAX_JOB_ID_LEN
            and job_id.isprintable() and not any(c.isspace() for c in job_id)):
        raise InvalidRequestError(f"invalid job_id={job_id!r}: it must be 1 to {MAX_JOB_ID_LEN} "
                                  "printable characters, none of them whitespace")
    return job_id


def _check_timeout(timeout: object) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 <= timeout < math.inf:
        raise InvalidRequestError(f"invalid timeout={timeout!r}: it must be a number of "
                                  "seconds >= 0, or None to wait as long as it takes")


def job_summary(job: JobState) -> dict:
    """A finished job as plain values for clients."""
    return {
        "job_id": job.job_id, "num_prompt_tokens": len(job.prompt_token_ids), "error": job.error,
        "prompt_token_ids": job.prompt_token_ids,
        "arrival_time": job.arrival_time, "first_token_time": job.first_token_time,
        "finish_time": job.finish_time, "last_token_time": job.last_token_time,
        "prompt_logprobs": job.samples[0].prompt_logprobs,
        "outputs": [{"index": s.index, "token_ids": s.token_ids, "text": s.text,
                     "finish_reason": s.finish_reason, "stop_reason": s.stop_reason,
                     "logprobs": s.logprobs if job.params.logprobs is not None else None}
                    for s in job.samples],
    }


def _full_cursor(job: JobState, cursor: list[int] | None) -> list[int]:
    cursor = list(cursor or [])
    return cursor + [0] * (len(job.samples) - len(cursor))


def _advance_cursor(job: JobState, cursor: list[int]) -> list[RequestOutput]:
    """The job's outputs a stream at ``cursor`` has not seen; moves the cursor past them."""
    deltas = job.deltas_since(cursor)
    for d in deltas:
        cursor[d.index] += len(d.new_token_ids)
        if d.finish_reason is not None:
            cursor[d.index] = len(job.samples[d.index].token_ids) + 1
    return deltas


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` has passed. Not asyncio.wait_for, which before
    Python 3.12 can swallow a cancel that comes as the event is set: the cancel that ends the
    call of a dead client (an event set at every token) was lost one time in ten."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def last_line(remote_traceback: str) -> str:
    """The message of the exception a (remote) traceback ends with, without its type's name."""
    lines = [line for line in remote_traceback.strip().splitlines() if line.strip()]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else "unknown error"


def _one_line(exc: BaseException) -> str:
    return last_line(str(exc))


def _death_reason(exc: BaseException) -> str:
    """Ray's word on why an actor died, short: "it was killed by `ray.kill`."."""
    if isinstance(exc, ActorUnavailableError):  # Ray: "temporarily"; it is killed all the same
        return "unreachable: its node went down or lost touch with the cluster"
    if "because its node has died" in str(exc):  # then Ray's tab-indented word on the node
        how = _one_line(exc).strip().removeprefix("the actor's node was ")
        return f"its node died ({how})"
    reason = _one_line(exc)
    if "its worker process has died" in reason:  # then a paragraph on the exit's causes
        return "its process ended unexpectedly (killed, out of memory, or crashed)"
    return reason.removeprefix("The actor is dead because ")


# max_concurrency is set where it is created (cluster/bringup.py): see ANSWERING_CALLS.
# No Ray task events, here and on the workers: calls come every step of every worker and for
# every job, and the GCS kept ~3 KB of event for each (up to its cap of 100,000 events) that
# nobody reads; a 2-worker daemon's GCS grew by ~100 MiB in 90 s of tiny-model jobs.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, enable_task_events=False)
class SchedulerActor:
    """The detached, named scheduler. Thin: every call goes to SchedulerService."""

    def __init__(self, options: ServiceOptions, journal_factory) -> None:
        logging.basicConfig(level=logging.INFO)
        self.service = SchedulerService(options, journal_factory)

    async def submit(self, prompt, params=None, priority=0, job_id=None, owner=None) -> str:
        return (await self.submit_many([(prompt, params, priority, job_id)], owner=owner))[0]

    async def submit_many(self, specs, first_index=0, holder=None, owner=None) -> list[str]:
        journal = self.service.journal
        if journal.write_error is not None:  # refused whole, before any job runs, until
            await self._flush_journal([])     # a write goes through again
        job_ids = self.service.submit_many(specs, first_index, holder, owner)
        # Acknowledge only what is on disk: a scheduler killed right after this reply must still
        # find the jobs in the journal. Concurrent submits share one fsync (group commit).
        await self._flush_journal(job_ids)
        return job_ids

    async def check_many(self, specs, first_index=0) -> None:
        self.service.check_many(specs, first_index)

    async def _flush_journal(self, job_ids: list[str]) -> None:
        """Write the journal; if that fails, abort ``job_ids`` (accepted, not yet on disk) and
        refuse their submit."""
        try:
            await asyncio.to_thread(self.service.journal.flush)
        except OSError as exc:
            for job_id in job_ids:
                self.service.abort(job_id)
            raise JournalUnwritableError(
                f"pagedserve cannot write its job journal ({exc}), so it takes no jobs until it "
                "can: free space there, or set scheduler.journal_path elsewhere and run "
                "`pagedserve down` then `up`") from None

    async def report(self, worker_id, number, packed_outputs, rejected, load) -> None:
        self.service.report(worker_id, number, unpack_outputs(packed_outputs), rejected, load)

    async def _write_journal(self) -> None:
        """Before telling a caller that a job ended (its result, its abort), write what the
        journal buffers: a scheduler killed right after must neither run an aborted job again
        nor a job whose result was read. A journal that cannot be written does not hold the
        answer back (its flusher retries, and status says so)."""
        if self.service.journal.buffered:
            try:
                await asyncio.to_thread(self.service.journal.flush)
            except OSError:
                pass

    async def abort(self, job_id) -> bool:
        aborted = self.service.abort(job_id)
        await self._write_journal()
        return aborted

    async def stream(self, job_ids, cursors=None, resumed=False, caller=None):
        with self.service.waiting_call(job_ids, resumed, caller):
            async with contextlib.aclosing(self.service.stream(job_ids, cursors)) as stream:
                async for outputs in stream:
                    if any(delta.finish_reason is not None for _, delta in outputs):
                        await self._write_journal()
                    yield outputs

    async def result(self, job_id, timeout=None, resumed=False, caller=None) -> dict:
        # held until answered: the journal write holds the actor too
        with self.service.waiting_call([job_id], resumed, caller):
            summary = await self.service.result(job_id, timeout)
            await self._write_journal()
        return summary

    async def results(self, job_ids, timeout=None, resumed=False, caller=None) -> list[dict]:
        with self.service.waiting_call(job_ids, resumed, caller):
            summaries = await self.service.results(job_ids, timeout)
            await self._write_journal()
        return summaries

    async def ping(self) -> bool:
        return True

    async def status(self) -> dict:
        return self.service.status()

    async def logs(self, count: int, worker_ids: list[str] | None = None) -> list[dict]:
        """The last ``count`` lines of the scheduler's log, then of each worker's, then of each
        recently gone worker's (of those in ``worker_ids`` if given; one still loading its
        model cannot answer yet)."""
        service = self.service
        check_log_request(count, worker_ids, set(service.workers) | service.gone_workers.ids())
        workers = [slot for slot in service.workers.values()
                   if worker_ids is None or slot.worker_id in worker_ids]
        gone = [worker for worker in service.gone_workers
                if worker_ids is None or worker.worker_id in worker_ids]
        return await log_tails(workers, gone, count, PING_TIMEOUT_S)

    async def job_status(self, job_id) -> dict:
        return self.service.job_status(job_id)

    async def list_jobs(self, finished_limit=20) -> list[dict]:
        return self.service.list_jobs(finished_limit)

    async def wait_ready(self, min_workers=1, timeout=120.0) -> dict:
        return await self.service.wait_ready(min_workers, timeout)

    async def set_draining(self, draining: bool) -> int:
        return self.service.set_draining(draining)

    async def shutdown(self) -> int:
        return await self.service.shutdown()


async def answers_stats(worker, timeout: float) -> bool:
    """Whether a worker actor answers a stats call within ``timeout`` (which it does while it
    steps); False if it does not or is dead."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(worker.stats.remote().future()), timeout)
        return True
    except (asyncio.TimeoutError, RayActorError, ActorUnavailableError, RayTaskError):
        return False


async def _owner_alive(token) -> bool:
    """False once Ray has failed ``token`` because the process that owns it died; True while
    it can be read (or does not answer in time: not known to be dead)."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(token.future()), CALLER_CHECK_S)
    except ObjectLostError:  # OwnerDiedError
        return False
    except asyncio.TimeoutError:
        pass
    return True


def _node_alive(node_id: str) -> bool:
    return any(node["NodeID"] == node_id and node.get("Alive") for node in ray.nodes())


def head_node_strategy() -> NodeAffinitySchedulingStrategy:
    """Pin the scheduler to the head node (whose resources carry Ray's head marker)."""
    head = next((n["NodeID"] for n in ray.nodes()
                 if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})),
                ray.get_runtime_context().get_node_id())
    return NodeAffinitySchedulingStrategy(head, soft=False)

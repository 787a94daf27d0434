"""Sending many jobs to the scheduler in batches: waiting for room in its queue, and pacing a
batch of any size to its reader so that no job finishes and is forgotten before it is read."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from scheduler.sampling_params import InvalidRequestError
from scheduler.service import BatchTooLargeError, OverloadedError, UnavailableError

if TYPE_CHECKING:
    from cluster.client import Client

ROOM_POLL_S = 0.5  # how often a submit that waits for room checks a full queue
WAIT_REPORT_S = 10.0  # how long a wait for room lasts before on_wait hears of it


def sent_by(source) -> tuple[list[str], list[str]]:
    """The (submitted, in_flight) ids to withdraw that a PacedSubmit, or an exception of
    ``Client.submit_many``, carries; none if it carries none."""
    return getattr(source, "submitted", []), getattr(source, "in_flight", [])


class BatchSubmitter:
    """Sends prepared job specs (``Client`` submit arguments, the job id last) in order,
    ``batch_size`` per scheduler call (fewer of jobs with n > 1: a call sends at most that many
    samples, as max_queued_jobs counts samples), each batch accepted whole or not at all.
    ``submitted``: the ids accepted so far; ``in_flight``: those of a batch sent whose answer
    has not come back (after an interrupt the scheduler may or may not have accepted it).
    ``on_wait(status)`` is called once a wait for room in a full queue has lasted
    WAIT_REPORT_S, so a long wait is not silent; then again at the next such wait. ``hold``:
    the scheduler holds the results for this process until it reads them."""

    def __init__(self, client: Client, specs: Sequence[tuple], batch_size: int,
                 on_wait: Callable[[dict], None] | None = None, hold: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.submitted: list[str] = []
        self.in_flight: list[str] = []
        self._client = client
        self._specs = specs
        self._batch_size = batch_size
        self._fits = batch_size
        self._on_wait = on_wait
        self._hold = hold

    @property
    def total(self) -> int:
        return len(self._specs)

    @property
    def done(self) -> bool:
        return len(self.submitted) == self.total

    def check_all(self) -> None:
        """Have the scheduler check every job, a batch at a time, before any is sent: a bad job
        raises InvalidRequestError (naming it) with nothing submitted."""
        for first in range(0, self.total, self._batch_size):
            self._client._call("check_many", list(self._specs[first:first + self._batch_size]),
                               first)

    def send_batch(self, wait_for_room: bool) -> None:
        """Send the next batch. A full queue raises OverloadedError unless ``wait_for_room``:
        then wait until jobs finish and send what fits (still an OverloadedError if no worker
        is serving, as the queue would never drain)."""
        while True:
            first = len(self.submitted)
            specs = self._next_batch(first)
            self.in_flight = [spec[-1] for spec in specs]
            try:
                accepted = self._client._submit_batch(list(specs), first, self._hold)
            except OverloadedError as exc:
                self.in_flight = []  # refused whole
                if not wait_for_room or isinstance(exc, UnavailableError) or (
                        len(specs) == 1 and isinstance(exc, BatchTooLargeError)):
                    raise  # e.g. a draining daemon: it has room but will not take them
                self._fits, limit = self._room_when_free(exc, _samples(specs[0]))
                self._batch_size = min(self._batch_size, limit)  # a bigger one never fits
                continue
            except InvalidRequestError:
                self.in_flight = []  # refused whole
                raise
            self.submitted += accepted
            self.in_flight = []
            self._fits = self._batch_size
            return

    def _next_batch(self, first: int) -> Sequence[tuple]:
        """The jobs from ``first`` on whose samples fit the batch and the room last seen (the
        first job in any case)."""
        room, end, samples = min(self._batch_size, self._fits), first, 0
        while end < self.total and (end == first or samples + _samples(self._specs[end]) <= room):
            samples += _samples(self._specs[end])
            end += 1
        return self._specs[first:end]

    def _room_when_free(self, full: OverloadedError, needed: int) -> tuple[int, int]:
        """Wait until the scheduler's queue has room for ``needed`` samples; returns how many
        fit now, and in all (``max_queued_jobs``). Raises ``full`` if no worker is ready to
        drain the queue."""
        report_at = time.monotonic() + WAIT_REPORT_S
        while True:
            time.sleep(ROOM_POLL_S)
            status = self._client.status()
            if not any(w.get("ready") for w in status["workers"]):
                raise full
            room = status["max_queued_jobs"] - status["samples_unfinished"]
            if room >= needed:
                return room, status["max_queued_jobs"]
            if self._on_wait is not None and time.monotonic() >= report_at:
                self._on_wait(status)
                report_at = float("inf")


def _samples(spec: tuple) -> int:
    return spec[1].get("n", 1)


class PacedSubmit:
    """Iterating yields the job ids in input order, submitting at most half
    ``max_finished_jobs`` past the one handed out: the scheduler holds their results for this
    process until it reads them (past max_finished_jobs too, whatever other clients submit),
    and that window bounds what it holds for one submit. Job i waits for room in the queue if
    need be; the jobs after it are sent while the queue has room, so the workers stay busy
    while the reader waits for job i.
    ``submitted`` and ``in_flight`` as BatchSubmitter's, for withdrawing the jobs after an
    error or an interrupt."""

    def __init__(self, submitter: BatchSubmitter, max_finished_jobs: int) -> None:
        self._submitter = submitter
        # half the finished jobs kept: a reader up to that far behind loses none
        self._ahead = max(1, max_finished_jobs // 2)
        self._reading = 0  # the first job of the chunk handed out last
        self._full_at = float("-inf")  # when a send ahead last found the queue full

    @property
    def submitted(self) -> list[str]:
        return self._submitter.submitted

    @property
    def in_flight(self) -> list[str]:
        return self._submitter.in_flight

    def __len__(self) -> int:
        return self._submitter.total

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks(1):
            yield chunk[0]

    def chunks(self, size: int) -> Iterator[list[str]]:
        """The ids in order, several at a time: the next one (sent when room is found) and
        those after it that are already sent, ``size`` at most."""
        first = 0
        while first < len(self):
            while len(self.submitted) <= first:
                self._submitter.send_batch(wait_for_room=True)
            self._reading = first
            self.send_ahead()
            chunk = self.submitted[first:first + size]
            first += len(chunk)
            yield chunk

    def send_ahead(self) -> None:
        """Send batches, without waiting for room, up to the window past the jobs being read;
        a reader that waits long on one job calls it now and then, so that the workers are not
        left idle behind it. After the queue is found full, tries again only ROOM_POLL_S later."""
        if time.monotonic() - self._full_at < ROOM_POLL_S:
            return
        while not self._submitter.done and len(self.submitted) < self._reading + self._ahead:
            try:
                self._submitter.send_batch(wait_for_room=False)
            except UnavailableError:
                raise
            except OverloadedError:
                self._full_at = time.monotonic()
                return

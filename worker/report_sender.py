"""A worker's step reports to the scheduler, one call in flight: while the scheduler has not
taken the last report, the outputs of the steps after it wait and then go in one call."""
from __future__ import annotations

import time
from typing import Callable

import ray

from worker.output import pack_outputs

REPORT_POLL_S = 0.005  # how soon an idle worker first looks again whether the call returned


def call_returned(ref) -> bool:
    """Whether a call has returned (or failed), without waiting. ~0.05 ms; watching the call
    through ``ref.future()`` cost its worker 0.15 ms per step in a thread switch."""
    ready, _ = ray.wait([ref], timeout=0, fetch_local=False)
    return bool(ready)


class ReportSender:
    """Used by the worker's engine thread only.

    A scheduler that keeps up (the usual case: a report takes it well under a millisecond,
    a step takes tens) gets one report per step, as soon as the step ends. One that falls
    behind (many workers, a burst of finished jobs, a pause) gets fewer, larger reports
    instead of a queue of calls that grows as long as it stays behind; each sample's
    outputs still arrive in step order.
    """

    def __init__(self, scheduler, worker_id: str,
                 returned: Callable[[object], bool] = call_returned,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._scheduler = scheduler
        self._worker_id = worker_id
        self._returned = returned
        self._clock = clock
        self._in_flight = None  # the last report call
        self._sent_at = 0.0  # when it was made (clock())
        self._outputs: list = []
        self._rejected: list = []
        self._load: dict | None = None
        self._reported_load: dict | None = None
        self.sent = 0  # numbers each report: the scheduler applies them in this order

    def add(self, outputs: list, rejected: list, load: dict) -> None:
        """One step's outputs and refused adds, and the load after it."""
        self._outputs += outputs
        self._rejected += rejected
        self._load = load

    def send(self, even_in_flight: bool = False) -> bool:
        """Send what waits, unless nothing does (an idle worker still reports while its load
        changes: its tokens/s falls to 0 as its last steps leave the rate window) or the last
        call is still in flight (``even_in_flight``: send anyway, as the worker stops).
        Returns whether something is left waiting."""
        if not (self._outputs or self._rejected or self._load != self._reported_load):
            return False
        if (not even_in_flight and self._in_flight is not None
                and not self._returned(self._in_flight)):
            return True
        self._in_flight = self._scheduler.report.remote(
            self._worker_id, self.sent, pack_outputs(self._outputs), self._rejected, self._load)
        self._sent_at = self._clock()
        self.sent += 1
        self._reported_load = self._load
        self._outputs, self._rejected = [], []
        return False

    def poll_s(self, idle_s: float) -> float:
        """How long an idle worker whose report waits may wait for commands before it looks
        again whether the call in flight returned: REPORT_POLL_S at first, then a quarter of
        how long the call has been in flight (what waits is then late by at most a quarter
        more), up to ``idle_s``. Every 5 ms throughout, a scheduler stalled for seconds had
        each idle worker spend ~3% of a core looking."""
        return min(idle_s, max(REPORT_POLL_S, (self._clock() - self._sent_at) / 4))

"""Suspects of an engine failure: the samples a worker held when its engine raised. They run
again one at a time, so that a job that makes engines fail is found and failed alone while the
jobs that only shared its batch go on."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from scheduler.jobs import JobState, SampleState


@dataclass(slots=True)
class Quarantine:
    """Suspects wait in ``waiting``; one at a time is released to run among unsuspected work.
    It is cleared once it has produced a token (or finished); if an engine fails while it is
    the one released, it is the culprit."""

    waiting: collections.deque = field(default_factory=collections.deque)
    released: tuple[JobState, SampleState, int] | None = None  # with its tokens at release

    def __len__(self) -> int:
        return len(self.waiting) + (self.released is not None)

    def hold(self, suspects: list[tuple[JobState, SampleState]]) -> None:
        self.waiting.extend(suspects)

    def take_culprit(self, failed: list[tuple[JobState, SampleState]]
                     ) -> tuple[JobState, SampleState] | None:
        """The released suspect, if it is among the samples of a failed engine (then no longer
        released)."""
        if self.released is None:
            return None
        job, sample, _ = self.released
        if not any(s is sample for _, s in failed):
            return None
        self.released = None
        return job, sample

    def release(self) -> tuple[JobState, SampleState] | None:
        """The next suspect to run, if none is released now; finished ones are dropped."""
        while self.released is None and self.waiting:
            job, sample = self.waiting.popleft()
            if not sample.finished:
                self.released = (job, sample, len(sample.token_ids))
                return job, sample
        return None

    def cleared(self, job: JobState) -> bool:
        """Whether ``job``'s change clears the released suspect: it made progress or ended."""
        if self.released is None or self.released[0] is not job:
            return False
        _, sample, tokens_at_release = self.released
        if sample.finished or len(sample.token_ids) > tokens_at_release:
            self.released = None
            return True
        return False

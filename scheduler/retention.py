"""Which finished jobs the scheduler keeps for their results: the latest ``max_jobs`` of those
not held for a reader, and past ``max_bytes`` of results, fewer, forgetting first those already
read."""
from __future__ import annotations

import collections
import itertools


class FinishedJobs:
    """Finished job ids, oldest first, with the rough bytes each one's results take. ``add``,
    ``mark_read`` and ``release`` return the ids to forget now: the oldest not held past
    ``max_jobs``, then, while the total passes ``max_bytes``, the ones read longest ago. A
    held job (its submitter reads it next, see Client.submit_paced) is not forgotten and not
    counted until it is read or released, and then counts as the newest; a job nobody has
    read is only forgotten by count."""

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._bytes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._loose: collections.OrderedDict[str, None] = collections.OrderedDict()  # not held
        self._read: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._bytes)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._bytes

    @property
    def held(self) -> int:
        return len(self._bytes) - len(self._loose)

    def newest(self, limit: int) -> list[str]:
        return list(itertools.islice(reversed(self._bytes), max(0, limit)))

    def add(self, job_id: str, size: int, held: bool = False) -> list[str]:
        self._bytes[job_id] = size
        self.total_bytes += size
        if not held:
            self._loose[job_id] = None
        return self._over_limits()

    def mark_read(self, job_id: str) -> list[str]:
        if job_id not in self._bytes or job_id in self._read:
            return []
        self._read[job_id] = None
        self._loose.setdefault(job_id)  # no longer held, if it was
        return self._over_limits()

    def release(self, job_id: str) -> list[str]:
        """The job is no longer held, unread (its reader is gone)."""
        if job_id not in self._bytes or job_id in self._loose:
            return []
        self._loose[job_id] = None
        return self._over_limits()

    def _over_limits(self) -> list[str]:
        forgotten = []
        while len(self._loose) > self.max_jobs:
            forgotten.append(self._forget(next(iter(self._loose))))
        while self.total_bytes > self.max_bytes and self._read:
            forgotten.append(self._forget(next(iter(self._read))))
        return forgotten

    def _forget(self, job_id: str) -> str:
        self.total_bytes -= self._bytes.pop(job_id)
        self._loose.pop(job_id, None)
        self._read.pop(job_id, None)
        return job_id

"""Which finished jobs the scheduler keeps for their results: the latest ``max_jobs``, and past
``max_bytes`` of results, fewer, forgetting first those already read."""
from __future__ import annotations

import collections
import itertools


class FinishedJobs:
    """Finished job ids, oldest first, with the rough bytes each one's results take. ``add``
    and ``mark_read`` return the ids to forget now: the oldest past ``max_jobs``, then, while
    the total passes ``max_bytes``, the ones read longest ago. A job nobody has read is only
    forgotten by count, so a reader that keeps up (Client.submit_paced) loses none."""

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._bytes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._read: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._bytes)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._bytes

    def newest(self, limit: int) -> list[str]:
        return list(itertools.islice(reversed(self._bytes), max(0, limit)))

    def add(self, job_id: str, size: int) -> list[str]:
        self._bytes[job_id] = size
        self.total_bytes += size
        return self._over_limits()

    def mark_read(self, job_id: str) -> list[str]:
        if job_id not in self._bytes or job_id in self._read:
            return []
        self._read[job_id] = None
        return self._over_limits()

    def _over_limits(self) -> list[str]:
        forgotten = []
        while len(self._bytes) > self.max_jobs:
            forgotten.append(self._forget(next(iter(self._bytes))))
        while self.total_bytes > self.max_bytes and self._read:
            forgotten.append(self._forget(next(iter(self._read))))
        return forgotten

    def _forget(self, job_id: str) -> str:
        self.total_bytes -= self._bytes.pop(job_id)
        self._read.pop(job_id, None)
        return job_id

"""The client processes that wait on the scheduler, hold results for themselves or own jobs,
each known by a token it owns (which the scheduler watches to see it die): their open waiting
calls, to end, the jobs they hold, to let go, and the jobs they own, to abort, when one dies."""
from __future__ import annotations

import collections


class JobsByCaller:
    """Job ids, each under the key of one caller."""

    def __init__(self) -> None:
        self._jobs: collections.defaultdict[str, set] = collections.defaultdict(set)
        self._caller: dict[str, str] = {}  # job id -> its caller's key

    def add(self, key: str, job_ids: list[str]) -> None:
        self._jobs[key].update(job_ids)
        self._caller.update(dict.fromkeys(job_ids, key))

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._caller

    def remove(self, job_id: str) -> str | None:
        """Take the job out; returns its caller's key (None if it had none)."""
        key = self._caller.pop(job_id, None)
        if key is not None:
            self._jobs[key].discard(job_id)
        return key

    def has_any(self, key: str) -> bool:
        return bool(self._jobs.get(key))

    def pop_caller(self, key: str) -> set:
        jobs = self._jobs.pop(key, set())
        for job_id in jobs:
            del self._caller[job_id]
        return jobs


class Callers:
    """Per caller key, its token, the asyncio tasks of its open waiting calls, the ids of the
    jobs it holds until it reads them and of those it owns (aborted when it dies: nobody else
    reads them). A caller is forgotten once it has none of these."""

    def __init__(self) -> None:
        self._tokens: dict[str, object] = {}
        self._calls: collections.defaultdict[str, set] = collections.defaultdict(set)
        self._held = JobsByCaller()
        self._owned = JobsByCaller()

    def watched(self) -> list[tuple[str, object]]:
        """(key, token) of every caller known now, to look at whether it still lives."""
        return list(self._tokens.items())

    def open_call(self, token, task: object) -> None:
        key = self._known(token)
        self._calls[key].add(task)

    def close_call(self, token, task: object) -> None:
        key = _key(token)
        self._calls[key].discard(task)
        self._forget_if_idle(key)

    def hold(self, token, job_ids: list[str]) -> None:
        self._held.add(self._known(token), job_ids)

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    def unhold(self, job_id: str) -> None:
        self._forget_if_idle(self._held.remove(job_id))

    def own(self, token, job_ids: list[str]) -> None:
        self._owned.add(self._known(token), job_ids)

    def disown(self, job_id: str) -> None:
        self._forget_if_idle(self._owned.remove(job_id))

    def forget(self, key: str) -> tuple[set, set, set]:
        """Forget a caller (its process is gone); returns the tasks of its open calls and the
        ids of the jobs it held and of those it owned."""
        self._tokens.pop(key, None)
        return (self._calls.pop(key, set()), self._held.pop_caller(key),
                self._owned.pop_caller(key))

    def _known(self, token) -> str:
        key = _key(token)
        self._tokens.setdefault(key, token)
        return key

    def _forget_if_idle(self, key: str | None) -> None:
        if key is not None and not (self._calls.get(key) or self._held.has_any(key)
                                    or self._owned.has_any(key)):
            self.forget(key)


def _key(token) -> str:
    """A caller's key: its token's object id (``ObjectRef.hex()``)."""
    return token.hex()

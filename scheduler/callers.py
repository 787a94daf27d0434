"""The client processes that wait on the scheduler or hold results for themselves, each known by
a token it owns (which the scheduler watches to see it die): their open waiting calls, to end,
and the jobs they hold, to let go, when one dies."""
from __future__ import annotations

import collections


class Callers:
    """Per caller key, its token, the asyncio tasks of its open waiting calls and the ids of
    the jobs it holds until it reads them. A caller is forgotten once it has neither."""

    def __init__(self) -> None:
        self._tokens: dict[str, object] = {}
        self._calls: collections.defaultdict[str, set] = collections.defaultdict(set)
        self._holds: collections.defaultdict[str, set] = collections.defaultdict(set)
        self._holder: dict[str, str] = {}  # job id -> the key of the caller holding it

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
        key = self._known(token)
        self._holds[key].update(job_ids)
        self._holder.update(dict.fromkeys(job_ids, key))

    def holds(self, job_id: str) -> bool:
        return job_id in self._holder

    def unhold(self, job_id: str) -> None:
        key = self._holder.pop(job_id, None)
        if key is not None:
            self._holds[key].discard(job_id)
            self._forget_if_idle(key)

    def forget(self, key: str) -> tuple[set, set]:
        """Forget a caller (its process is gone); returns the tasks of its open calls and the
        ids of the jobs it held."""
        self._tokens.pop(key, None)
        held = self._holds.pop(key, set())
        for job_id in held:
            del self._holder[job_id]
        return self._calls.pop(key, set()), held

    def _known(self, token) -> str:
        key = _key(token)
        self._tokens.setdefault(key, token)
        return key

    def _forget_if_idle(self, key: str) -> None:
        if not self._calls.get(key) and not self._holds.get(key):
            self.forget(key)


def _key(token) -> str:
    """A caller's key: its token's object id (``ObjectRef.hex()``)."""
    return token.hex()

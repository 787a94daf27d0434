"""The token a client process lends the scheduler with the calls that wait on jobs or leave
jobs in its care: an object the process owns, which Ray fails once the process dies, so the
scheduler can see it gone (scheduler/callers.py). The process holds it only while such calls
run: a Ray driver that owns an object in its node's object store is ended by Ray itself, at
once and with no word, when that node stops (`ray stop`), before `pagedserve serve` can say
that the cluster went away."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import ray


class CallerToken:
    """``with token.lent() as caller:`` gives ``[token]`` to send with the calls it covers:
    one object for calls that overlap, a new one once none runs. Dropping it then loses
    nothing: the scheduler keeps the token alive while it holds results or jobs for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: list | None = None
        self._lent = 0

    @contextlib.contextmanager
    def lent(self) -> Iterator[list]:
        with self._lock:
            if self._token is None:
                self._token = [ray.put(None)]
            self._lent += 1
            token = self._token
        try:
            yield token
        finally:
            with self._lock:
                self._lent -= 1
                if not self._lent:
                    self._token = None

"""SharedLookup: one lookup of the scheduler at a time, its answer shared by concurrent callers."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future


class SharedLookup:
    """Calling it calls ``find`` (which returns the scheduler's handle, or None when there is
    none), once for all callers that arrive while a call is in flight: they wait for its
    answer, or its exception. A None also answers the callers that arrive within
    ``down_for_s`` after it. A handle answers only the callers that waited on its call: the
    actor may be taken down at any moment, and a caller handed a dead handle waits it out."""

    def __init__(self, find: Callable[[], object | None], down_for_s: float) -> None:
        self._find = find
        self._down_for_s = down_for_s
        self._lock = threading.Lock()
        self._in_flight: Future | None = None
        self._down_at: float | None = None  # when a call last found none

    def __call__(self) -> object | None:
        with self._lock:
            if self.found_down():
                return None
            call, mine = self._in_flight, self._in_flight is None
            if mine:
                call = self._in_flight = Future()
        if mine:
            self._run(call)
        return call.result()

    def found_down(self) -> bool:
        """Whether a call found none less than ``down_for_s`` ago."""
        down_at = self._down_at
        return down_at is not None and time.monotonic() - down_at < self._down_for_s

    def _run(self, call: Future) -> None:
        try:
            found = self._find()
        except BaseException as exc:  # an interrupt too: the waiters must not wait forever
            self._settle(down=False)
            call.set_exception(exc)
            return
        self._settle(down=found is None)
        call.set_result(found)

    def _settle(self, down: bool) -> None:
        # before the answer is set: a caller arriving later starts a call of its own
        with self._lock:
            self._in_flight = None
            self._down_at = time.monotonic() if down else None

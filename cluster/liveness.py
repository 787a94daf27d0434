"""Tells a scheduler that is stuck (or stopped) from one that is only slow to finish the jobs
a call waits for: one ping loop per client (per blocked thread, in blocking code), running only
while such calls wait."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import ray

MAX_CHECK_S = 5.0  # how often waits look at the last answer, and the pings go out


class Liveness:
    """``wait`` awaits a call that may rightly take long, and gives up on it once the
    scheduler has answered no ping for ``timeout_s()`` meanwhile (or awaits, with a timeout of
    its own, one that should answer soon); any wait ends at once when ``gone()`` has an error.
    All are read when used: the scheduler's handle changes when it restarts, and the client's
    timeout may change."""

    def __init__(self, scheduler: Callable[[], object], timeout_s: Callable[[], float],
                 gone: Callable[[], Exception | None] = lambda: None) -> None:
        self._scheduler = scheduler
        self._timeout_s = timeout_s
        self._gone = gone  # the error to end every wait with at once, once there is one
        self._last_answer = time.monotonic()
        self._waiting = 0
        self._pinger: asyncio.Task | None = None

    def answered(self) -> None:
        self._last_answer = time.monotonic()

    @property
    def check_s(self) -> float:
        return min(MAX_CHECK_S, self._timeout_s() / 4)

    async def wait(self, call: Awaitable, silent: Callable[[], Exception] | None = None,
                   timeout: float | None = None):
        """The call's result (or its exception). With ``silent``: raises ``silent()`` instead
        once the scheduler has not answered for ``timeout_s`` (pinged meanwhile); with
        ``timeout``: asyncio.TimeoutError after that long; and ``gone()`` as soon as there is
        one. The call is left to itself."""
        if (gone := self._gone()) is not None:
            raise gone
        task = asyncio.ensure_future(call)
        deadline = None if timeout is None else time.monotonic() + timeout
        if silent is not None:
            self._start_pinging()
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait(
                    {task}, timeout=self.check_s if left is None else min(left, self.check_s))
                if done:
                    return task.result()
                if silent is not None and time.monotonic() - self._last_answer > self._timeout_s():
                    raise silent()
                if (gone := self._gone()) is not None:
                    raise gone
        finally:
            if silent is not None:
                self._waiting -= 1
            task.cancel()

    def _start_pinging(self) -> None:
        self._waiting += 1
        if self._pinger is None or self._pinger.done():
            self.answered()  # nothing known yet: the scheduler gets timeout_s from now
            self._pinger = asyncio.get_running_loop().create_task(self._ping_while_waited())

    def block(self, waitable, silent: Callable[[], Exception]) -> None:
        """``wait`` for blocking code: returns once ``waitable`` (an ObjectRef, or the next item
        of an ObjectRefGenerator) is ready; raises ``silent()`` once the scheduler has answered
        no ping for ``timeout_s`` meanwhile. It pings only while it waits, from this thread."""
        last_answer = time.monotonic()
        while True:
            if (gone := self._gone()) is not None:
                raise gone
            if ray.wait([waitable], timeout=self.check_s)[0]:
                return
            if self._ping_answered():
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > self._timeout_s():
                raise silent()

    def _ping_answered(self) -> bool:
        try:
            ray.get(self._scheduler().ping.remote(), timeout=self.check_s)
        except Exception:  # noqa: BLE001 - no answer this time (or a restart): judged by time
            return False
        self.answered()
        return True

    async def _ping_while_waited(self) -> None:
        while self._waiting:
            try:
                await asyncio.wait_for(self._scheduler().ping.remote(), self.check_s)
                self.answered()
            except Exception:  # no answer this time (or a restart): the waits judge by time
                pass
            await asyncio.sleep(self.check_s)

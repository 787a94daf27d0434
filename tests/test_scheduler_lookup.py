"""SharedLookup with a real find function held in flight by an Event: concurrent callers share
one call, a None serves a short window, exceptions reach every waiter, handles are not kept."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.scheduler_lookup import SharedLookup

WINDOW_S = 0.3


class Find:
    """Counts its calls; each waits for ``release`` and then answers ``answer`` (raises it if
    it is an exception)."""

    def __init__(self, answer=None):
        self.answer = answer
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self):
        self.calls += 1
        self.started.set()
        assert self.release.wait(10), "never released"
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def wait_for_waiters(lookup, count: int) -> None:
    """Until ``count`` callers wait on the call in flight (the Future's own condition keeps a
    lock per waiter: a fixed sleep could end before a slow thread got there)."""
    deadline = time.monotonic() + 30
    while len(lookup._in_flight._condition._waiters) < count:
        assert time.monotonic() < deadline, "the callers never waited on the call in flight"
        time.sleep(0.01)


def in_flight(lookup, find, callers):
    """``callers`` threads calling ``lookup`` while ``find`` is held in flight, then released."""
    pool = ThreadPoolExecutor(callers)
    first = pool.submit(lookup)
    assert find.started.wait(10)
    rest = [pool.submit(lookup) for _ in range(callers - 1)]
    wait_for_waiters(lookup, callers - 1)
    find.release.set()
    pool.shutdown(wait=True)
    return [first, *rest]


def test_concurrent_callers_share_one_call_and_its_handle():
    handle = object()
    find = Find(handle)
    lookup = SharedLookup(find, WINDOW_S)
    answers = in_flight(lookup, find, 20)
    assert find.calls == 1
    assert all(answer.result() is handle for answer in answers)


def test_asyncio_callers_share_one_call_through_threads():
    find = Find("handle")
    lookup = SharedLookup(find, WINDOW_S)

    async def burst():
        # a thread each: a caller queued for a thread until the call is over makes its own
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(16))
        calls = [asyncio.to_thread(lookup) for _ in range(10)]
        calls.append(asyncio.get_running_loop().run_in_executor(None, lookup))
        gathered = asyncio.gather(*calls)
        await asyncio.to_thread(find.started.wait, 10)
        await asyncio.to_thread(wait_for_waiters, lookup, 10)
        find.release.set()
        return await gathered

    assert asyncio.run(burst()) == ["handle"] * 11
    assert find.calls == 1


def test_a_down_answer_serves_the_window_then_is_looked_up_again():
    find = Find(None)
    find.release.set()
    lookup = SharedLookup(find, WINDOW_S)
    assert lookup() is None and lookup.found_down()
    assert [lookup() for _ in range(50)] == [None] * 50
    assert find.calls == 1
    time.sleep(WINDOW_S + 0.05)
    assert not lookup.found_down()
    find.answer = "back up"
    assert lookup() == "back up"
    assert find.calls == 2 and not lookup.found_down()


def test_an_exception_reaches_every_waiter_and_is_not_kept():
    find = Find(ConnectionError("GCS gone"))
    lookup = SharedLookup(find, WINDOW_S)
    answers = in_flight(lookup, find, 5)
    assert find.calls == 1
    for answer in answers:
        with pytest.raises(ConnectionError, match="GCS gone"):
            answer.result()
    find.answer = "handle"
    assert lookup() == "handle" and find.calls == 2


def test_a_found_handle_is_not_handed_to_later_callers():
    """The actor may be taken down right after: a later caller looks again and finds it gone,
    where a kept handle would have it wait out a dead actor."""
    find = Find("old actor")
    find.release.set()
    lookup = SharedLookup(find, WINDOW_S)
    assert lookup() == "old actor"
    find.answer = None  # `pagedserve down`
    assert lookup() is None
    find.answer = "new actor"  # `up` again: the remembered None lasts only the window
    time.sleep(WINDOW_S + 0.05)
    assert lookup() == "new actor"
    assert find.calls == 3

"""Scheduler streams a client stops reading: cancelled at once, and those still open when the
process exits, since each holds one of the scheduler's max_waiting_calls until its jobs end."""
from __future__ import annotations

import atexit
import contextlib
import types

import ray

_OPEN_STREAMS: set = set()  # of this process


@contextlib.contextmanager
def read_or_cancelled(stream):
    """``with read_or_cancelled(stream) as reading:`` cancels ``stream`` on leaving, unless
    ``reading.ended`` was set (its end was read), and at exit while open. A killed process
    cancels nothing: the scheduler ends its streams once it sees the process gone (see
    Client._caller)."""
    reading = types.SimpleNamespace(ended=False)
    if not _OPEN_STREAMS:  # (again) after ray.init's own exit handler: atexit runs the last first
        atexit.unregister(_cancel_open_streams)
        atexit.register(_cancel_open_streams)
    _OPEN_STREAMS.add(stream)
    try:
        yield reading
    finally:
        _OPEN_STREAMS.discard(stream)
        if not reading.ended:
            _cancel(stream)


def _cancel_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        _cancel(stream)
    _OPEN_STREAMS.clear()


def _cancel(stream) -> None:
    with contextlib.suppress(Exception):  # a scheduler gone took the stream with it
        ray.cancel(stream)

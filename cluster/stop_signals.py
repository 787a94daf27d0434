"""Ctrl-C, SIGTERM and SIGHUP in the CLI: each ends a command as an interrupt, so that what
it queued is withdrawn, and is noted even where a library turned it into another error."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the main thread was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While entered (on the main thread only), the stop signals raise Interrupted; the
    handlers they had come back at exit. ``received``: the last one, even if what it raised
    was caught and turned into something else (numba's first compile, interrupted in a lazy
    import, left numpy half-imported and raised RecursionError)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._deferred = False

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            self.arm()
            _active = self
        return self

    def __exit__(self, *exc_info) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if _active is self:
            _active = None

    def arm(self) -> None:
        for signum in self._previous:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum
        if not self._deferred:
            raise Interrupted(signum)


_active: StopSignals | None = None


def rearm() -> None:
    """Take the stop signals back after ray.init, which installs its own SIGTERM handler
    (an exit with no cleanup, after a crash report)."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        _active.arm()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Stop signals only noted meanwhile: cleanup that a second Ctrl-C must not cut short
    (withdrawing a thousand queued jobs takes seconds)."""
    watcher = _active
    if watcher is not None:
        watcher._deferred = True
    try:
        yield
    finally:
        if watcher is not None:
            watcher._deferred = False

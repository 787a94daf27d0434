"""Progress of long CLI work on stderr: a tqdm bar on a terminal, plain timed lines elsewhere."""
from __future__ import annotations

import sys
import time

# A log or CI console gets a line this often, not tqdm's carriage-return redraws.
LINE_INTERVAL_S = 30.0


def progress(total: int, desc: str, unit: str, stream=None):
    """A context manager with ``update(n=1)``: tqdm when ``stream`` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream, LINE_INTERVAL_S)


class LineProgress:
    """Writes ``desc: done/total units (pct%) after N s`` every ``interval_s`` seconds while
    work goes on, and once at the end of work that took longer than that."""

    def __init__(self, total: int, desc: str, unit: str, stream,
                 interval_s: float = LINE_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.interval_s = interval_s
        self.n = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._write(now)

    def close(self) -> None:
        now = time.monotonic()
        if now - self._start >= self.interval_s and self._last < now:
            self._write(now)

    def _write(self, now: float) -> None:
        self._last = now
        percent = f" ({100 * self.n // self.total}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent} after "
              f"{now - self._start:.0f} s", file=self.stream, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The last lines of this process's log: the file Ray writes an actor process's stderr to."""
from __future__ import annotations

import os

# Ray's own markers at the top of each actor's log file, for its log monitor: not log lines.
_RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:")
_CHUNK_BYTES = 64 * 1024


def own_log_tail(count: int) -> dict:
    """``{"pid", "file", "lines"}``: the last ``count`` lines of this process's stderr file, or
    no file (and no lines) when stderr is not a file (a terminal, or no /proc to find it)."""
    path = stderr_file()
    lines = tail_lines(path, count) if path else []
    return {"pid": os.getpid(), "file": path, "lines": lines}


def stderr_file() -> str | None:
    """The file this process's stderr goes to, or None (a terminal, or no /proc)."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def tail_lines(path: str, count: int) -> list[str]:
    """The last ``count`` lines of a text file, read backwards in chunks, without Ray's marker
    lines; undecodable bytes are replaced."""
    if count <= 0:
        return []
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        data, start = b"", end
        while start > 0 and data.count(b"\n") <= count:
            start = max(0, start - _CHUNK_BYTES)
            f.seek(start)
            data = f.read(end - start)
    lines = data.decode("utf-8", "replace").splitlines()
    if start > 0:
        lines = lines[1:]  # the first may be cut
    lines = [line for line in lines if not line.startswith(_RAY_MARKERS)]
    return lines[-count:]

"""The job journal: an append-only log of accepted and finished jobs, so a restarted scheduler
resumes every job that had not finished and still answers for the results it kept.

File format: the 4-byte magic ``PSJ1``, then one frame per record: a little-endian header of
payload length and CRC-32 (4 bytes each), then the record as a msgpack map. The CRC tells a
complete record from a write cut short by a crash or from stray bytes.

Durability: records are buffered in memory. With ``fsync_interval_s > 0`` a background flusher
thread writes and fsyncs the buffer ``fsync_interval_s`` after the first record that entered it,
so every record is on disk at most that long (plus the fsync) after it was recorded, and a burst
shares one fsync. With ``fsync_interval_s == 0`` every record is written and fsynced before
``record_*`` returns. ``flush()`` forces it at any time.

A write that fails (a full disk) is undone: the file is cut back to its last whole record and
the records stay buffered for the next flush (the flusher retries). ``flush()`` raises a
JournalError, and ``write_error`` says why until a write succeeds. A torn write that cannot be
cut off stays in the file, counted in, and replay skips it.

Recovery: at open the file is replayed up to the last good record; a bad tail (a partial write,
random bytes) is dropped with a logged warning, never an error. A corrupt stretch followed by
good records (a damaged sector) is skipped, with a warning, and the records after it are kept.
A finished record may carry the job's result; the journal keeps it until ``forget_results``
(the scheduler forgets the jobs it no longer keeps), holding only its place in the file, not
the result, in memory. The file is rewritten (compacted) to hold only the unfinished jobs and
the kept results whenever there is a bad tail, a skipped stretch or a dead record to drop, and
again while running once the finished jobs and forgotten results since the last rewrite outnumber
``compact_min_finished`` and twice the live records. A rewrite goes to a temporary
file that is fsynced and renamed over the journal, then the directory is fsynced, so a crash
leaves either the old or the new file. A rewrite at open that fails (a full disk) leaves the
file as it is, its torn tail cut off; only a new journal whose header cannot be written fails.

A lock file next to the journal keeps a second process from writing to it at the same time.
"""
from __future__ import annotations

import fcntl
import logging
import operator
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack

from scheduler.wording import counted

log = logging.getLogger("pagedserve.journal")

MAGIC = b"PSJ1"
FRAME_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload
ACCEPTED, FINISHED, FORGOTTEN = "accepted", "finished", "forgotten"
RECORD_KEY = msgpack.packb("kind")  # every record's first key: where a good frame may start
WRITE_RETRY_S = 1.0  # how often the flusher retries after a failed write (a full disk)
COMPACT_RETRY_S = 60.0  # how long after a failed compaction the next one is tried
# every prompt and kept result is in the file (token ids any copy of the tokenizer reads):
# its owner's alone, as ssh keeps its keys, not 0644 under the usual umask
FILE_MODE = 0o600


class JournalError(OSError):
    """The journal file cannot be used; the message says which file and what to do."""


@dataclass(slots=True)
class JournalJob:
    """An accepted job that has not finished, as the scheduler recorded it."""

    job_id: str
    prompt_token_ids: list[int]
    params: dict
    priority: int = 0
    extra: dict | None = None
    accepted_at: float = 0.0  # time.time() when it was recorded


class Journal:
    """The append-only job log; one writer thread plus the flusher may use it concurrently."""

    def __init__(self, path: str | Path, fsync_interval_s: float = 0.05, *,
                 compact_min_finished: int = 1000) -> None:
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s={fsync_interval_s!r}: must be >= 0")
        self.path = Path(path).expanduser()
        self.fsync_interval_s = float(fsync_interval_s)
        self.compact_min_finished = compact_min_finished
        self._lock = threading.Condition()  # guards the fields below; the flusher waits on it
        self._io_lock = threading.Lock()  # orders file writes; always taken before _lock
        self._jobs: dict[str, JournalJob] = {}  # unfinished, in acceptance order
        self._dead_on_disk = 0  # finished jobs and forgotten results the file still holds
        # job id -> (offset, length) of its finished record with a result, kept; an offset at or
        # past _size is in _pending, at offset - _size
        self._results: dict[str, tuple[int, int]] = {}
        self._replayed_results: dict[str, dict] | None = {}  # until take_replayed_results()
        self._pending = bytearray()  # frames recorded but not yet written
        self._pending_since: float | None = None  # time.monotonic() of the oldest pending frame
        self._closed = False
        self._size = 0  # bytes of whole records in the file
        self._in_flight = 0  # bytes taken from _pending and being written after _size
        self.write_error: str | None = None  # why the last write failed, until one succeeds
        self.replay_problems: list[str] = []  # what the replay at start skipped or dropped
        self._compact_retry_at = 0.0  # time.monotonic() before which no compaction is tried
        if self.path.is_dir():
            raise JournalError(f"journal {self.path} is a directory; set "
                               "scheduler.journal_path to a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal's directory {self.path.parent}: "
                               f"{exc.strerror or exc}") from None
        self._lock_fd = _lock_exclusively(self.path)
        self._file = None
        try:
            self._open()
        except BaseException:
            if self._file is not None:
                self._file.close()
            os.close(self._lock_fd)
            raise
        self._flusher: threading.Thread | None = None
        if self.fsync_interval_s > 0:
            self._flusher = threading.Thread(target=self._run_flusher, daemon=True,
                                             name=f"journal-flusher:{self.path.name}")
            self._flusher.start()

    # -- the scheduler's calls ------------------------------------------------------------------

    def record_accepted(self, job_id: str, prompt_token_ids: list[int], params: dict,
                        priority: int = 0, extra: dict | None = None) -> None:
        """Log a newly accepted job. Jobs replayed at open are already logged: do not re-record."""
        job = _new_job(job_id, prompt_token_ids, params, priority, extra)
        frame = _frame(_accepted_record(job))
        with self._lock:
            self._check_open()
            if job_id in self._jobs:
                raise ValueError(f"job {job_id!r} is already in the journal and unfinished")
            if self._results.pop(job_id, None) is not None:  # as a replay of the file reads it
                self._dead_on_disk += 1
            self._jobs[job_id] = job
            self._append(frame)
        self._flush_now_if_unbuffered()

    def record_finished(self, job_id: str, finish_reason: str, result: dict | None = None
                        ) -> None:
        """Log that a job ended, with its ``result`` (msgpack-able) if it is to be kept; a job
        not unfinished in the journal is ignored."""
        record = {"kind": FINISHED, "job_id": job_id, "finish_reason": str(finish_reason),
                  "finished_at": time.time()}
        if result is not None:
            record["result"] = result
        frame = _frame(record)
        with self._lock:
            self._check_open()
            if self._jobs.pop(job_id, None) is None:
                return
            self._dead_on_disk += 1  # its accept record
            if result is not None:
                end = self._size + self._in_flight + len(self._pending)
                self._results[job_id] = (end, len(frame))
            self._append(frame)
        self._flush_now_if_unbuffered()

    def forget_results(self, job_ids: list[str]) -> None:
        """Drop these jobs' kept results: a reopen no longer hands them over, and the next
        compaction leaves them out."""
        if not job_ids:
            return
        with self._lock:
            self._check_open()
            forgotten = [j for j in job_ids if self._results.pop(j, None) is not None]
            if not forgotten:
                return
            self._dead_on_disk += len(forgotten) + 1  # and the record saying so
            self._append(_frame({"kind": FORGOTTEN, "job_ids": forgotten}))
        self._flush_now_if_unbuffered()

    def take_replayed_results(self) -> dict[str, dict]:
        """The results kept in the file when it was opened, by job id in the order the jobs
        finished; once (the journal then keeps only where they are in the file)."""
        with self._lock:
            replayed, self._replayed_results = self._replayed_results or {}, None
            return replayed

    @property
    def buffered(self) -> bool:
        """Records are waiting to be written."""
        return bool(self._pending)

    def unfinished(self) -> list[JournalJob]:
        """The jobs accepted and not finished (replayed at open plus recorded since), oldest
        first. The objects are the journal's own: read them, do not change them."""
        with self._lock:
            return list(self._jobs.values())

    def flush(self) -> None:
        """Write and fsync every buffered record now (and compact if it is due)."""
        self._write_pending()
        self._compact_if_due()

    def compact(self) -> None:
        """Rewrite the file to hold only the unfinished jobs' accept records and the kept
        results, atomically."""
        with self._io_lock:
            with self._lock:
                self._check_open()
            self._rewrite()

    def close(self) -> None:
        """Flush, stop the flusher and release the file; later calls to record_* raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self._write_pending()
        finally:
            self._file.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"journal {self.path} is closed")

    def _append(self, frame: bytes) -> None:
        """Buffer a frame (caller holds _lock) and wake the flusher on the first one."""
        self._pending += frame
        if self._pending_since is None:
            self._pending_since = time.monotonic()
            self._lock.notify_all()

    def _flush_now_if_unbuffered(self) -> None:
        if self.fsync_interval_s == 0:
            try:
                self.flush()
            except JournalError:  # kept buffered; write_error says why, the next flush retries
                log.warning("journal %s: %s", self.path, self.write_error)

    def _write_pending(self) -> None:
        with self._io_lock:
            with self._lock:
                if self._file.closed:
                    return
                data = bytes(self._pending)
                self._pending.clear()
                since, self._pending_since = self._pending_since, None
                self._in_flight = len(data)
            if not data:
                return
            try:
                _write_all(self._file, data)
                os.fsync(self._file.fileno())
            except OSError as exc:
                self._undo_write(data, since)
                raise self._failed(exc) from None
            with self._lock:
                self._size += len(data)
                self._in_flight = 0
            self.write_error = None

    def _undo_write(self, data: bytes, since: float | None) -> None:
        """Cut a partial write off the file and put its records back in front of the buffer."""
        self._cut_back()
        with self._lock:
            self._pending[:0] = data
            self._in_flight = 0
            self._pending_since = since  # the oldest record is again the first one
            self._lock.notify_all()

    def _cut_back(self) -> None:
        """Cut the file back to its whole records (a torn write, a bad tail). If that fails the
        bytes stay (replay skips them: their CRC fails) and are counted in: the frames still
        buffered will be written that much further on."""
        try:
            os.ftruncate(self._file.fileno(), self._size)
            return
        except OSError:
            size = os.fstat(self._file.fileno()).st_size
        with self._lock:
            shift = size - self._size
            self._results = {job_id: (offset + shift if offset >= self._size else offset, length)
                             for job_id, (offset, length) in self._results.items()}
            self._size = size

    def _failed(self, exc: OSError) -> JournalError:
        self.write_error = f"cannot write {self.path}: {exc.strerror or exc}"
        return JournalError(self.write_error)

    def _compact_if_due(self) -> None:
        with self._io_lock:
            with self._lock:
                dead = self._dead_on_disk
                due = (not self._closed and dead > self.compact_min_finished
                       and dead > 2 * (len(self._jobs) + len(self._results))
                       and time.monotonic() >= self._compact_retry_at)
            if not due:
                return
            try:
                self._rewrite()
            except JournalError as exc:  # the appended log is still whole: go on with it
                log.warning("journal %s: compaction failed, tried again in %s s: %s",
                            self.path, COMPACT_RETRY_S, exc)
                self._compact_retry_at = time.monotonic() + COMPACT_RETRY_S

    def _run_flusher(self) -> None:
        while True:
            with self._lock:
                while not self._closed and self._pending_since is None:
                    self._lock.wait()
                if self._closed:
                    return  # close() writes what is left
                delay = self._pending_since + self.fsync_interval_s - time.monotonic()
                if delay > 0:
                    self._lock.wait(delay)
                    continue
            failing = self.write_error is not None
            try:
                self.flush()
            except OSError as exc:
                if not failing:
                    log.warning("journal %s: %s; retrying every %s s", self.path, exc,
                                WRITE_RETRY_S)
                time.sleep(WRITE_RETRY_S)
                continue
            if failing:
                log.warning("journal %s: written again", self.path)

    def _rewrite(self) -> None:
        """Replace the file by MAGIC + one accept frame per unfinished job + the kept results'
        finished frames, copied; the frames buffered until then are dropped (the tables already
        reflect them). The caller holds _io_lock but not _lock: records go on being buffered
        while the copy is written and fsynced (the scheduler's calls do not wait for it). If
        that fails the old file stays as it was."""
        with self._lock:
            jobs, results = list(self._jobs.values()), list(self._results.items())
            buffered, dead = bytes(self._pending), self._dead_on_disk
        tmp = self.path.with_name(self.path.name + ".tmp")
        content, moved = bytearray(MAGIC), {}
        for job in jobs:
            content += _frame(_accepted_record(job))
        new_file = None
        try:
            for job_id, (offset, length) in results:
                moved[job_id, offset] = len(content)
                content += self._frame_at(offset, length, buffered)
            # opened before the rename, it is the journal once renamed: nothing is left to
            # fail between the rename and appending to the new file
            tmp.unlink(missing_ok=True)  # a crash's leftover keeps its mode: start afresh
            new_file = _open_for_append(tmp)
            _write_all(new_file, content)
            os.fsync(new_file.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if new_file is not None:
                new_file.close()
            tmp.unlink(missing_ok=True)
            raise JournalError(f"cannot rewrite {self.path}: {exc.strerror or exc}") from None
        try:
            _fsync_dir(self.path.parent)
        except OSError as exc:  # the new file is in use either way; a crash may bring back
            log.error("journal %s: the rename of its rewrite may not survive a crash (cannot "
                      "fsync %s: %s)", self.path, self.path.parent, exc.strerror or exc)
        with self._lock:
            shift = len(content) - self._size - len(buffered)  # for results recorded since
            self._results = {job_id: (moved.get((job_id, offset), offset + shift), length)
                             for job_id, (offset, length) in self._results.items()}
            del self._pending[:len(buffered)]
            if not self._pending:
                self._pending_since = None
            self._dead_on_disk -= dead
            self._size = len(content)
            self._file.close()
            self._file = new_file
            if not self._pending:
                self.write_error = None  # everything recorded is on disk

    def _frame_at(self, offset: int, length: int, buffered: bytes) -> bytes:
        """A frame recorded earlier: read back from the file, or from ``buffered``, the
        frames after the file's end."""
        if offset >= self._size:
            return buffered[offset - self._size:offset - self._size + length]
        frame = os.pread(self._file.fileno(), length, offset)
        if len(frame) != length:
            raise OSError(f"short read at byte {offset}")
        return frame

    # -- replay ---------------------------------------------------------------------------------

    def _open(self) -> None:
        """Replay the file into the jobs table, rewrite it if it has anything to drop, and
        open it for appending."""
        data = self.path.read_bytes() if self.path.exists() else b""
        self._file = _open_for_append(self.path)
        os.fchmod(self._file.fileno(), FILE_MODE)  # one an older version left 0644 too
        good_end, problem, skipped = self._replay(data)
        for start, size, reason in skipped:
            self._replay_problem(f"{reason} at byte {start}; skipped {counted(size, 'byte')} to "
                                 "the next good record")
        if problem:
            self._replay_problem(f"{problem} at byte {good_end}; dropped the last "
                                 f"{counted(len(data) - good_end, 'byte')} (a write cut short by "
                                 "a crash?)")
        self._size = good_end
        if problem or skipped or not data or self._dead_on_disk:
            try:
                self._rewrite()
            except JournalError as exc:
                if good_end == 0:  # a new journal whose header cannot be written
                    raise
                log.warning("journal %s: %s; going on with the file as it is", self.path, exc)
                self._cut_back()

    def _replay_problem(self, what: str) -> None:
        log.warning("journal %s: %s", self.path, what)
        self.replay_problems.append(what)

    def _replay(self, data: bytes) -> tuple[int, str | None, list[tuple[int, int, str]]]:
        """Apply every good record. Returns the offset after the last one, what stopped the
        replay there (None: the end of the file), and the (offset, size, reason) of corrupt
        stretches skipped because a good record followed them."""
        pos, skipped = len(MAGIC), []
        if not data.startswith(MAGIC):
            if MAGIC.startswith(data):
                return 0, ("truncated file header" if data else None), []
            pos = _next_good_frame(data, 0)
            if pos is None:  # not a damaged header: another file (or nothing left to save)
                raise JournalError(
                    f"{self.path} is not a pagedserve journal (it does not start with "
                    f"{MAGIC!r}); move it away or set scheduler.journal_path to another file")
            skipped.append((0, pos, "damaged file header"))
        while pos < len(data):
            record, end, problem = _read_frame(data, pos)
            if problem is None:
                try:
                    self._apply(record, pos, end - pos)
                except (ValueError, TypeError, KeyError) as exc:
                    end, problem = pos, f"unreadable record ({exc})"
            if problem is None:
                pos = end
                continue
            resume = _next_good_frame(data, pos + 1)
            if resume is None:
                return pos, problem, skipped
            skipped.append((pos, resume - pos, problem))
            pos = resume
        return pos, None, skipped

    def _apply(self, record: dict, offset: int, length: int) -> None:
        if record["kind"] == ACCEPTED:
            job = _new_job(record["job_id"], record["prompt_token_ids"], record["params"],
                           record["priority"], record["extra"])
            job.accepted_at = float(record["accepted_at"])
            if self._jobs.pop(job.job_id, None) is not None:
                self._dead_on_disk += 1  # a superseded accept is as dead as a finished one
            self._forget_replayed_result(job.job_id)
            self._jobs[job.job_id] = job
        elif record["kind"] == FINISHED:
            job_id, result = record["job_id"], record.get("result")
            if not isinstance(result, (dict, type(None))):
                raise ValueError(f"result of job {job_id!r} is not a map")
            if self._jobs.pop(job_id, None) is not None or result is None:
                self._dead_on_disk += 1  # its accept record, or this record (a stray one)
            self._forget_replayed_result(job_id)
            if result is not None:
                self._results[job_id] = (offset, length)
                self._replayed_results[job_id] = result
        elif record["kind"] == FORGOTTEN:
            for job_id in record["job_ids"]:
                self._forget_replayed_result(job_id)
            self._dead_on_disk += 1
        else:
            raise ValueError(f"unknown record kind {record['kind']!r}")


    def _forget_replayed_result(self, job_id: str) -> None:
        """A job id seen again in the file: its earlier result is dead."""
        if self._results.pop(job_id, None) is not None:
            del self._replayed_results[job_id]
            self._dead_on_disk += 1


def _read_frame(data: bytes, pos: int) -> tuple[dict | None, int, str | None]:
    """(record, offset after it, None) for the good frame at ``pos``, else (None, pos, what
    is wrong with it)."""
    if len(data) - pos < FRAME_HEADER.size:
        return None, pos, "truncated record header"
    length, crc = FRAME_HEADER.unpack_from(data, pos)
    end = pos + FRAME_HEADER.size + length
    if end > len(data):
        return None, pos, "truncated record"
    payload = data[pos + FRAME_HEADER.size:end]
    if zlib.crc32(payload) != crc:
        return None, pos, "record checksum mismatch"
    try:
        record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        return None, pos, f"unreadable record ({exc})"
    if not isinstance(record, dict):
        return None, pos, "unreadable record (not a map)"
    return record, end, None


def _next_good_frame(data: bytes, start: int) -> int | None:
    """The offset of the first good frame at or after ``start``. Every record is a msgpack
    map whose first key is "kind", so only the places where that key is found are tried."""
    key_at = FRAME_HEADER.size + 1  # after the frame header and the map's type byte
    found = data.find(RECORD_KEY, start + key_at)
    while found != -1:
        candidate = found - key_at
        if _read_frame(data, candidate)[2] is None:
            return candidate
        found = data.find(RECORD_KEY, found + 1)
    return None


def _new_job(job_id: object, prompt_token_ids: object, params: object, priority: object,
             extra: object) -> JournalJob:
    """A JournalJob from caller or file input, with types checked (ValueError otherwise)."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id={job_id!r}: must be a non-empty string")
    if not isinstance(params, dict) or not (extra is None or isinstance(extra, dict)):
        raise ValueError("params must be a dict and extra a dict or None")
    try:
        token_ids = [operator.index(t) for t in prompt_token_ids]
        priority = operator.index(priority)
    except TypeError:
        raise ValueError("prompt_token_ids must be a list of ints and priority an int") from None
    return JournalJob(job_id, token_ids, dict(params), priority,
                      None if extra is None else dict(extra), time.time())


def _accepted_record(job: JournalJob) -> dict:
    return {"kind": ACCEPTED, "job_id": job.job_id, "prompt_token_ids": job.prompt_token_ids,
            "params": job.params, "priority": job.priority, "extra": job.extra,
            "accepted_at": job.accepted_at}


def _frame(record: dict) -> bytes:
    try:
        payload = msgpack.packb(record, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"journal record for job {record.get('job_id')!r} is not serialisable "
                         f"(params and extra may hold only dicts, lists, str, bytes, numbers, "
                         f"bools and None): {exc}") from None
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _open_for_append(path: Path):
    """Unbuffered appends, and reads (of kept results, when compacting)."""
    return open(path, "a+b", buffering=0,
                opener=lambda name, flags: os.open(name, flags, FILE_MODE))


def _lock_exclusively(path: Path) -> int:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(f"journal {path} is in use by another process (a second scheduler?); "
                           f"stop it, or set scheduler.journal_path to another file") from None
    return fd


def _write_all(file, data: bytes) -> None:
    """Write every byte to an unbuffered file (a raw write may take only part of them)."""
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

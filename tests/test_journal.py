"""Job journal: round trips, resume after reopen, damaged tails, compaction, batched fsync."""
from __future__ import annotations

import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.journal import FRAME_HEADER, MAGIC, Journal, JournalError


def ids(journal: Journal) -> list[str]:
    return [job.job_id for job in journal.unfinished()]


def count_frames(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    pos, frames = len(MAGIC), 0
    while pos < len(data):
        length, _ = FRAME_HEADER.unpack_from(data, pos)
        pos += FRAME_HEADER.size + length
        frames += 1
    assert pos == len(data)
    return frames


def reopened_copy(path: Path, tmp_path: Path) -> list[str]:
    """What a scheduler restarted from the file's current bytes would resume."""
    copy = tmp_path / f"copy-{time.monotonic_ns()}.journal"
    shutil.copyfile(path, copy)
    with Journal(copy, fsync_interval_s=0) as journal:
        return ids(journal)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.journal"


def test_round_trip_keeps_every_field(path):
    rng = random.Random(1)
    jobs = [(f"job-{i}", [rng.randrange(50_000) for _ in range(rng.randrange(1, 40))],
             {"max_tokens": i + 1, "temperature": 0.5 * i, "stop": ["\n"], "seed": None},
             rng.randrange(-3, 3), None if i % 2 else {"tenant": f"t{i}", "salt": b"\x00\x01"})
            for i in range(5)]
    with Journal(path) as journal:
        for job in jobs:
            journal.record_accepted(*job)
        live = [(j.job_id, j.prompt_token_ids, j.params, j.priority, j.extra)
                for j in journal.unfinished()]
    assert live == jobs
    with Journal(path) as journal:
        resumed = journal.unfinished()
    assert [(j.job_id, j.prompt_token_ids, j.params, j.priority, j.extra)
            for j in resumed] == jobs
    assert all(j.accepted_at > 0 for j in resumed)


def test_finished_jobs_are_gone_after_reopen_and_order_is_kept(path):
    with Journal(path) as journal:
        for i in range(10):
            journal.record_accepted(f"j{i}", [i, i + 1], {})
        for i in (0, 3, 4, 9):
            journal.record_finished(f"j{i}", "stop")
        journal.record_finished("never-accepted", "abort")  # ignored
        expected = ids(journal)
    assert expected == [f"j{i}" for i in (1, 2, 5, 6, 7, 8)]
    with Journal(path) as journal:
        assert ids(journal) == expected
        journal.record_accepted("late", [1], {})
        journal.record_finished("j5", "length")
    with Journal(path) as journal:
        assert ids(journal) == [e for e in expected if e != "j5"] + ["late"]
    assert count_frames(path) == len(expected)  # compacted at open: only unfinished accepts


def test_records_reach_disk_within_the_fsync_interval_without_flush(path, tmp_path):
    with Journal(path, fsync_interval_s=0.02) as journal:
        journal.record_accepted("a", [1, 2, 3], {})
        journal.record_accepted("b", [4], {})
        deadline = time.monotonic() + 5
        while reopened_copy(path, tmp_path) != ["a", "b"]:
            assert time.monotonic() < deadline, "the flusher never wrote the records"
            time.sleep(0.01)


def test_zero_interval_writes_before_record_returns(path, tmp_path):
    with Journal(path, fsync_interval_s=0) as journal:
        journal.record_accepted("a", [1], {})
        assert reopened_copy(path, tmp_path) == ["a"]
        journal.record_finished("a", "stop")
        assert reopened_copy(path, tmp_path) == []


def test_flush_forces_buffered_records_out(path, tmp_path):
    with Journal(path, fsync_interval_s=60) as journal:
        journal.record_accepted("a", [1], {})
        assert reopened_copy(path, tmp_path) == []
        journal.flush()
        assert reopened_copy(path, tmp_path) == ["a"]


def _journal_bytes_with_last_record(path: Path, last: str) -> tuple[bytes, bytes]:
    """(file bytes before the last record, that record's frame)."""
    with Journal(path, fsync_interval_s=0) as journal:
        journal.record_accepted("a", list(range(20)), {"max_tokens": 8})
        journal.record_accepted("b", [7, 8, 9], {"temperature": 0.0}, extra={"x": 1})
    before = path.read_bytes()
    with Journal(path, fsync_interval_s=0) as journal:
        if last == "accepted":
            journal.record_accepted("c", [1, 2, 3, 4], {"seed": 3})
        else:
            journal.record_finished("b", "stop")
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    return before, after[len(before):]


@pytest.mark.parametrize("last", ["accepted", "finished"])
def test_a_truncated_last_record_is_skipped_at_every_byte_offset(tmp_path, caplog, last):
    before, frame = _journal_bytes_with_last_record(tmp_path / "source.journal", last)
    for cut in range(len(frame)):
        path = tmp_path / f"cut-{last}-{cut}.journal"
        path.write_bytes(before + frame[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pagedserve.journal"):
            with Journal(path, fsync_interval_s=0) as journal:
                assert ids(journal) == ["a", "b"], cut
                journal.record_accepted("d", [5], {})
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warned) == (cut > 0), cut
        with Journal(path, fsync_interval_s=0) as journal:
            assert ids(journal) == ["a", "b", "d"], cut


def test_a_corrupted_byte_in_the_last_record_is_caught_by_the_checksum(tmp_path, caplog):
    before, frame = _journal_bytes_with_last_record(tmp_path / "source.journal", "finished")
    path = tmp_path / "flipped.journal"
    damaged = bytearray(frame)
    damaged[len(frame) // 2 + FRAME_HEADER.size // 2] ^= 0x40
    path.write_bytes(before + damaged)
    with caplog.at_level(logging.WARNING, logger="pagedserve.journal"):
        with Journal(path) as journal:
            assert ids(journal) == ["a", "b"]  # the damaged "finished" record is not trusted
    assert "checksum" in caplog.text


@pytest.mark.parametrize("seed", range(6))
def test_a_random_garbage_tail_is_skipped(path, caplog, seed):
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(4):
            journal.record_accepted(f"j{i}", [i] * 5, {"n": 1})
        journal.record_finished("j1", "stop")
    rng = random.Random(seed)
    with open(path, "ab") as f:
        f.write(rng.randbytes(rng.randrange(1, 300)))
    with caplog.at_level(logging.WARNING, logger="pagedserve.journal"):
        with Journal(path, fsync_interval_s=0) as journal:
            assert ids(journal) == ["j0", "j2", "j3"]
            journal.record_accepted("after", [1], {})
    assert "dropped" in caplog.text
    with Journal(path) as journal:
        assert ids(journal) == ["j0", "j2", "j3", "after"]


@pytest.mark.parametrize("seed", range(5))
def test_a_corrupt_stretch_mid_file_loses_only_the_records_it_hits(path, caplog, seed):
    """A damaged sector, not a torn tail: the good records after it must survive (before,
    everything from the first bad byte on was dropped, and the rewrite made that final)."""
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(6):
            journal.record_accepted(f"j{i}", [i] * 40, {"n": 1})
    data = bytearray(path.read_bytes())
    frame = (len(data) - len(MAGIC)) // 6
    rng = random.Random(seed)
    start = len(MAGIC) + 2 * frame + rng.randrange(frame)  # somewhere inside j2's record
    data[start:start + rng.randrange(1, 40)] = rng.randbytes(rng.randrange(1, 40))
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pagedserve.journal"):
        with Journal(path, fsync_interval_s=0) as journal:
            kept = ids(journal)
            problems = journal.replay_problems  # for `pagedserve status`
    assert len(problems) == 1 and "skipped" in problems[0] and "to the next good record" in \
        problems[0]
    assert "skipped" in caplog.text and "dropped" not in caplog.text
    assert kept[:2] == ["j0", "j1"] and kept[-3:] == ["j3", "j4", "j5"]
    with Journal(path) as journal:  # rewritten without the damage
        assert ids(journal) == kept


def test_a_file_cut_inside_the_header_is_treated_as_empty(path, caplog):
    path.write_bytes(MAGIC[:2])
    with caplog.at_level(logging.WARNING, logger="pagedserve.journal"):
        with Journal(path) as journal:
            assert ids(journal) == []
            journal.record_accepted("a", [1], {})
    assert "header" in caplog.text
    with Journal(path) as journal:
        assert ids(journal) == ["a"]


def test_a_file_that_is_not_a_journal_is_refused_and_left_alone(path):
    content = b"important notes, not a journal\n"
    path.write_bytes(content)
    with pytest.raises(JournalError, match="not a pagedserve journal"):
        Journal(path)
    assert path.read_bytes() == content
    Journal(path.with_name("other.journal")).close()  # the refused one released its lock


def test_a_damaged_header_before_good_records_loses_nothing(path):
    """A flipped bit in the 4-byte header refused the whole journal (every unfinished job lost
    once it was moved away, as the error said); the records after it are good."""
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(3):
            journal.record_accepted(f"j{i}", [i] * 5, {"n": 1})
    data = bytearray(path.read_bytes())
    data[1] ^= 0x20
    path.write_bytes(bytes(data))
    with Journal(path) as journal:
        assert ids(journal) == ["j0", "j1", "j2"]
        assert journal.replay_problems == ["damaged file header at byte 0; skipped 4 bytes to "
                                           "the next good record"]
    assert path.read_bytes().startswith(MAGIC)  # rewritten whole


@pytest.mark.parametrize("damage", ["first 512 bytes zeroed", "bytes 0 and 6 flipped"])
def test_damage_at_the_start_of_the_file_loses_only_the_records_it_hits(path, damage):
    """A compaction puts every unfinished job at the front: a bad sector there made the whole
    journal refuse to open ("not a pagedserve journal") and the scheduler could not start."""
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(40):
            journal.record_accepted(f"j{i}", [i] * 5, {"n": 1})
    data = bytearray(path.read_bytes())
    if damage.startswith("first"):
        data[:512] = bytes(512)
    else:
        data[0] ^= 0xFF
        data[6] ^= 0xFF
    path.write_bytes(bytes(data))
    with Journal(path) as journal:
        lost = 40 - len(ids(journal))
        assert ids(journal) == [f"j{i}" for i in range(lost, 40)] and 0 < lost < 40
        assert journal.replay_problems[0].startswith("damaged file header at byte 0; skipped ")


def test_compact_keeps_exactly_the_unfinished(path):
    rng = random.Random(7)
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(60):
            journal.record_accepted(f"j{i}", [i] * rng.randrange(1, 30), {"max_tokens": i + 1})
        finished = set(rng.sample(range(60), 35))
        for i in sorted(finished):
            journal.record_finished(f"j{i}", "stop")
        expected = [j.job_id for j in journal.unfinished()]
        size_before = path.stat().st_size
        journal.compact()
        assert path.stat().st_size < size_before
        assert count_frames(path) == len(expected) == 60 - len(finished)
        assert ids(journal) == expected
        journal.record_accepted("new", [1], {})
    with Journal(path) as journal:
        assert ids(journal) == expected + ["new"]


def test_compact_drops_buffered_records_it_has_already_folded_in(path):
    with Journal(path, fsync_interval_s=60) as journal:
        for job_id in ("a", "b", "c"):
            journal.record_accepted(job_id, [1, 2], {})
        journal.record_finished("b", "stop")
        journal.compact()
    assert count_frames(path) == 2
    with Journal(path) as journal:
        assert ids(journal) == ["a", "c"]


def test_compaction_runs_by_itself_once_finished_records_pile_up(path):
    with Journal(path, fsync_interval_s=0, compact_min_finished=10) as journal:
        for i in range(30):
            journal.record_accepted(f"j{i}", [i], {})
        for i in range(26):
            journal.record_finished(f"j{i}", "stop")
            live = 30 - (i + 1)
            dead_bound = max(10, 2 * live) + 1
            # Never more than the live accepts, the dead records allowed, and their accepts.
            assert count_frames(path) <= 30 + 2 * dead_bound
        assert count_frames(path) < 30 + 26
    with Journal(path) as journal:
        assert ids(journal) == [f"j{i}" for i in range(26, 30)]


def test_one_writer_thread_with_the_flusher_and_compaction(path):
    model: dict[str, list[int]] = {}
    kept: dict[str, dict] = {}  # results
    errors: list[BaseException] = []

    def writer(journal: Journal) -> None:
        rng = random.Random(3)
        try:
            for i in range(1500):
                if kept and rng.random() < 0.1:
                    forgotten = rng.sample(list(kept), min(len(kept), rng.randrange(1, 3)))
                    journal.forget_results(forgotten)
                    for job_id in forgotten:
                        del kept[job_id]
                elif model and rng.random() < 0.45:
                    job_id = rng.choice(list(model))
                    result = result_of(i % 13) if rng.random() < 0.5 else None
                    journal.record_finished(job_id, "stop", result=result)
                    del model[job_id]
                    if result is not None:
                        kept[job_id] = result
                else:
                    model[f"j{i}"] = [i % 97] * rng.randrange(1, 20)
                    journal.record_accepted(f"j{i}", model[f"j{i}"], {"i": i})
                if i % 100 == 99:
                    journal.flush()  # races the flusher thread on purpose
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with Journal(path, fsync_interval_s=0.001, compact_min_finished=50) as journal:
        thread = threading.Thread(target=writer, args=(journal,))
        thread.start()
        while thread.is_alive():
            journal.unfinished()  # readers may look while the writer and flusher run
            time.sleep(0.001)
        thread.join()
        assert not errors
        assert ids(journal) == list(model)
    with Journal(path) as journal:
        assert {j.job_id: j.prompt_token_ids for j in journal.unfinished()} == model
        assert ids(journal) == list(model)
        assert journal.take_replayed_results() == kept and len(kept) > 50


def test_compaction_clears_a_write_error_once_everything_is_on_disk(path):
    journal = Journal(path, fsync_interval_s=0)
    with file_size_limit(path.stat().st_size):
        journal.record_accepted("a", [1], {})  # kept buffered
    assert journal.write_error is not None
    journal.compact()  # writes the job's record: nothing recorded is missing from the file
    assert journal.write_error is None and not journal.buffered
    journal.close()
    with Journal(path) as reopened:  # on disk indeed, not only dropped from the buffer
        assert ids(reopened) == ["a"]


def test_a_compaction_whose_directory_fsync_fails_goes_on_in_the_new_file(path, monkeypatch,
                                                                          caplog):
    """An OSError from the directory's fsync escaped flush() (aborting the submit being
    journaled) and left the journal appending to the old, unlinked file."""
    import cluster.journal as journal_module

    journal = Journal(path, fsync_interval_s=0)
    journal.record_accepted("a", [1], {})
    journal.record_finished("a", "stop")

    def failing_fsync_dir(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module, "_fsync_dir", failing_fsync_dir)
    journal.compact()
    assert "may not survive a crash" in caplog.text
    journal.record_accepted("b", [2], {})
    journal.close()
    with Journal(path) as reopened:
        assert ids(reopened) == ["b"]


def test_a_job_accepted_again_drops_its_kept_result_in_memory_as_in_the_file(path):
    with Journal(path, fsync_interval_s=0) as journal:
        journal.record_accepted("y", [1], {})
        journal.record_finished("y", "stop", result_of(2))
        journal.record_accepted("y", [1], {})
        journal.compact()
    with Journal(path) as journal:
        assert ids(journal) == ["y"] and journal.take_replayed_results() == {}


@pytest.mark.parametrize("where, message", [("dir", "is a directory"),
                                            ("under-a-file", "cannot create the journal's")])
def test_a_journal_path_that_cannot_be_a_file_is_named(tmp_path, where, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    path = tmp_path / "dir" if where == "dir" else tmp_path / "file" / "journal"
    with pytest.raises(JournalError, match=message):
        Journal(path)


def test_the_journal_holding_every_prompt_is_readable_by_its_owner_alone(path):
    """It was 0644 under the usual umask: any user of the head node read every prompt and
    kept result. A leftover of a crashed rewrite does not pass its mode on either."""
    old_umask = os.umask(0o022)
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.touch(mode=0o666)
        with Journal(path, fsync_interval_s=0) as journal:
            journal.record_accepted("j", [1, 2], {})
            journal.record_finished("j", "stop", {"text": "secret"})
            journal.compact()
        modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
    finally:
        os.umask(old_umask)
    assert modes == {path.name: 0o600, path.name + ".lock": 0o600}


def test_a_journal_an_older_version_left_readable_is_made_private_at_open(path):
    with Journal(path, fsync_interval_s=0) as journal:
        journal.record_accepted("j", [1, 2], {})
    path.chmod(0o644)
    with Journal(path) as journal:
        assert journal.unfinished()  # replayed, no compaction needed
        assert path.stat().st_mode & 0o777 == 0o600


def test_a_second_journal_on_the_same_file_is_refused_until_the_first_closes(path):
    first = Journal(path)
    with pytest.raises(JournalError, match="in use"):
        Journal(path)
    first.close()
    Journal(path).close()


def test_bad_input_is_refused_and_records_nothing(path):
    with Journal(path, fsync_interval_s=0) as journal:
        journal.record_accepted("a", [1], {})
        with pytest.raises(ValueError, match="already in the journal"):
            journal.record_accepted("a", [2], {})
        with pytest.raises(ValueError, match="job_id"):
            journal.record_accepted("", [1], {})
        with pytest.raises(ValueError, match="prompt_token_ids"):
            journal.record_accepted("b", ["x"], {})
        with pytest.raises(ValueError, match="not serialisable"):
            journal.record_accepted("c", [1], {"params": object()})
        assert ids(journal) == ["a"]
    with Journal(path) as journal:
        assert ids(journal) == ["a"]


def test_a_closed_journal_refuses_records(path):
    journal = Journal(path)
    journal.close()
    journal.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        journal.record_accepted("a", [1], {})


def test_the_journal_imports_neither_torch_nor_ray():
    code = ("import sys, cluster.journal; "
            "assert not {'torch', 'ray'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@contextmanager
def file_size_limit(limit: int):
    """A real write failure: the kernel refuses to grow any file of this process past
    ``limit`` bytes (EFBIG; Python ignores SIGXFSZ), as a full disk refuses with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_is_undone_and_retried_until_it_goes_through(path, tmp_path):
    journal = Journal(path, fsync_interval_s=0)
    journal.record_accepted("before", [1, 2], {})
    size = path.stat().st_size
    with file_size_limit(size + 20):  # room for part of a record: the write is cut short
        with pytest.raises(JournalError, match=f"cannot write {path}: File too large"):
            journal.record_accepted("during", list(range(100)), {})
            journal.flush()
        assert journal.write_error == f"cannot write {path}: File too large"
        assert path.stat().st_size == size  # the partial record was cut off again
        journal.record_finished("before", "stop")  # fsync interval 0: kept, not raised
        assert reopened_copy(path, tmp_path) == ["before"]
    journal.flush()
    assert journal.write_error is None
    assert reopened_copy(path, tmp_path) == ["during"] and count_frames(path) == 3
    journal.close()


def test_a_journal_that_cannot_be_rewritten_at_open_still_opens(path, tmp_path, caplog):
    """A scheduler restarted on a full disk rewrites its journal to drop finished records:
    that failing made the intact journal refuse to open, and the scheduler could not start.
    It goes on with the file as it is (a torn tail cut off), and the records come back."""
    with Journal(path, fsync_interval_s=0) as journal:
        for job_id in ("done", "a"):
            journal.record_accepted(job_id, [1, 2], {})
        journal.record_finished("done", "stop", result_of(3))
    with open(path, "ab") as torn:
        torn.write(b"\x40\x00")
    with file_size_limit(8):
        journal = Journal(path, fsync_interval_s=0)
    assert "cannot rewrite" in caplog.text and "going on with the file as it is" in caplog.text
    assert ids(journal) == ["a"] and journal.take_replayed_results() == {"done": result_of(3)}
    journal.record_accepted("b", [3], {})
    journal.close()
    assert reopened_copy(path, tmp_path) == ["a", "b"]


def test_a_torn_write_that_cannot_be_cut_off_does_not_misplace_later_records(
        path, tmp_path, monkeypatch):
    """The size the journal counted stayed where the cut should have left the file, so the
    next failed write cut into a record written since, one already acknowledged."""
    journal = Journal(path, fsync_interval_s=0)
    journal.record_accepted("a", [1, 2], {})
    size = path.stat().st_size
    truncate = os.ftruncate

    def failing_ftruncate(fd, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    with file_size_limit(size + 20):  # a write cut short, then left in the file
        with pytest.raises(JournalError):
            journal.record_accepted("b", list(range(100)), {})
            journal.flush()
    monkeypatch.setattr(os, "ftruncate", truncate)
    journal.flush()  # b goes after the torn bytes
    journal.record_accepted("c", [5], {})
    journal.record_finished("c", "stop", result_of(4))
    written = path.stat().st_size
    with file_size_limit(written + 10):
        with pytest.raises(JournalError):
            journal.record_accepted("d", list(range(100)), {})
            journal.flush()
    assert path.stat().st_size == written  # cut back to its whole records, not into c's
    journal.close()
    with Journal(path) as reopened:
        assert ids(reopened) == ["a", "b", "d"]
        assert reopened.take_replayed_results() == {"c": result_of(4)}


def test_the_flusher_retries_a_failed_write(path, tmp_path, caplog):
    journal = Journal(path, fsync_interval_s=0.01)
    size = path.stat().st_size
    with file_size_limit(size):
        journal.record_accepted("waits", [1], {})
        deadline = time.monotonic() + 10
        while journal.write_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert journal.write_error is not None and path.stat().st_size == size
    deadline = time.monotonic() + 10
    while journal.write_error is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert journal.write_error is None and reopened_copy(path, tmp_path) == ["waits"]
    assert "retrying every" in caplog.text and "written again" in caplog.text
    journal.close()


def result_of(i: int) -> dict:
    return {"outputs": [{"token_ids": list(range(i)), "text": f"out {i}"}], "error": None}


def test_kept_results_come_back_after_reopen_in_finish_order_until_forgotten(path, tmp_path):
    with Journal(path, fsync_interval_s=0) as journal:
        for i in range(6):
            journal.record_accepted(f"j{i}", [i + 1], {})
        for i in (3, 0, 5, 1):
            journal.record_finished(f"j{i}", "stop", result=result_of(i))
        journal.record_finished("j2", "abort")  # no result: nothing kept
        journal.forget_results(["j0", "never-finished", "j2"])
    with Journal(path, fsync_interval_s=0) as journal:  # rewritten at open: accepts are dead
        assert ids(journal) == ["j4"]
        assert journal.take_replayed_results() == {f"j{i}": result_of(i) for i in (3, 5, 1)}
        assert journal.take_replayed_results() == {}  # handed over once
        assert count_frames(path) == 1 + 3
        journal.forget_results(["j5"])
        journal.compact()
        assert count_frames(path) == 1 + 2
        journal.record_finished("j4", "length", result=result_of(4))
    with Journal(path) as journal:  # j4's accept is dead, the kept results' records are not
        assert ids(journal) == []
        assert list(journal.take_replayed_results()) == ["j3", "j1", "j4"]
        assert count_frames(path) == 3


def test_compaction_copies_kept_results_from_the_file_and_from_the_buffer(path, tmp_path):
    with Journal(path, fsync_interval_s=60) as journal:
        for i in range(4):
            journal.record_accepted(f"j{i}", [i + 1] * 50, {})
        journal.record_finished("j0", "stop", result=result_of(10))
        journal.flush()  # j0's result in the file, j1's still buffered
        journal.record_finished("j1", "stop", result=result_of(11))
        journal.compact()
        journal.record_finished("j2", "stop", result=result_of(12))
        journal.compact()
        assert count_frames(path) == 4  # j3's accept and three results
    with Journal(path) as journal:
        assert ids(journal) == ["j3"]
        assert journal.take_replayed_results() == {
            "j0": result_of(10), "j1": result_of(11), "j2": result_of(12)}


def test_a_result_recorded_while_a_write_is_in_flight_or_after_a_failed_one_is_found(
        path, tmp_path):
    journal = Journal(path, fsync_interval_s=0.001, compact_min_finished=4)
    try:
        for i in range(200):  # the flusher writes while results are recorded and compacted
            journal.record_accepted(f"j{i}", [i + 1] * (i % 7 + 1), {})
            journal.record_finished(f"j{i}", "stop", result=result_of(i % 9))
            journal.forget_results([f"j{i - 5}"])
        journal.compact_min_finished = 10**9  # no compaction from here: it could fold "late"
        journal.flush()
        size = path.stat().st_size
        with file_size_limit(size + 30):
            journal.record_accepted("late", [1, 2], {})
            journal.record_finished("late", "stop", result=result_of(3))
            with pytest.raises(JournalError):
                journal.flush()
        journal.flush()
        journal.compact()
    finally:
        journal.close()
    with Journal(path) as journal:
        kept = {f"j{i}": result_of(i % 9) for i in range(195, 200)}
        assert journal.take_replayed_results() == {**kept, "late": result_of(3)}


def test_records_are_taken_while_a_compaction_is_written(path, monkeypatch):
    """The scheduler's calls only buffer: they must not wait for a compaction's copy and
    fsync (with kept results, tens of MB). What they record meanwhile is kept after it."""
    journal = Journal(path, fsync_interval_s=60)
    for i in range(6):
        journal.record_accepted(f"j{i}", [i + 1] * 20, {})
    for i in range(3):
        journal.record_finished(f"j{i}", "stop", result=result_of(i))
    journal.flush()
    journal.record_finished("j3", "stop", result=result_of(3))  # still buffered
    copying, real_fsync = threading.Event(), os.fsync

    def slow_fsync(fd):
        if threading.current_thread().name == "compaction":
            copying.set()
            time.sleep(0.5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    compaction = threading.Thread(target=journal.compact, name="compaction")
    compaction.start()
    assert copying.wait(10)
    started = time.monotonic()
    journal.record_finished("j4", "stop", result=result_of(4))
    journal.forget_results(["j1"])
    journal.record_accepted("new", [7], {})
    assert time.monotonic() - started < 0.25
    compaction.join()
    journal.compact()  # copies j4's frame from where the first compaction says it now is
    journal.close()
    with Journal(path) as reopened:
        assert ids(reopened) == ["j5", "new"]
        assert reopened.take_replayed_results() == {f"j{i}": result_of(i) for i in (0, 2, 3, 4)}

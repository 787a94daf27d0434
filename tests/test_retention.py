"""Which finished jobs the scheduler keeps: the latest by count, and past the byte budget the
ones read longest ago first, never one nobody has read; a job held for its reader goes only
once read or released."""
from scheduler.jobs import JobState
from scheduler.retention import FinishedJobs
from scheduler.sampling_params import SamplingParams
from worker.output import TokenLogprobs


def test_the_oldest_go_past_the_count():
    kept = FinishedJobs(max_jobs=2, max_bytes=10**9)
    assert kept.add("a", 10) == [] and kept.add("b", 10) == []
    assert kept.add("c", 10) == ["a"]
    assert "a" not in kept and kept.newest(5) == ["c", "b"] and kept.total_bytes == 20


def test_past_the_bytes_only_jobs_already_read_go_oldest_read_first():
    kept = FinishedJobs(max_jobs=100, max_bytes=250)
    for job_id in "abc":
        assert kept.add(job_id, 100) == []  # 300 bytes, but nobody has read any: all kept
    assert kept.mark_read("b") == ["b"]  # read and over the budget: the read one goes
    assert kept.mark_read("b") == []  # already gone
    assert kept.add("d", 100) == []  # 300 again, still unread
    assert kept.mark_read("c") == ["c"] and kept.newest(5) == ["d", "a"]
    kept.max_bytes = 1000
    assert kept.mark_read("a") == [] and "a" in kept  # under the budget: read ones stay
    assert kept.add("e", 900) == ["a"]  # the read one goes before any unread one


def test_a_held_job_is_not_counted_nor_forgotten_until_read_or_released():
    kept = FinishedJobs(max_jobs=2, max_bytes=10**9)
    assert kept.add("held", 10, held=True) == [] and kept.add("also held", 10, held=True) == []
    for job_id in "abc":  # another client's results push each other out, not the held ones
        kept.add(job_id, 10)
    assert "held" in kept and "a" not in kept and kept.held == 2 and len(kept) == 4
    assert kept.mark_read("held") == ["b"]  # read: it counts now, as the newest
    assert kept.release("also held") == ["c"] and kept.newest(5) == ["also held", "held"]
    assert kept.held == 0 and kept.release("also held") == []


def test_a_job_with_logprobs_weighs_what_its_objects_take():
    job = JobState("j", list(range(1000)), SamplingParams(logprobs=5))
    sample = job.samples[0]
    sample.token_ids = list(range(1000))
    sample.logprobs = [TokenLogprobs(i, -0.5, [(k, -1.0) for k in range(5)]) for i in range(1000)]
    bare = JobState("k", list(range(1000)), SamplingParams())
    bare.samples[0].token_ids = list(range(1000))
    assert 80_000 < bare.kept_bytes() < 100_000  # ~40 bytes a token id in Python lists
    assert 650_000 < job.kept_bytes() < 800_000  # ~690 KB measured with sys.getsizeof
    for lp in sample.logprobs:  # as msgpack gives them back: a str object each
        lp.decoded = [f" tok{k}" for k in range(6)]
    assert 1_050_000 < job.kept_bytes() < 1_250_000  # ~1.1 MB

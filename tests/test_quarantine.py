"""The quarantine of an engine failure's suspects: one released at a time, cleared by progress,
and named the culprit when an engine fails while it is the one released."""
from scheduler.jobs import JobState
from scheduler.quarantine import Quarantine
from scheduler.sampling_params import SamplingParams


def suspects(count):
    jobs = [JobState(f"job{i}", [1, 2], SamplingParams()) for i in range(count)]
    return [(job, job.samples[0]) for job in jobs]


def test_suspects_run_one_at_a_time_and_progress_clears_them():
    held = suspects(3)
    quarantine = Quarantine()
    quarantine.hold(held)
    assert quarantine.release() == held[0] and len(quarantine) == 3
    assert quarantine.release() is None  # one released at a time
    assert not quarantine.cleared(held[1][0])  # another job's change
    assert not quarantine.cleared(held[0][0])  # no token yet
    held[0][1].token_ids.append(5)
    assert quarantine.cleared(held[0][0]) and len(quarantine) == 2
    held[1][1].finish_reason = "abort"  # ended while it waited: skipped
    assert quarantine.release() == held[2]


def test_the_released_suspect_among_a_failed_engines_samples_is_the_culprit():
    held, others = suspects(2), suspects(2)
    quarantine = Quarantine()
    quarantine.hold(held)
    assert quarantine.take_culprit(others) is None  # nothing released yet
    released = quarantine.release()
    assert quarantine.take_culprit(others) is None  # a failure it was not part of
    assert quarantine.take_culprit([*others, released]) == released
    assert quarantine.released is None and quarantine.release() == held[1]

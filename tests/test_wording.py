"""Counts in messages: one of a thing in the singular, any other number in the plural."""
from scheduler.wording import counted


def test_a_count_of_one_takes_the_singular_and_any_other_the_plural():
    assert [counted(n, "unfinished job") for n in (0, 1, 2)] == [
        "0 unfinished jobs", "1 unfinished job", "2 unfinished jobs"]
    assert counted(1, "priority", "priorities") == "1 priority"
    assert counted(3, "priority", "priorities") == "3 priorities"


def test_a_fractional_count_is_written_short():
    assert [counted(n, "CPU") for n in (1.0, 0.5, 2.0)] == ["1 CPU", "0.5 CPUs", "2 CPUs"]

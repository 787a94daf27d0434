"""Counts in messages (one of a thing in the singular, any other number in the plural) and
time spans."""
from scheduler.wording import counted, span


def test_a_count_of_one_takes_the_singular_and_any_other_the_plural():
    assert [counted(n, "unfinished job") for n in (0, 1, 2)] == [
        "0 unfinished jobs", "1 unfinished job", "2 unfinished jobs"]
    assert counted(1, "priority", "priorities") == "1 priority"
    assert counted(3, "priority", "priorities") == "3 priorities"


def test_a_fractional_count_is_written_short():
    assert [counted(n, "CPU") for n in (1.0, 0.5, 2.0)] == ["1 CPU", "0.5 CPUs", "2 CPUs"]


def test_a_span_is_rounded_to_its_largest_unit():
    assert [span(s) for s in (0.4, 89, 90, 5399, 5400, 86400)] == [
        "0 s", "89 s", "2 min", "90 min", "2 h", "24 h"]

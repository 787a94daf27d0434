"""Numbered worker reports are applied in the order they were sent, whatever order they arrive in."""
import itertools

import pytest

from scheduler.in_order import InOrder


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(4))))
def test_every_arrival_order_is_delivered_in_number_order(arrival):
    order = InOrder()
    delivered = []
    for number in arrival:
        delivered += order.push(number, f"report {number}")
        assert delivered == [f"report {n}" for n in range(len(delivered))]
    assert delivered == [f"report {n}" for n in range(4)] and order.held == 0


def test_an_early_message_waits_for_the_gap():
    order = InOrder()
    assert order.push(1, "b") == [] and order.held == 1
    assert order.push(0, "a") == ["a", "b"] and order.held == 0


def test_a_repeated_number_is_an_error():
    order = InOrder()
    order.push(0, "a")
    order.push(2, "c")
    for number in (0, 2):
        with pytest.raises(ValueError, match="already received"):
            order.push(number, "again")


def test_it_tells_since_when_the_next_number_has_been_missing(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("scheduler.in_order.time.monotonic", lambda: now[0])
    order = InOrder()
    order.push(0, "a")
    assert order.missing_since is None
    order.push(2, "c")  # 1 is missing from now on
    now[0] = 105.0
    order.push(4, "e")  # still 1: the wait began when it first held something
    assert order.missing_since == 100.0
    order.push(1, "b")  # 1 and 2 go; now 3 is missing, from now on
    assert order.missing_since == 105.0 and order.held == 1
    order.push(3, "d")
    assert order.missing_since is None and order.held == 0

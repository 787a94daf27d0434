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

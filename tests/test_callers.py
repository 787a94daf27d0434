"""Callers: what the scheduler ends, lets go of and aborts when a client process dies, and when
it stops watching a caller."""
from scheduler.callers import Callers


class Token:
    """Stands in for the ObjectRef a client sends: Callers reads only its id, ``hex()``."""

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id

    def hex(self) -> str:
        return self.object_id


def test_a_dead_caller_gives_back_its_calls_its_holds_and_its_unfinished_owned_jobs():
    callers, token = Callers(), Token("a")
    callers.open_call(token, "task")
    callers.hold(token, ["held"])
    callers.own(token, ["running", "finished"])
    callers.disown("finished")
    assert callers.holds("held")
    assert callers.forget("a") == ({"task"}, {"held"}, {"running"})
    assert not callers.holds("held") and callers.watched() == []


def test_a_caller_is_watched_while_it_has_a_call_a_hold_or_an_owned_job():
    callers, token, other = Callers(), Token("a"), Token("b")
    callers.own(token, ["job"])
    callers.hold(other, ["result"])
    callers.open_call(token, "task")
    callers.close_call(token, "task")
    assert callers.watched() == [("a", token), ("b", other)]
    callers.disown("job")
    callers.unhold("result")
    assert callers.watched() == []
    callers.disown("job")  # a job owned by nobody (any more): nothing to do

"""A worker's step reports: one per step while the scheduler keeps up, merged while it lags."""
import queue
import threading
import types

import pytest

from worker.actor import WorkerActor
from worker.output import RequestOutput, unpack_outputs
from worker.report_sender import ReportSender


class Scheduler:
    """The scheduler's handle as the sender uses it: each ``report.remote`` call is recorded
    and returns its number, which counts as returned once the test puts it in ``returned``
    (Ray's call returns when the scheduler has applied the report)."""

    def __init__(self) -> None:
        self.calls, self.returned = [], set()
        self.report = types.SimpleNamespace(remote=self._report)

    def _report(self, worker_id, number, packed, rejected, load):
        self.calls.append((number, [(o.request_id, o.new_token_ids)
                                    for o in unpack_outputs(packed)], rejected, load))
        return number

    def sender(self) -> ReportSender:
        return ReportSender(self, "w1", returned=lambda call: call in self.returned)


def out(request_id: str, token: int) -> RequestOutput:
    return RequestOutput(request_id, 0, [token], "x", 3, None, None, 0.0)


def test_a_scheduler_that_keeps_up_gets_each_step_as_it_ends():
    scheduler = Scheduler()
    sender = scheduler.sender()
    for step in range(3):
        sender.add([out("a", step), out("b", step)], [], {"running": 2})
        assert sender.send() is False  # nothing left waiting
        scheduler.returned.add(step)
    assert scheduler.calls == [(n, [("a", [n]), ("b", [n])], [], {"running": 2})
                               for n in range(3)]


def test_steps_made_while_a_report_is_in_flight_go_together_in_order_once_it_returns():
    """Each step was its own call: a scheduler that fell behind (many workers, a pause) had a
    queue of calls that grew as long as it stayed behind."""
    scheduler = Scheduler()
    sender = scheduler.sender()
    sender.add([out("a", 0)], [], {"running": 2})
    sender.send()
    for step in (1, 2):  # the scheduler has not taken report 0 yet
        sender.add([out("a", step), out("b", step)], [("c", "too long")] * (step == 2),
                   {"running": 3 - step})
        assert sender.send() is True  # they wait
    assert len(scheduler.calls) == 1
    scheduler.returned.add(0)
    assert sender.send() is False
    assert scheduler.calls[1] == (1, [("a", [1]), ("b", [1]), ("a", [2]), ("b", [2])],
                                  [("c", "too long")], {"running": 1})


def test_an_idle_worker_reports_only_a_changed_load_and_a_stopping_one_sends_at_once():
    scheduler = Scheduler()
    sender = scheduler.sender()
    sender.add([], [], {"tokens_per_s": 5.0})
    sender.send()
    scheduler.returned.add(0)
    sender.add([], [], {"tokens_per_s": 5.0})
    assert sender.send() is False
    assert len(scheduler.calls) == 1  # nothing new
    sender.add([out("a", 9)], [], {"tokens_per_s": 4.0})
    sender.send()
    sender.add([out("a", 10)], [], {"tokens_per_s": 3.0})
    sender.send(even_in_flight=True)  # the worker stops: nothing waits for the call in flight
    assert [call[:2] for call in scheduler.calls] == [(0, []), (1, [("a", [9])]),
                                                      (2, [("a", [10])])]


def test_an_idle_worker_looks_less_often_the_longer_the_scheduler_takes():
    """It looked every 5 ms however long the call stayed in flight: a scheduler stalled for
    seconds had each idle worker spend ~3% of a core looking."""
    now = [100.0]
    scheduler = Scheduler()
    sender = ReportSender(scheduler, "w1", returned=lambda call: call in scheduler.returned,
                          clock=lambda: now[0])
    sender.add([out("a", 0)], [], {"running": 1})
    sender.send()
    sender.add([out("a", 1)], [], {"running": 0})
    assert sender.send() is True
    assert sender.poll_s(0.5) == 0.005  # a scheduler that keeps up answers within a few ms
    now[0] += 0.2
    assert sender.poll_s(0.5) == pytest.approx(0.05)  # late by a quarter more at most
    now[0] += 10
    assert sender.poll_s(0.5) == 0.5  # no longer than an idle worker waits anyway


def test_an_engine_error_reaches_the_scheduler_even_if_the_last_report_cannot_be_sent():
    """The worker's loop sends what waits as it ends; an error there replaced the engine's,
    which the scheduler keeps as why the worker went (and whose samples it quarantines)."""
    class FailingEngine:
        def has_unfinished(self):
            return True

        def step(self):
            raise RuntimeError("device fault")

    class UnsendableReports:
        def add(self, *step):
            pass

        def send(self, even_in_flight=False):
            raise ValueError("cannot pack the outputs")

    cls = WorkerActor.__ray_actor_class__  # the class as written, without Ray's actor wrapper
    worker = cls.__new__(cls)
    worker.worker_id, worker.engine, worker._reports = "w1", FailingEngine(), UnsendableReports()
    worker._stopping, worker._inbox, worker.load = threading.Event(), queue.SimpleQueue(), dict
    with pytest.raises(RuntimeError, match="device fault"):
        worker._loop()

"""A worker's step reports: one per step while the scheduler keeps up, merged while it lags."""
import concurrent.futures
import types

from worker.output import RequestOutput, unpack_outputs
from worker.report_sender import ReportSender


class Scheduler:
    """The scheduler's handle as the sender uses it: each ``report.remote`` call is recorded
    with a future the test ends when it likes (Ray ends it when the call returns)."""

    def __init__(self) -> None:
        self.calls, self.futures = [], []
        self.report = types.SimpleNamespace(remote=self._report)

    def _report(self, worker_id, number, packed, rejected, load):
        future = concurrent.futures.Future()
        self.calls.append((number, [(o.request_id, o.new_token_ids)
                                    for o in unpack_outputs(packed)], rejected, load))
        self.futures.append(future)
        return types.SimpleNamespace(future=lambda: future)


def out(request_id: str, token: int) -> RequestOutput:
    return RequestOutput(request_id, 0, [token], "x", 3, None, None, 0.0)


def test_a_scheduler_that_keeps_up_gets_each_step_as_it_ends():
    scheduler, wakes = Scheduler(), []
    sender = ReportSender(scheduler, "w1", lambda: wakes.append(1))
    for step in range(3):
        sender.add([out("a", step), out("b", step)], [], {"running": 2})
        sender.send()
        scheduler.futures[-1].set_result(None)
    assert scheduler.calls == [(n, [("a", [n]), ("b", [n])], [], {"running": 2})
                               for n in range(3)]
    assert len(wakes) == 3


def test_steps_made_while_a_report_is_in_flight_go_together_in_order_once_it_returns():
    """Each step was its own call: a scheduler that fell behind (many workers, a pause) had a
    queue of calls that grew as long as it stayed behind."""
    scheduler, wakes = Scheduler(), []
    sender = ReportSender(scheduler, "w1", lambda: wakes.append(1))
    sender.add([out("a", 0)], [], {"running": 2})
    sender.send()
    for step in (1, 2):  # the scheduler has not taken report 0 yet
        sender.add([out("a", step), out("b", step)], [("c", "too long")] * (step == 2),
                   {"running": 3 - step})
        sender.send()
    assert len(scheduler.calls) == 1 and wakes == []
    scheduler.futures[0].set_exception(RuntimeError("the scheduler restarted"))  # ended all the same
    assert wakes == [1]  # an idle worker's loop is woken to send what waits
    sender.send()
    assert scheduler.calls[1] == (1, [("a", [1]), ("b", [1]), ("a", [2]), ("b", [2])],
                                  [("c", "too long")], {"running": 1})


def test_an_idle_worker_reports_only_a_changed_load_and_a_stopping_one_sends_at_once():
    scheduler = Scheduler()
    sender = ReportSender(scheduler, "w1", lambda: None)
    sender.add([], [], {"tokens_per_s": 5.0})
    sender.send()
    scheduler.futures[0].set_result(None)
    sender.add([], [], {"tokens_per_s": 5.0})
    sender.send()
    assert len(scheduler.calls) == 1  # nothing new
    sender.add([out("a", 9)], [], {"tokens_per_s": 4.0})
    sender.send()
    sender.add([out("a", 10)], [], {"tokens_per_s": 3.0})
    sender.send(even_in_flight=True)  # the worker stops: nothing waits for the call in flight
    assert [call[:2] for call in scheduler.calls] == [(0, []), (1, [("a", [9])]),
                                                      (2, [("a", [10])])]

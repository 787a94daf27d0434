"""The scheduler service in one process, without Ray, on what it does when a worker dies or
stalls: its worker actors are stand-ins that record the calls sent to them (Ray's kill and the
actor's own handle are stubbed out; nothing else of Ray is reached)."""
import asyncio
import time
import types

import pytest
import ray
from ray.exceptions import ActorUnavailableError

from cluster.journal import Journal
from scheduler import service
from scheduler.gone_workers import GONE_WORKERS_KEPT
from scheduler.router import WorkerLoad
from scheduler.sampling_params import InvalidRequestError
from worker.output import RequestOutput

LOAD = {"free_blocks": 100}


class Actor:
    """A worker actor's handle: ``actor.add.remote(*args)`` appends ``("add", *args)`` to
    ``sent``."""

    def __init__(self) -> None:
        self.sent = []

    def __getattr__(self, method: str):
        return types.SimpleNamespace(remote=lambda *args: self.sent.append((method, *args)))


@pytest.fixture
def new_service(monkeypatch, tmp_path):
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: types.SimpleNamespace(current_actor=None))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    made = []

    def make(**settings) -> service.SchedulerService:
        options = service.ServiceOptions(engine_options={"model": "tiny"}, **settings)
        scheduler = service.SchedulerService(options, lambda: Journal(tmp_path / "journal", 0))
        for task in scheduler._tasks:  # no cluster to reconcile, no callers to watch
            task.cancel()
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.journal.close()


def add_worker(scheduler: service.SchedulerService, worker_id: str, node: str = "node",
               fit: int = 10_000) -> service.WorkerSlot:
    """A worker that has loaded its model, as _watch leaves it, on a node with NPUs."""
    slot = service.WorkerSlot(worker_id, Actor(), node)
    slot.info = {"max_tokens_fit": fit, "num_blocks": 100, "block_size": 16}
    slot.load = WorkerLoad(worker_id, 100, 100, 16)
    scheduler.workers[worker_id] = slot
    scheduler.node_fit[node] = max(fit, scheduler.node_fit.get(node, 0))
    scheduler.npu_nodes[node] = sum(w.node_id == node for w in scheduler.workers.values())
    return slot


def adds(slot: service.WorkerSlot) -> list[str]:
    """The engine request ids sent to the worker, in order."""
    return [call[1] for call in slot.actor.sent if call[0] == "add"]


def test_a_job_failed_for_its_worker_deaths_sends_none_of_its_samples_on(new_service):
    # Each job has both samples on the worker that dies; sample 1 has lost two workers before,
    # sample 0 none, so this death fails the job. Sample 0, ended with it, must not go to
    # another worker to run for nobody (and stay on its books: no end would be reported). The
    # dead worker's samples are a set: 32 jobs, so that some have sample 0 looked at first.
    async def fail_over():
        scheduler = new_service()
        dying = add_worker(scheduler, "dying")
        job_ids = scheduler.submit_many([([1, 2, 3], {"n": 2, "max_tokens": 8}, 0, f"job{i}")
                                         for i in range(32)])
        survivor = add_worker(scheduler, "survivor")
        for job_id in job_ids:
            scheduler.jobs[job_id].samples[1].attempt = service.MAX_WORKER_DEATHS_PER_SAMPLE - 1
        scheduler._on_worker_gone(dying, "died")
        return scheduler, job_ids, survivor

    scheduler, job_ids, survivor = asyncio.run(fail_over())
    assert all(scheduler.jobs[job_id].error == "3 workers died while running it"
               for job_id in job_ids)
    assert [call for call in survivor.actor.sent if call[0] == "add"] == []
    assert survivor.samples == set()


def test_a_worker_killed_for_a_missing_report_is_not_killed_again_for_its_silence(
        new_service, monkeypatch):
    # Its report 0 never came, report 1 came 2 minutes ago and nothing since: it is killed
    # once, for the missing report, not pinged and killed (and counted) a second time.
    async def never_answers(actor, timeout: float) -> bool:
        return False

    monkeypatch.setattr(service, "answers_stats", never_answers)

    async def look():
        scheduler = new_service()
        slot = add_worker(scheduler, "stuck")
        scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "job")])
        scheduler.report("stuck", 1, [], [], {"free_blocks": 100})
        slot.reports.missing_since = slot.last_heard = time.monotonic() - 120
        await scheduler._kill_hung_workers()
        scheduler._on_worker_gone(slot, "died: it was killed by `ray.kill`.")  # as _watch sees it
        return scheduler

    scheduler = asyncio.run(look())
    assert scheduler.stalled_workers_killed == 1
    # status says that the scheduler killed it and why, not only Ray's "killed by ray.kill"
    gone, = scheduler.status()["gone_workers"]
    assert (gone["worker_id"], gone["why"]) == ("stuck", "killed: a report of it went missing")


def test_a_worker_cut_off_with_its_node_is_said_unreachable_not_temporarily_unavailable():
    """What Ray raised to the scheduler's run() call when a worker's node was killed: status
    showed it whole, "temporarily unavailable ... may or may not have been executed", for a
    worker the scheduler then ended."""
    cut_off = ActorUnavailableError("The actor is temporarily unavailable: RpcError: RPC error: "
                                    "Socket closed rpc_code: 14", b"\xd9" * 16)
    assert service._death_reason(cut_off) == ("unreachable: its node went down or lost touch "
                                              "with the cluster")


def test_a_worker_whose_node_died_is_said_so_in_one_plain_line():
    """What Ray raised to the scheduler's run() call when a worker's raylet was killed and the
    GCS then counted its node dead: status and logs showed "died: \tthe actor's node was
    terminated unexpectedly: ...", a tab and Ray's wording, and no word that the node died."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    message = ("The actor died because its node has died. Node Id: d571ce62\n\tthe actor's "
               "node was terminated unexpectedly: health check failed due to missing too many "
               "heartbeats")
    node_died = ActorDiedError(ActorDiedErrorContext(error_message=message, pid=10288,
                                                     actor_id=b"\xd9" * 16))
    assert service._death_reason(node_died) == (
        "its node died (terminated unexpectedly: health check failed due to missing too many "
        "heartbeats)")


def test_a_node_gets_only_the_workers_its_cpus_can_hold(new_service, monkeypatch):
    """A node with more NPUs than its CPUs can give workers (cluster.worker_num_cpus each) got
    a worker per NPU all the same: the extra one sat "starting" forever, and `up` waited for it;
    on a node with no CPU at all each start failed, and status showed Ray's "The node ...
    doesn't exist any more or is infeasible" as the last worker start error."""
    nodes = [{"NodeID": "two-npus-one-cpu", "Alive": True, "Resources": {"NPU": 2, "CPU": 1}},
             {"NodeID": "npu-no-cpu", "Alive": True, "Resources": {"NPU": 1}},
             {"NodeID": "cpus-only", "Alive": True, "Resources": {"CPU": 8}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)

    async def reconcile():
        scheduler = new_service()
        spawned = []
        scheduler._spawn = spawned.append  # no actor: the node it would be placed on
        scheduler._reconcile()
        return scheduler, spawned

    scheduler, spawned = asyncio.run(reconcile())
    assert spawned == ["two-npus-one-cpu"]
    assert scheduler.placement_problem.startswith("only 1 of 3 workers can be placed: each "
                                                  "needs 1 NPU and 1 CPU")


def test_the_placement_problem_names_the_nodes_short_of_cpus(new_service, monkeypatch):
    """It said "more than the nodes with NPUs have": on a cluster of many nodes, nothing said
    which of them to give more CPUs."""
    nodes = [{"NodeID": "a" * 56, "Alive": True, "Resources": {"NPU": 2, "CPU": 1.0}},
             {"NodeID": "b" * 56, "Alive": True, "Resources": {"NPU": 2, "CPU": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)

    async def reconcile():
        scheduler = new_service()
        scheduler._spawn = lambda node_id: None
        scheduler._reconcile()
        one_short = scheduler.placement_problem
        nodes.append({"NodeID": "c" * 56, "Alive": True, "Resources": {"NPU": 1}})
        scheduler._reconcile()
        return one_short, scheduler.placement_problem

    one_short, two_short = asyncio.run(reconcile())
    assert one_short == ("only 3 of 4 workers can be placed: each needs 1 NPU and 1 CPU "
                         "(cluster.worker_num_cpus), more than node aaaaaaaa (2 NPUs, 1 CPU) "
                         "has; lower cluster.worker_num_cpus or add CPUs")
    assert "more than nodes aaaaaaaa (2 NPUs, 1 CPU), cccccccc (1 NPU, 0 CPUs) have;" in two_short


def test_the_status_table_names_the_node_of_a_worker_still_starting(new_service):
    """A worker not yet started showed as "w1234abcd (starting)" alone: after a node was lost
    under load, two such rows stood for the dead node's NPUs until Ray counted it gone, and
    none said which node each was for (nor is the node of one that cannot be placed)."""
    from cluster.daemon_cmds import format_status

    async def look():
        scheduler = new_service()
        add_worker(scheduler, "wready", "node-a" * 4).info.update(device="cpu:0", pid=7,
                                                                  node_id="node-a" * 4)
        scheduler.workers["wstarting"] = service.WorkerSlot("wstarting", Actor(), "node-b" * 4)
        return scheduler.status()

    rows = format_status(asyncio.run(look())).splitlines()
    assert rows[2] == "wstarting node-bno (starting)"


def test_a_worker_that_never_started_because_its_node_went_is_logged(new_service, monkeypatch,
                                                                       caplog):
    """A node lost under load: the scheduler spawned workers for its freed NPUs before Ray
    counted it dead, and when their creation failed with the node they left status without a
    word anywhere (only one withdrawn by the next reconcile was logged)."""
    monkeypatch.setattr(ray, "nodes", lambda: [])  # the node has left

    async def never_placed():
        raise ray.exceptions.ActorUnschedulableError("its node is gone")

    async def watch():
        scheduler = new_service()
        slot = service.WorkerSlot("wlost", Actor(), "gone-node")
        slot.actor.info = types.SimpleNamespace(remote=never_placed)
        scheduler.workers["wlost"] = slot
        await scheduler._watch(slot)
        return scheduler

    scheduler = asyncio.run(watch())
    assert not scheduler.workers and scheduler.last_spawn_error is None
    assert "worker wlost withdrawn before it started: its node is gone" in caplog.messages


def test_a_quiet_worker_that_reports_while_it_is_pinged_is_left_alone(new_service, monkeypatch):
    """A scheduler held up itself (stopped, or its host swapping) hears nothing for a while,
    then every worker's reports at once: a worker that reported while its ping went
    unanswered was killed as hung all the same, with "no step for 0 s" as why."""
    async def look():
        scheduler = new_service()
        slot = add_worker(scheduler, "busy")
        scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "job")])
        slot.last_heard = time.monotonic() - 120

        async def reports_then_misses_the_ping(actor, timeout: float) -> bool:
            scheduler.report("busy", 0, [], [], {"free_blocks": 100})
            return False

        monkeypatch.setattr(service, "answers_stats", reports_then_misses_the_ping)
        await scheduler._kill_hung_workers()
        return scheduler

    scheduler = asyncio.run(look())
    assert scheduler.stalled_workers_killed == 0 and "busy" in scheduler.workers


def test_a_scheduler_held_up_itself_does_not_take_its_workers_for_quiet(new_service,
                                                                      monkeypatch):
    """While the scheduler's event loop is blocked (its process stopped, say), reports wait in
    Ray's queue: the workers' silence is the scheduler's own. Each worker was pinged and logged
    as "has not finished a step for N s" when it ran again."""
    pinged = []

    async def answers(actor, timeout: float) -> bool:
        pinged.append(actor)
        return True

    monkeypatch.setattr(service, "answers_stats", answers)
    monkeypatch.setattr(service, "HELD_UP_S", 0.2)
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "NodeID": "node", "Resources": {"NPU": 1.0, "CPU": 2.0}}])

    async def held_up():
        scheduler = new_service(worker_stall_timeout_s=0.3, resource_poll_interval_s=0.05)
        add_worker(scheduler, "busy")
        scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "job")])
        watch = asyncio.get_running_loop().create_task(scheduler._reconcile_forever())
        await asyncio.sleep(0.1)
        time.sleep(0.5)  # the event loop held: no report can come, no watch round runs
        await asyncio.sleep(0.15)
        watch.cancel()
        return scheduler

    scheduler = asyncio.run(held_up())
    assert pinged == [] and scheduler.workers["busy"].samples


def test_the_gone_workers_kept_are_the_latest_and_all_are_counted(new_service):
    async def lose_workers():
        scheduler = new_service()
        for i in range(GONE_WORKERS_KEPT + 2):
            scheduler._on_worker_gone(add_worker(scheduler, f"w{i}"), f"died: {i}")
        return scheduler.status()

    status = asyncio.run(lose_workers())
    assert [g["worker_id"] for g in status["gone_workers"]] == [
        f"w{i}" for i in range(2, GONE_WORKERS_KEPT + 2)]
    assert status["workers_gone"] == GONE_WORKERS_KEPT + 2


def test_a_waiting_call_refused_for_its_job_id_gives_its_slot_back(new_service):
    # A tied job resumed from the journal waits to be claimed, so every waiting call looks at
    # its job ids before it waits; a bad id (a list, say) must not keep the call's slot.
    async def calls():
        scheduler = new_service()
        scheduler.unclaimed["resumed-job"] = time.monotonic() + 60
        for _ in range(3):
            with pytest.raises(service.UnknownJobError), \
                    scheduler.waiting_call([["not", "an", "id"]]):
                await scheduler.result(["not", "an", "id"])
        return scheduler.waiting_calls

    assert asyncio.run(calls()) == 0


def test_after_shutdown_submits_and_aborts_are_refused(new_service):
    # `down` closes the journal, then kills the actor: calls in between get one clear line
    # (an HTTP 503), not "journal ... is closed" from deep inside.
    async def shut_down():
        scheduler = new_service()
        add_worker(scheduler, "w")
        [job_id] = scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "job")])
        await scheduler.shutdown()
        return scheduler, job_id

    scheduler, job_id = asyncio.run(shut_down())
    for call in (lambda: scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, None)]),
                 lambda: scheduler.abort(job_id)):
        with pytest.raises(service.GoingDownError, match="going down"):
            call()
    assert scheduler.unfinished_jobs == 1


def test_a_late_report_of_a_forgotten_job_does_not_reach_a_new_job_of_its_id(new_service):
    # Job A is aborted while its worker's step is under way, then forgotten (it is the oldest
    # finished job past max_finished_jobs=1); a client submits a new job under the same id.
    # The old worker's last report of A (a token, then its abort) must not land in the new A.
    async def reuse():
        scheduler = new_service(max_finished_jobs=1)
        old = add_worker(scheduler, "old")
        scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "A")])
        [old_run] = [call[1] for call in old.actor.sent if call[0] == "add"]
        scheduler.abort("A")
        scheduler.submit_many([([1, 2, 3], {"max_tokens": 8}, 0, "B")])
        [b_run] = [call[1] for call in old.actor.sent if call[0] == "add"][1:]
        scheduler.report("old", 0, [RequestOutput(b_run, 0, [9], "y", 3, "stop")], [], LOAD)
        assert "A" not in scheduler.jobs  # forgotten
        scheduler.submit_many([([4, 5, 6], {"max_tokens": 8}, 0, "A")])
        scheduler.report("old", 1, [RequestOutput(old_run, 0, [8], "z", 3, "abort")],
                         [(old_run, "request id in use")], LOAD)
        return scheduler.jobs["A"].samples[0]

    sample = asyncio.run(reuse())
    assert (sample.token_ids, sample.finish_reason) == ([], None)


def test_a_job_goes_only_to_a_worker_whose_kv_cache_can_hold_it(new_service):
    # Workers' KV caches differ (devices of other memory sizes, or profiled peaks that
    # differ): a job that only the big worker can hold is accepted (it fits there), and must
    # not be routed to the small one, whose engine would refuse it and fail the job.
    async def route():
        scheduler = new_service()
        small = add_worker(scheduler, "small")
        big = add_worker(scheduler, "big")
        small.info["max_tokens_fit"], big.info["max_tokens_fit"] = 1000, 4000
        prompts = [[(i * (j + 1)) % 250 + 1 for i in range(1500)] for j in range(4)]
        scheduler.submit_many([(prompt, {"max_tokens": 16}, 0, None) for prompt in prompts])
        return small, big

    small, big = asyncio.run(route())
    assert small.samples == set()
    assert len(big.samples) == 4


LONG_PROMPT = [i % 250 + 1 for i in range(1500)]  # only a worker holding 1,500+ tokens can


def job_names(calls: list[str]) -> list[str]:
    """The job ids of engine request ids."""
    return [call.split("/")[0] for call in calls]


def long_job_on_a_dead_big_worker(new_service):
    """A small and a big worker; job "long", which only the big one holds, ran there and the
    big one died. Returns the scheduler and the small worker."""
    scheduler = new_service()
    small = add_worker(scheduler, "small", "small-node", fit=1000)
    big = add_worker(scheduler, "big", "big-node", fit=4000)
    scheduler.submit_many([(LONG_PROMPT, {"max_tokens": 16}, 0, "long")])
    scheduler._on_worker_gone(big, "died")
    return scheduler, small


@pytest.mark.parametrize("node_comes_back", [True, False])
def test_a_job_only_a_dead_larger_worker_could_hold_waits_for_its_replacement(new_service,
                                                                             node_comes_back):
    # It failed over to the small worker, whose engine refused it: an accepted job failed
    # because its worker died. Meanwhile the jobs that fit the small worker go on there.
    async def fail_over():
        scheduler, small = long_job_on_a_dead_big_worker(new_service)
        # a job of the same size is still accepted, and a short one goes on at once
        scheduler.submit_many([(LONG_PROMPT, {"max_tokens": 8}, 0, "long2"),
                               ([1, 2, 3], {"max_tokens": 8}, 0, "short")])
        held = (scheduler.status()["pending_samples"], len(adds(small)))
        if node_comes_back:
            replacement = add_worker(scheduler, "big2", "big-node", fit=4000)
        else:  # its node left the cluster: nothing will hold them
            scheduler.npu_nodes.pop("big-node")
            replacement = None
        scheduler._drain_pending()
        return scheduler, small, replacement, held

    scheduler, small, replacement, held = asyncio.run(fail_over())
    assert held == (2, 1)  # both long jobs held, the short one sent to the small worker
    assert adds(small)[0].startswith("short/")
    if node_comes_back:
        assert job_names(adds(replacement)) == ["long", "long2"]
        assert len(adds(small)) == 1
        assert not any(scheduler.jobs[j].finished for j in ("long", "long2"))
    else:  # sent where they will be refused: the engine's refusal then fails them with why
        assert sorted(job_names(adds(small)[1:])) == ["long", "long2"]
        assert scheduler.status()["pending_samples"] == 0


def test_a_held_job_is_let_go_once_its_nodes_new_worker_is_ready_but_smaller(new_service):
    # A device's free memory sets its cache: the dead worker's replacement may hold less. No
    # larger worker is then coming, so the job must go on (to be refused with why), not wait
    # for good behind the node's best size so far.
    async def replaced_smaller():
        scheduler, small = long_job_on_a_dead_big_worker(new_service)
        replacement = add_worker(scheduler, "big2", "big-node", fit=1200)
        scheduler._drain_pending()
        return scheduler, adds(small) + adds(replacement)

    scheduler, sent = asyncio.run(replaced_smaller())
    assert job_names(sent) == ["long"]
    assert scheduler.status()["pending_samples"] == 0


def test_a_resumed_backlog_waits_for_the_loading_workers_where_some_npu_cannot_be_placed(
        new_service):
    """A scheduler restarted where one node had more NPUs than its CPUs could give workers
    sent its whole backlog from the journal to the first worker ready: 64 jobs ran on one
    worker, its KV cache full and half of them waiting, beside two idle workers."""
    async def restart():
        before = new_service()
        add_worker(before, "old", "node-a")
        before.submit_many([([1, 2, 3 + i], {"max_tokens": 8}, 0, f"job{i}") for i in range(8)])
        before.journal.close()
        after = new_service()  # resumes the 8 jobs from the journal
        after.placement_problem = "only 2 of 3 workers can be placed"
        first = add_worker(after, "first", "node-a")
        after.workers["second"] = service.WorkerSlot("second", Actor(), "node-b")  # loading
        after._drain_pending()
        held = len(adds(first))
        after.workers.pop("second")
        second = add_worker(after, "second", "node-b")
        after._drain_pending()
        return held, adds(first), adds(second)

    held, sent_first, sent_second = asyncio.run(restart())
    assert held == 0
    assert len(sent_first) == len(sent_second) == 4


@pytest.mark.parametrize("placeable", [True, False])
def test_a_resumed_job_only_a_worker_still_loading_could_hold_waits_for_it(new_service,
                                                                          monkeypatch, placeable):
    # A restarted scheduler knows no worker's size until each is ready: past the backlog's
    # hold for loading workers, the job went to the small worker ready first, which refused it.
    monkeypatch.setattr(service, "PENDING_HOLD_S", 0.0)

    async def restart():
        before = new_service()
        add_worker(before, "big", "big-node", fit=4000)
        before.submit_many([(LONG_PROMPT, {"max_tokens": 16}, 0, "long")])
        before.journal.close()
        after = new_service()  # resumes "long" from the journal
        small = add_worker(after, "small", "small-node", fit=1000)
        after.workers["big2"] = service.WorkerSlot("big2", Actor(), "big-node")  # loading
        after.npu_nodes["big-node"] = 1
        after.placement_problem = None if placeable else "only 1 of 2 workers can be placed"
        after._drain_pending()
        held = (adds(small), after.status()["pending_samples"])
        after.workers.pop("big2")
        big = add_worker(after, "big2", "big-node", fit=4000)
        after._drain_pending()
        return held, adds(big)

    (sent_small, pending), sent_big = asyncio.run(restart())
    if placeable:
        assert sent_small == [] and pending == 1
        assert job_names(sent_big) == ["long"]
    else:  # a worker that may never be placed is not waited for: refused, saying why
        assert job_names(sent_small) == ["long"] and pending == 0


def test_a_job_no_worker_could_hold_is_refused_naming_the_largest_cache(new_service):
    # Counted with the larger worker coming back: it holds 1,800 tokens, the ready one 1,000.
    async def submit(*prompt_lens: int):
        scheduler = new_service()
        add_worker(scheduler, "small", "small-node", fit=1000)
        scheduler._on_worker_gone(add_worker(scheduler, "big", "big-node", fit=1800), "died")
        for i, prompt_len in enumerate(prompt_lens):
            scheduler.submit_many([([1] * prompt_len, {"max_tokens": 16}, 0, f"job{i}")])

    with pytest.raises(InvalidRequestError, match="job needs up to 1916 tokens of KV cache but "
                                                  "a worker holds at most 1800; shorten"):
        asyncio.run(submit(1700, 1900))  # the first accepted: it waits for the big worker

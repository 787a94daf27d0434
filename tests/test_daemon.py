"""The daemon on a real local Ray cluster with two simulated NPUs: routing, streaming, abort,
failover of killed workers, scheduler restart from the journal, overload, up/down."""
import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import yaml

from daemon_helpers import daemon_config, ready_workers, wait_for

from cluster import batch_submit, bringup, cli, daemon_cmds, demo, job_cmds
from cluster.config import config_from_dict, config_to_dict, with_overrides
from cluster.journal import Journal
from cluster.client import Client, DaemonUnavailableError
from scheduler.gone_workers import GoneWorker
from scheduler.logs import _gone_tail
from scheduler.sampling_params import InvalidRequestError, SamplingParams
from scheduler.service import (NAMESPACE, DrainingError, OverloadedError, UnknownJobError,
                               worker_actor_name)
from worker.models.tiny import tiny_model_dir
from worker.tokenizer import Tokenizer

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py

NUM_JOBS = 32


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cfg = daemon_config(tmp_path_factory.mktemp("daemon"), max_queued_jobs=48,
                        tied_job_claim_s=3)
    ray.init(address="local", num_cpus=4, resources={"NPU": 2}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        status = bringup.up(cfg, min_workers=1)  # also waits for the other worker, still loading
        yield cfg, status, Client()
    finally:
        bringup.down()
        ray.shutdown()


def jobs(count=NUM_JOBS, max_tokens=40):
    """Seeded sampling with penalties: any lost, doubled or misplaced token changes the output."""
    return [(f"job {i}: " + "tell me about the cluster " * (1 + i % 5),
             SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=40, seed=1000 + i,
                            repetition_penalty=1.1, ignore_eos=True))
            for i in range(count)]


@pytest.fixture(scope="module")
def undisturbed(daemon):
    _, _, client = daemon
    ids = [client.submit(p, s) for p, s in jobs()]
    return [client.result(j, timeout=300).outputs[0].token_ids for j in ids]


def test_up_starts_one_worker_per_npu_reports_them_all_and_twice_is_harmless(
        daemon, monkeypatch, tmp_path, capsys):
    cfg, status, client = daemon
    workers = [w for w in status["workers"] if w["ready"]]
    assert len(workers) == 2 and {w["npu_ids"][0] for w in workers} == {"0", "1"}
    table = daemon_cmds.format_status(status)
    assert "sim npu0" in table and "sim npu1" in table  # which logical NPU each one holds
    again = bringup.up(cfg, min_workers=2)
    assert {w["pid"] for w in again["workers"]} == {w["pid"] for w in workers}
    assert again["config_not_applied"] == []
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert cli.main(["up", "--config", str(same), "--min-workers", "2"]) == 0
    assert capsys.readouterr().err == "pagedserve: already up, with this config\n"
    other = with_overrides(cfg, engine={"max_num_seqs": 7}, scheduler={"router": "round_robin"})
    assert bringup.up(other)["config_not_applied"] == [  # kept running as it was
        f"engine.max_num_seqs: running {cfg.engine.max_num_seqs}, asked 7",
        f"scheduler.router: running {cfg.scheduler.router!r}, asked 'round_robin'"]
    # another `up` took the name between this one's look and its create: it found the
    # daemon it did not start, thought it had, and said nothing of its own config
    real_find, looks = bringup.find_scheduler, []
    monkeypatch.setattr(bringup, "find_scheduler",
                        lambda: real_find() if looks or looks.append(1) else None)
    assert bringup.up(other)["config_not_applied"][0].startswith("engine.max_num_seqs:")
    monkeypatch.undo()
    with pytest.raises(bringup.DaemonStartError, match=r"^fewer than 3 workers ready after 1(\.0)? "
                       r"s; NPU resources in the cluster: 2; the daemon stays up"):
        bringup.up(cfg, min_workers=3, timeout=1)
    assert len(ready_workers(client)) == 2


def test_logs_shows_the_schedulers_and_each_workers_log(daemon, capsys):
    """Their logs were only in Ray's session directory on each node, in files named by Ray's
    ids, which nothing of pagedserve pointed to."""
    _, _, client = daemon
    workers = ready_workers(client)
    assert cli.main(["logs", "-n", "500"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    gone = client.status()["gone_workers"]
    assert headers[0].startswith("== scheduler (pid ")
    assert len(headers) == 1 + len(workers) + len(gone)
    for w in workers:
        assert f"== worker {w['worker_id']} (pid {w['pid']} on node {w['node_id'][:8]}): " in out
        assert f"INFO:pagedserve.scheduler:worker {w['worker_id']} ready on cpu:0" in out
    first = workers[0]
    scheduler, worker = client.logs(500, [first["worker_id"]])
    assert scheduler["source"] == "scheduler" and worker["source"] == first["worker_id"]
    assert worker["file"].endswith(f"-{first['pid']}.err")
    assert any(line.startswith("INFO:pagedserve.engine:KV cache: ") for line in worker["lines"])
    assert not any(line.startswith(":actor_name:") for line in worker["lines"])  # Ray's marks
    assert len(client.logs(1)[0]["lines"]) == 1
    os.kill(first["pid"], signal.SIGSTOP)  # a hung worker: named, and the exit status says so
    try:
        assert cli.main(["logs", "--worker", first["worker_id"]]) == 1
    finally:
        os.kill(first["pid"], signal.SIGCONT)
    assert "   (did not answer within 10 s)" in capsys.readouterr().out
    assert cli.main(["logs", "--worker", "nope"]) == 2
    assert ("no worker 'nope' running or among the 8 gone most recently; `pagedserve status` "
            "lists those running") in capsys.readouterr().err


def test_a_gone_workers_log_is_read_on_its_node_or_says_why_not(daemon, tmp_path):
    """Only live workers could show their logs, so the end of a dead worker's log, where it
    says what went wrong, was out of reach once the scheduler had replaced it."""
    log = tmp_path / "w1.err"
    log.write_text(":actor_name:WorkerActor\nfirst\nlast words\n")
    here = ray.get_runtime_context().get_node_id()
    gone = GoneWorker("w1", here, 7, str(log), "died", time.time())
    assert asyncio.run(_gone_tail(gone, 1, 60)) == {"pid": 7, "file": str(log),
                                                    "lines": ["last words"]}
    no_file = dataclasses.replace(gone, log_file=None)
    assert asyncio.run(_gone_tail(no_file, 1, 60)) == {"pid": 7, "file": None, "lines": []}
    log.unlink()
    assert asyncio.run(_gone_tail(gone, 1, 60))["error"].startswith(
        "not readable: [Errno 2] No such file or directory")
    elsewhere = dataclasses.replace(gone, node_id="ab" * 28)
    assert asyncio.run(_gone_tail(elsewhere, 1, 60))["error"] == "its node has left the cluster"


def test_an_interrupted_up_says_the_daemon_goes_on_starting(daemon, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bringup, "up", interrupted)
    assert cli.main(["up", "--address", ray.get_runtime_context().gcs_address]) == 130
    assert capsys.readouterr().err == (
        "pagedserve: stopped waiting; the daemon goes on starting (`pagedserve status` shows "
        "it, `pagedserve down` stops it)\npagedserve: interrupted\n")


def test_up_reports_while_it_waits_for_workers(daemon, monkeypatch, capsys):
    monkeypatch.setattr(bringup, "WAIT_REPORT_S", 0.3)
    assert cli.main(["up", "--min-workers", "3", "--timeout", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    waiting = [line for line in err if line.startswith("pagedserve: waiting for workers: ")]
    assert len(waiting) >= 3 and waiting[0].startswith(
        "pagedserve: waiting for workers: 2 ready, 0 loading the model (up ")
    assert err[-1].startswith("pagedserve: error: fewer than 3 workers ready after 2")


def test_a_client_for_another_cluster_is_refused_not_silently_given_this_one(daemon):
    _, _, client = daemon
    here = ray.get_runtime_context().gcs_address
    assert Client(address=here).status()["jobs_unfinished"] == client.status()["jobs_unfinished"]
    with pytest.raises(bringup.ClusterNotFoundError, match=(
            rf"^this process is already connected to the Ray cluster at {here}, not "
            r"'127.0.0.1:1'; a process can use one cluster at a time")):
        Client(address="127.0.0.1:1")


def test_jobs_are_routed_over_both_workers(daemon, undisturbed):
    _, _, client = daemon
    assert all(len(t) == 40 for t in undisturbed)
    ids = [client.submit(p, s) for p, s in jobs(8)]
    placed = {client.status_of(j)["workers"][0] for j in ids}
    for j in ids:
        client.result(j, timeout=120)
    assert len(placed) == 2


def test_stream_delivers_every_token_once(daemon, undisturbed):
    _, _, client = daemon
    prompt, params = jobs()[3]
    job_id = client.submit(prompt, params)
    streamed, text = [], ""
    for delta in client.stream(job_id):
        streamed += delta.new_token_ids
        text += delta.text
    result = client.result(job_id).outputs[0]
    assert streamed == result.token_ids == undisturbed[3]
    assert text == result.text


def test_the_asyncio_calls_submit_stream_and_answer_alike(daemon, undisturbed):
    _, _, client = daemon
    prompt, params = jobs()[4]

    async def submit_and_stream():
        job_id = await client.asubmit(prompt, params)
        streamed = [t async for delta in client.astream(job_id) for t in delta.new_token_ids]
        return streamed, await client.aresult(job_id)

    streamed, result = asyncio.run(submit_and_stream())
    assert streamed == result.outputs[0].token_ids == undisturbed[4]


def test_idle_workers_report_their_rate_falling_to_zero(daemon, undisturbed):
    _, _, client = daemon
    client.result(client.submit("warm", SamplingParams(max_tokens=30, ignore_eos=True)))
    assert any(w["tokens_per_s"] > 0 for w in ready_workers(client))
    # with nothing to run, the rate window (10 s) empties; status must not keep the last rate
    wait_for(lambda: all(w["tokens_per_s"] == 0 for w in ready_workers(client)), timeout=30,
             what="idle workers' tokens/s to reach 0")


def test_abort_stops_the_job_and_frees_its_blocks(daemon):
    _, _, client = daemon
    job_id = client.submit("abort me", SamplingParams(max_tokens=1500, ignore_eos=True))
    wait_for(lambda: sum(client.status_of(job_id)["num_tokens"]) > 3, what="first tokens")
    assert client.abort(job_id)
    assert client.result(job_id, timeout=30).outputs[0].finish_reason == "abort"
    wait_for(lambda: all(w.get("kv_used", 1) == 0 for w in ready_workers(client)),
             timeout=30, what="blocks freed")


@pytest.mark.parametrize("how", ["ray.kill", "kill -9"])
def test_killed_worker_loses_no_job(daemon, undisturbed, how):
    _, _, client = daemon
    failovers = client.status()["failovers"]
    ids = [client.submit(p, s) for p, s in jobs()]
    victim = wait_for(lambda: _busy_worker(client), what="a worker with running jobs")
    if how == "ray.kill":
        ray.kill(ray.get_actor(worker_actor_name(victim["worker_id"]), namespace=NAMESPACE))
    else:
        os.kill(victim["pid"], signal.SIGKILL)
    got = [client.result(j, timeout=300).outputs[0].token_ids for j in ids]
    assert got == undisturbed
    assert client.status()["failovers"] > failovers
    # the freed NPU gets a new worker
    wait_for(lambda: len(ready_workers(client)) == 2 and victim["pid"] not in
             {w["pid"] for w in ready_workers(client)}, timeout=180, what="respawn")
    # why it went, and the end of its log, are still there to see (only live workers' were)
    gone = client.status()["gone_workers"][-1]
    assert gone["worker_id"] == victim["worker_id"] and gone["pid"] == victim["pid"]
    assert gone["why"] == ("died: it was killed by `ray.kill`." if how == "ray.kill" else
                           "died: its process ended unexpectedly (killed, out of memory, or "
                           "crashed)")  # not Ray's paragraph on the causes
    scheduler, tail = client.logs(500, [victim["worker_id"]])
    assert tail["gone"] == gone["why"] and tail["file"] == victim["log_file"]
    assert any(line.startswith("INFO:pagedserve.engine:KV cache: ") for line in tail["lines"])
    if how == "kill -9":  # a gone worker's log since removed (or on a node that has left)
        os.remove(victim["log_file"])
        assert cli.main(["logs", "-n", "1"]) == 0  # every live process's log was read
        assert cli.main(["logs", "-n", "1", "--worker", victim["worker_id"]]) == 1  # asked for


def _busy_worker(client):
    busy = [w for w in ready_workers(client) if w.get("running", 0) > 2]
    return busy[0] if busy else None


def test_overload_fails_fast_with_a_clear_error(daemon):
    _, _, client = daemon
    ids = []
    with pytest.raises(OverloadedError, match="overloaded: the queue holds 48 samples"):
        for _ in range(60):
            ids.append(client.submit("x", SamplingParams(max_tokens=500, ignore_eos=True)))
    assert len(ids) == 48
    for j in ids:
        client.abort(j)
    wait_for(lambda: client.status()["jobs_unfinished"] == 0, timeout=30, what="the aborts")
    # one submit_many of several batches: its first ones were accepted, and the error said
    # only that the queue was full
    with pytest.raises(OverloadedError) as caught:
        client.submit_many(["y"] * 60, SamplingParams(max_tokens=500, ignore_eos=True),
                           batch_size=16)
    accepted = caught.value.submitted
    assert len(accepted) == 48 and str(caught.value).endswith(
        "(48 jobs of this call accepted before it: withdraw() them, or submit the rest)")
    assert client.withdraw(accepted) == 48


def test_more_waiting_calls_than_ray_runs_by_default_still_let_the_jobs_finish(daemon):
    """1,100 result calls wait on one running job (an HTTP server makes one per request):
    with Ray's default of 1,000 concurrent calls per actor, the workers' reports queued behind
    them and the job never finished, a deadlock that only `down` ended."""
    _, _, client = daemon
    job = client.submit("many wait for me", SamplingParams(max_tokens=24, ignore_eos=True))
    scheduler = bringup.find_scheduler()
    summaries = ray.get([scheduler.result.remote(job, 90) for _ in range(1100)], timeout=120)
    assert {len(s["outputs"][0]["token_ids"]) for s in summaries} == {24}
    assert client.status()["waiting_calls"] == 0


def test_a_stream_left_before_its_end_frees_its_waiting_call_at_once(daemon):
    """A stream closed early held one of max_waiting_calls until its job ended: a few
    clients peeking at long jobs could leave every new stream and result refused."""
    _, _, client = daemon
    job = client.submit("peeked at", SamplingParams(max_tokens=1500, ignore_eos=True))
    for _ in range(3):
        stream = client.stream(job)
        next(stream)
        stream.close()

    async def peek():
        outputs = await client.aopen_stream([job])
        await anext(outputs)
        await outputs.aclose()

    asyncio.run(peek())
    wait_for(lambda: client.status()["waiting_calls"] == 0, timeout=10, what="the slots back")
    assert not client.status_of(job)["finished"]
    assert client.abort(job)


def test_a_job_id_already_in_use_is_refused_not_answered_with_the_other_job(daemon):
    _, _, client = daemon
    greedy = SamplingParams(max_tokens=2, temperature=0)
    job = client.submit("mine", greedy, job_id="chosen-id")
    with pytest.raises(InvalidRequestError, match="'chosen-id' is already in use"):
        client.submit("someone else's", greedy, job_id="chosen-id")  # was: returned "chosen-id"
    assert client.result(job).outputs[0].token_ids == client.result(
        client.submit("mine", greedy)).outputs[0].token_ids


@pytest.mark.parametrize("job_id", [123, " ", "a\nb", "x" * 257])
def test_a_job_id_that_is_not_plain_text_is_refused(daemon, job_id):
    """123 came back as a remote traceback; " " was taken, and `result -` (which strips the
    lines it reads) could not ask for it."""
    _, _, client = daemon
    with pytest.raises(InvalidRequestError, match=r"^invalid job_id=.*: it must be 1 to 256 "
                                                  "printable characters, none of them whitespace"):
        client.submit("named oddly", SamplingParams(max_tokens=1), job_id=job_id)


@pytest.mark.parametrize("timeout", ["5", float("nan"), -1, float("inf")])
def test_a_result_timeout_that_is_not_a_number_of_seconds_is_refused(daemon, timeout):
    """NaN waited forever; "5" came back as a remote TypeError traceback."""
    _, _, client = daemon
    job = client.submit("timed", SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match=r"^invalid timeout=.*: it must be a number "):
        client.result(job, timeout=timeout)
    assert client.result(job, timeout=60).outputs[0].finish_reason == "length"


def test_a_stopped_scheduler_is_reported_in_one_error_not_waited_on_forever(daemon):
    _, _, client = daemon
    pid = client.status()["scheduler_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(DaemonUnavailableError, match="did not answer status within 1 s"):
            Client(timeout_s=1).status()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert client.status()["scheduler_pid"] == pid


STATUS_FROM_A_NEW_PROCESS = """
import sys, time
from cluster.client import Client, DaemonUnavailableError
client = Client(address=sys.argv[1], timeout_s=float(sys.argv[2]))
started = time.monotonic()
try:
    client.status()
except DaemonUnavailableError as exc:
    print(f"{time.monotonic() - started:.1f} {exc}")
"""


def test_a_process_that_first_calls_a_stopped_scheduler_gives_up_after_its_timeout(daemon):
    """A process with no connection to the scheduler yet gets ActorUnavailableError from Ray
    after ~20 s of trying to connect to a stopped one; the call took that for a restart and
    waited timeout_s more (`pagedserve logs`: 55 s for its 30, "gone ... did not come
    back")."""
    _, _, client = daemon
    pid, timeout_s = client.status()["scheduler_pid"], 25
    os.kill(pid, signal.SIGSTOP)
    try:
        said = subprocess.run(
            [sys.executable, "-c", STATUS_FROM_A_NEW_PROCESS,
             ray.get_runtime_context().gcs_address, str(timeout_s)],
            capture_output=True, text=True, timeout=3 * timeout_s + 60).stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    waited, error = said.split(" ", 1)
    assert float(waited) < timeout_s + 5, said
    assert "stuck or stopped" in error, said
    assert client.status()["scheduler_pid"] == pid


def test_calls_waiting_for_jobs_end_once_the_scheduler_stops_answering(daemon):
    """A result wait or a stream (an HTTP request in flight) has no answer timeout, since
    jobs may rightly take long: with the scheduler stopped (or deadlocked) they waited for as
    long as it stayed so, an HTTP stream silent all along. They now end once it has answered
    no ping for timeout_s, in asyncio code and in blocking code alike."""
    _, _, client = daemon
    quick = Client(timeout_s=2)
    job = client.submit("waits on a stopped scheduler",
                        SamplingParams(max_tokens=1500, ignore_eos=True))
    wait_for(lambda: client.status_of(job)["num_tokens"][0] > 0, what="the job running")
    status = client.status()
    pid, workers = status["scheduler_pid"], [w["pid"] for w in status["workers"] if w.get("pid")]
    for worker in workers:  # else on a loaded host the job could end while the scheduler is
        os.kill(worker, signal.SIGSTOP)  # stopped, and the second stream end without waiting

    async def drain(outputs):
        async for _ in outputs:
            pass

    async def wait_on_a_stopped_scheduler():
        stream = await quick.aopen_stream([job])
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        ended = await asyncio.gather(quick.aresult(job), drain(stream), return_exceptions=True)
        return ended, time.monotonic() - started

    def block_on_a_stopped_scheduler():
        stream = quick.stream(job)
        next(stream)
        os.kill(pid, signal.SIGSTOP)
        ended = []
        for wait in (lambda: quick.result(job), lambda: list(stream)):
            started = time.monotonic()
            with pytest.raises(DaemonUnavailableError) as error:
                wait()
            ended.append((error.value, time.monotonic() - started))
        return ended

    try:
        try:
            ended, waited = asyncio.run(wait_on_a_stopped_scheduler())
            ended = [(error, waited) for error in ended]
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            ended += block_on_a_stopped_scheduler()
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        for worker in workers:
            _continue(worker)
    for method, (error, waited) in zip(("result", "stream") * 2, ended):
        assert isinstance(error, DaemonUnavailableError), error
        assert str(error).startswith("the pagedserve scheduler has not answered for 2 s while "
                                     f"{method} waited: it is stuck or stopped")
        assert 2 < waited < 10
    assert client.abort(job)


def test_calls_end_at_once_when_the_cluster_is_marked_gone(daemon):
    """What `pagedserve serve` does when the GCS stops answering (`ray stop`): every wait,
    asyncio or blocking, ends with DaemonUnavailableError, not after timeout_s."""
    _, _, client = daemon
    job = client.submit("outlives the cluster", SamplingParams(max_tokens=1500, ignore_eos=True))
    doomed = Client(timeout_s=2)
    stream = doomed.stream(job)
    next(stream)

    async def wait_then_mark():
        waits = asyncio.gather(doomed.aresult(job), return_exceptions=True)
        await asyncio.sleep(0.2)
        doomed.mark_cluster_gone("nothing answers at the GCS")
        return await waits

    started = time.monotonic()
    [error] = asyncio.run(wait_then_mark())
    with pytest.raises(DaemonUnavailableError, match=r"^the Ray cluster is gone \(nothing "):
        list(stream)
    with pytest.raises(DaemonUnavailableError, match="the Ray cluster is gone"):
        doomed.result(job)
    assert isinstance(error, DaemonUnavailableError) and time.monotonic() - started < 3
    assert client.abort(job)  # the client not marked goes on


def test_submit_many_keeps_input_order_and_outputs(daemon, undisturbed):
    _, _, client = daemon
    prompts, params = zip(*jobs(8))
    ids = client.submit_many(list(prompts), list(params))
    assert len(set(ids)) == 8
    assert [client.result(j, timeout=300).outputs[0].token_ids for j in ids] == undisturbed[:8]


def test_finished_results_come_many_to_a_call(daemon, monkeypatch):
    _, _, client = daemon
    ids = client.submit_many(["a", "b", "c"], SamplingParams(max_tokens=2, temperature=0))
    expected = [client.result(j, timeout=60).outputs[0].token_ids for j in ids]
    calls = []
    real_call = Client._call

    def counted(self, method, *args, **kwargs):
        calls.append(method)
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(Client, "_call", counted)
    assert [o.outputs[0].token_ids for o in client.results(ids)] == expected
    assert calls == ["results"]  # one round trip for the three finished jobs
    outcomes = client.iter_results([ids[0], "no-such-job", ids[1]])
    assert next(outcomes)[0] == ids[0]  # what comes before an unknown id still comes
    with pytest.raises(UnknownJobError, match="no-such-job"):
        next(outcomes)


def _accepted(client) -> int:
    status = client.status()
    return status["jobs_unfinished"] + status["jobs_finished_kept"]


def test_submit_many_refuses_a_batch_with_a_bad_job_whole(daemon):
    _, _, client = daemon
    before = _accepted(client)
    with pytest.raises(InvalidRequestError, match="job 1: prompt is empty") as caught:
        client.submit_many(["fine", "", "fine too"], SamplingParams(max_tokens=2))
    assert caught.value.submitted == []
    assert (caught.value.job_index, caught.value.reason) == (1, "prompt is empty")
    with pytest.raises(InvalidRequestError, match="job 2: .*temperature"):
        client.submit_many(["a", "b", "c"], [{}, {}, {"temperature": -1.0}])
    with pytest.raises(InvalidRequestError, match="job 0: params must be a SamplingParams"):
        client.submit_many(["a", "b"], "greedy")
    with pytest.raises(InvalidRequestError, match="got str"):
        client.submit("a", "greedy")
    with pytest.raises(InvalidRequestError, match="job 1: invalid priority=5: the scheduling "
                                                  "policy is fcfs"):
        client.submit_many(["a", "b"], SamplingParams(max_tokens=2), priorities=[0, 5])
    assert _accepted(client) == before


def test_submit_many_past_the_queue_limit_is_refused_whole(daemon):
    _, _, client = daemon
    before = _accepted(client)
    with pytest.raises(OverloadedError, match="can never fit max_queued_jobs=48"):
        client.submit_many(["x"] * 60, SamplingParams(max_tokens=2))
    long_jobs = SamplingParams(max_tokens=500, ignore_eos=True)  # still queued at the 2nd batch
    with pytest.raises(OverloadedError, match="this batch adds 30") as caught:
        client.submit_many(["x"] * 60, long_jobs, batch_size=30)
    assert len(caught.value.submitted) == 30
    for job_id in caught.value.submitted:
        client.abort(job_id)
    assert _accepted(client) == before + 30


def test_submit_cli_prints_results_in_input_order(daemon, tmp_path, capsys):
    _, _, client = daemon
    lines = [{"prompt": "first", "max_tokens": 3, "ignore_eos": True},
             {"prompt_token_ids": [5, 6, 7], "max_tokens": 5, "ignore_eos": True},
             {"prompt": "third", "max_tokens": 1, "ignore_eos": True}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines))
    assert cli.main(["submit", "--prompts", str(jobs_file), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [len(r["token_ids"]) for r in records] == [3, 5, 1]
    assert records[2]["token_ids"] == client.result(records[2]["job_id"]).outputs[0].token_ids
    assert records[1]["num_prompt_tokens"] == 3


def test_submit_no_wait_then_result_abort_and_jobs_by_id(daemon, capsys, monkeypatch):
    _, _, client = daemon
    seeded = ["--temperature", "0.8", "--seed", "7", "--max-tokens", "6", "--ignore-eos"]
    assert cli.main(["submit", "--prompt", "one", "--prompt", "two", "--no-wait", "--json",
                     *seeded]) == 0
    out, err = capsys.readouterr()
    queued = [json.loads(line) for line in out.splitlines()]
    assert [q["index"] for q in queued] == [0, 1]
    assert "pagedserve: queued 2 jobs; `pagedserve result JOB_ID...`" in err
    ids = [q["job_id"] for q in queued]
    assert cli.main(["result", ids[1], ids[0], "--json"]) == 0  # in the order asked for
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["job_id"]) for r in records] == [(0, ids[1]), (1, ids[0])]
    assert [r["token_ids"] for r in records] == [
        client.result(j).outputs[0].token_ids for j in (ids[1], ids[0])]
    assert all(len(r["token_ids"]) == 6 for r in records)
    assert cli.main(["result", ids[0]]) == 0  # on a terminal: the text
    assert capsys.readouterr().out == client.result(ids[0]).outputs[0].text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(out))  # `submit --no-wait --json | result -`
    assert cli.main(["result", "-", "--json"]) == 0
    assert [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()] == [
        client.result(j).outputs[0].token_ids for j in ids]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ids[0]}\n{{\"id\": 1}}\n"))
    assert cli.main(["result", "-"]) == 2
    assert capsys.readouterr().err.strip() == (
        'pagedserve: error: stdin:2: a JSON line must be an object with a "job_id"')

    assert cli.main(["result", ids[0], "no-such-job"]) == 2  # checked before printing any
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        "pagedserve: error: unknown job id 'no-such-job': never submitted, or finished and "
        "forgotten")

    assert cli.main(["submit", "--prompt", "long", "--max-tokens", "1500", "--ignore-eos",
                     "--no-wait"]) == 0
    long_id = capsys.readouterr().out.strip()
    assert cli.main(["jobs", "--json", "--finished", "2"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    unfinished = [job for job in listed if not job["finished"]]
    assert long_id in [job["job_id"] for job in unfinished]
    assert listed[:len(unfinished)] == unfinished
    assert len(listed) - len(unfinished) == 2
    assert cli.main(["jobs"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(long_id))
    assert row.split()[1] in ("queued", "running") and row.split()[2].endswith("/1500")

    assert cli.main(["abort", long_id, ids[0]]) == 0
    assert capsys.readouterr().out == f"aborted {long_id}\n{ids[0]} had already finished\n"
    assert client.result(long_id, timeout=30).outputs[0].finish_reason == "abort"
    newest = client.jobs(finished_limit=1)[-1]  # the abort is the latest finish
    assert (newest["job_id"], newest["finish_reasons"]) == (long_id, ["abort"])
    assert cli.main(["jobs", "--finished", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == [long_id, "abort"]


def test_submit_many_can_wait_for_room_in_a_full_queue(daemon):
    _, _, client = daemon
    ids = client.submit_many([f"wave {i}" for i in range(100)],  # the queue holds 48
                             SamplingParams(max_tokens=4, ignore_eos=True), batch_size=20,
                             wait_for_room=True)
    assert len(set(ids)) == 100
    assert [len(client.result(j, timeout=300).outputs[0].token_ids) for j in ids] == [4] * 100


def test_a_submit_that_waits_long_for_room_says_so(daemon, monkeypatch, capsys):
    _, _, client = daemon
    monkeypatch.setattr(batch_submit, "WAIT_REPORT_S", 0.0)  # else said after 10 s of waiting
    for job in client.jobs(finished_limit=0):  # earlier tests' leftovers
        client.abort(job["job_id"])
    full = client.submit_many([f"long {i}" for i in range(48)],  # the queue holds 48
                              SamplingParams(max_tokens=100, ignore_eos=True))
    assert cli.main(["submit", "--prompt", "one more", "--max-tokens", "2", "--json"]) == 0
    assert ("pagedserve: the daemon's queue is full (48 unfinished jobs, "
            "scheduler.max_queued_jobs=48): waiting for room") in capsys.readouterr().err
    assert any(client.status_of(j)["finished"] for j in full)  # it ran once there was room
    for job_id in full:
        client.abort(job_id)


def test_submit_cli_sends_more_jobs_than_the_queue_holds(daemon, tmp_path, capsys):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps({"prompt": f"line {i}", "max_tokens": 2,
                                               "ignore_eos": True}) for i in range(300)))
    assert cli.main(["submit", "--prompts", str(jobs_file), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == list(range(300))
    assert {len(r["token_ids"]) for r in records} == {2}


@pytest.mark.parametrize("count, signals, code, said", [
    (4, [signal.SIGINT], 130, "pagedserve: interrupted"),
    # a second Ctrl-C cut the withdrawing (seconds, for many jobs) short: the jobs not yet
    # aborted ran on for nobody
    (300, [signal.SIGINT, signal.SIGINT], 130, "pagedserve: interrupted"),
    # `timeout`, a batch system, a closed terminal: Ray's handler exited with a crash report
    # and every job ran on
    (4, [signal.SIGTERM], 143, "pagedserve: stopped by SIGTERM"),
    (4, [signal.SIGHUP], 129, "pagedserve: stopped by SIGHUP"),
], ids=["ctrl-c", "ctrl-c twice", "sigterm", "sighup"])
def test_an_interrupted_submit_aborts_the_jobs_it_queued(daemon, tmp_path, count, signals, code,
                                                         said):
    _, _, client = daemon
    jobs_file = tmp_path / "long.jsonl"
    jobs_file.write_text("\n".join(json.dumps({"prompt": f"long {i}", "max_tokens": 2000,
                                               "ignore_eos": True}) for i in range(count)))
    before, unfinished = _accepted(client), client.status()["jobs_unfinished"]
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "submit", "--prompts", str(jobs_file), "--json",
         "--address", ray.get_runtime_context().gcs_address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        # a paced submit keeps at most max_queued_jobs (48) waiting
        wait_for(lambda: _accepted(client) >= before + min(count, 48), timeout=60,
                 interval=0.1, what="the submitted jobs")
        for signum in signals:  # while it waits for the results
            submit.send_signal(signum)
            time.sleep(0.05)
        out, err = submit.communicate(timeout=60)
    finally:
        submit.kill()
    assert submit.returncode == code and out == ""
    aborted = _accepted(client) - before
    assert f"pagedserve: aborted the {aborted} unfinished jobs of this submit" in err
    assert err.rstrip().endswith(said) and "Traceback" not in err and "SIGTERM received" not in err
    wait_for(lambda: client.status()["jobs_unfinished"] <= unfinished, timeout=30,
             what="the aborted jobs to finish")


def test_an_interrupt_while_the_scheduler_takes_a_batch_leaves_no_job_running(
        daemon, monkeypatch, capsys):
    """Ctrl-C can land after the scheduler accepted a batch but before its answer arrives (it
    fsyncs the journal first): the submit knows those ids only as in flight, and still aborts
    them."""
    _, _, client = daemon
    real_call = Client._call

    def answer_lost(self, method, *args, **kwargs):
        result = real_call(self, method, *args, **kwargs)
        if method == "submit_many":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Client, "_call", answer_lost)
    with pytest.raises(KeyboardInterrupt) as caught:
        client.submit_many(["a", "b", "c"], SamplingParams(max_tokens=1500, ignore_eos=True))
    monkeypatch.undo()
    assert caught.value.submitted == [] and len(caught.value.in_flight) == 3
    assert all(not client.status_of(j)["finished"] for j in caught.value.in_flight)
    job_cmds._withdraw(client, [], caught.value.in_flight, interrupted=True)
    assert capsys.readouterr().err == "pagedserve: aborted the 3 unfinished jobs of this submit\n"
    assert all(client.result(j, timeout=30).outputs[0].finish_reason == "abort"
               for j in caught.value.in_flight)
    # a batch the interrupt stopped before it reached the scheduler: nothing to abort
    monkeypatch.setattr("cluster.client.IN_FLIGHT_WAIT_S", 0.3)
    started = time.monotonic()
    job_cmds._withdraw(client, [], [f"never-sent-{i}" for i in range(100)], interrupted=True)
    assert capsys.readouterr().err == "pagedserve: aborted the 0 unfinished jobs of this submit\n"
    # the batch's first id answers for all: each waited its 0.3 s, 30 s in all (a paced
    # submit's Ctrl-C hung for minutes withdrawing 250 ids that never arrived)
    assert time.monotonic() - started < 10


def test_submit_cli_with_a_bad_job_queues_none_and_says_which(daemon, tmp_path, capsys):
    _, _, client = daemon
    before = _accepted(client)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "fine"}\n\n{"prompt_token_ids": [1, 99999]}\n')
    assert cli.main(["submit", "--prompts", str(jobs_file), "--json"]) == 2
    assert capsys.readouterr().err.strip() == (  # the scheduler found it; the file's line 3
        f"pagedserve: error: {jobs_file}:3: prompt_token_ids must be integers in [0, 262); "
        "got [99999]")
    assert cli.main(["submit", "--prompt", "fine", "--prompt", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "pagedserve: error: job 1: prompt is empty (no job of its batch was accepted)")
    assert _accepted(client) == before


@pytest.mark.parametrize("no_wait", [False, True])
def test_a_bad_job_in_a_later_batch_refuses_the_file_before_any_job_runs(
        daemon, tmp_path, capsys, monkeypatch, no_wait):
    """The first batches were accepted and ran (short jobs to the end) before the scheduler
    refused a later one; the jobs were withdrawn only then."""
    _, _, client = daemon
    monkeypatch.setattr("cluster.client.SUBMIT_BATCH", 2)
    before = _accepted(client)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a", "max_tokens": 2}\n{"prompt": "b", "max_tokens": 2}\n'
                         '{"prompt": "c"}\n{"prompt": "' + "x" * 3000 + '"}\n')
    argv = ["submit", "--prompts", str(jobs_file)] + (["--no-wait"] if no_wait else [])
    assert cli.main(argv) == 2
    assert re.fullmatch(rf"pagedserve: error: {re.escape(str(jobs_file))}:4: prompt has 300\d "
                        r"tokens; max_model_len is 2048", capsys.readouterr().err.strip())
    assert _accepted(client) == before


def test_demo_on_a_daemon_already_up_reports_its_own_jobs(daemon, capsys):
    """On a daemon that was up, the table gave the workers' lifetime counters (a second run of
    the same jobs showed another hit rate) and the bar counted every job of the daemon."""
    _, _, client = daemon
    wait_for(lambda: client.status()["jobs_unfinished"] == 0, timeout=60,
             what="earlier tests' jobs done")  # they would count in the workers' growth
    tokenizer = Tokenizer.from_dir(tiny_model_dir())
    jobs = demo.demo_workload(6, seed=0)
    looked_up = []
    for _ in range(2):
        assert cli.main(["demo", "--jobs", "6"]) == 0
        table = capsys.readouterr().out
        assert re.search(rf"jobs +6 on 2 workers\n +output tokens +"
                         rf"{sum(p.max_tokens for _, p in jobs)}\n", table)
        assert re.search(r"preemptions +0\n +failovers +0$", table)
        looked_up.append(int(re.search(r"of (\d+) prompt tokens looked up", table)[1]))
    prompt_tokens = sum(len(tokenizer.encode(prompt)) for prompt, _ in jobs)
    assert looked_up[0] == looked_up[1] and prompt_tokens - 6 <= looked_up[1] <= prompt_tokens


def test_restarted_scheduler_resumes_jobs_from_the_journal(daemon, undisturbed):
    _, _, client = daemon
    selected = [0, 5, 9]
    all_jobs = jobs(max_tokens=40)
    pid = client.status()["scheduler_pid"]
    # one call (one journal fsync) and the kill right after: the jobs' 40 steps cannot be done.
    # SIGKILL, as ray.kill returns before the scheduler is gone. Ray restarts it, and its
    # __init__ replays the journal.
    ids = client.submit_many([all_jobs[i][0] for i in selected], [all_jobs[i][1] for i in selected])
    os.kill(pid, signal.SIGKILL)
    got = [client.result(j, timeout=300).outputs[0].token_ids for j in ids]
    assert got == [undisturbed[i] for i in selected]
    status = client.status()
    assert 1 <= status["jobs_resumed"] <= len(selected)
    assert "from the journal" in daemon_cmds.format_status(status)


TIED_SUBMIT = """
import asyncio, sys, time
from cluster.client import Client
client = Client(address=sys.argv[1])
params = {"max_tokens": 2000, "ignore_eos": True}
tied = asyncio.run(client.asubmit_many(["tied to its client"], params, tied=True))
untied = asyncio.run(client.asubmit_many(["not tied"], params))
print(tied[0], untied[0], flush=True)
time.sleep(600)
"""


def test_the_jobs_tied_to_a_client_process_are_aborted_when_it_is_killed(daemon):
    """An HTTP server's requests are tied to its process: killed (or gone with `ray stop`),
    it can neither read nor abort them, and they ran to their end for nobody."""
    _, _, client = daemon
    aborted_before = client.status()["tied_jobs_aborted"]
    proc = subprocess.Popen([sys.executable, "-c", TIED_SUBMIT,
                             ray.get_runtime_context().gcs_address], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        tied, untied = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
    out = client.result(tied, timeout=60).outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) < 2000
    assert client.status_of(untied)["finish_reasons"] in ([None], ["length"])  # not aborted
    client.abort(untied)
    assert client.status()["tied_jobs_aborted"] == aborted_before + 1


def test_a_tied_job_no_client_claims_after_a_restart_is_aborted(daemon):
    """After a scheduler restart, a tied job runs again only once its client waits on it (as a
    live one does within seconds); one no client claims is taken for a job whose client went
    with the old cluster, and aborted: resumed from the journal, it ran for nobody on the next
    `up`."""
    _, _, client = daemon
    pid = client.status()["scheduler_pid"]
    forsaken, claimed = [asyncio.run(client.asubmit_many(
        [name], SamplingParams(max_tokens=tokens, ignore_eos=True), tied=True))[0]
        for name, tokens in (("forsaken", 2000), ("claimed", 200))]
    wait_for(lambda: client.status_of(forsaken)["num_tokens"][0] > 0, what="the jobs running")
    # SIGKILL, not ray.kill: that returns before the scheduler is gone, and on a loaded host
    # the old one lived long enough to finish the forsaken job's 2000 tokens (~4 s)
    os.kill(pid, signal.SIGKILL)
    streamed = [t for delta in client.stream(claimed) for t in delta.new_token_ids]
    assert len(streamed) == 200  # its client waited on it: claimed, it ran to its end
    # status_of does not claim a job, and result would: wait past tied_job_claim_s for the
    # abort first (on a fast host the claimed job's stream ends well within it)
    wait_for(lambda: client.status_of(forsaken)["finished"], timeout=60,
             what="the unclaimed job aborted")
    out = client.result(forsaken, timeout=60).outputs[0]
    assert out.finish_reason == "abort" and out.token_ids == []  # not run after the restart
    assert client.status()["tied_jobs_aborted"] == 1  # counted since the restart


def test_results_finished_before_a_scheduler_restart_are_still_there_after_it(daemon,
                                                                              undisturbed):
    _, _, client = daemon
    selected = [1, 6]
    all_jobs = jobs(max_tokens=40)
    ids = client.submit_many([all_jobs[i][0] for i in selected], [all_jobs[i][1] for i in selected])
    wait_for(lambda: all(client.status_of(j)["finished"] for j in ids), timeout=120,
             what="both jobs finished")
    ray.kill(bringup.find_scheduler(), no_restart=False)  # before anyone read the results
    got = client.results(ids)
    assert [out.outputs[0].token_ids for out in got] == [undisturbed[i] for i in selected]
    streamed = [t for delta in client.stream(ids[0]) for t in delta.new_token_ids]
    assert streamed == undisturbed[selected[0]]
    status = client.status()
    assert status["results_restored"] >= len(selected)
    assert "the results of" in daemon_cmds.format_status(status)


def test_a_stream_resumed_past_where_the_rerun_was_aborted_still_hears_the_abort(daemon):
    """The restarted scheduler runs the job again from its first token: aborted before it is
    back where the stream was, the resumed stream used to end with no finish reason."""
    _, _, client = daemon
    # tied: after the restart it waits unrouted until a waiting call claims it, so the abort
    # below (no waiting call) finds its rerun at 0 tokens however slow the host (or, past
    # tied_job_claim_s, the scheduler aborts it itself, the same way)
    [job] = asyncio.run(client.asubmit_many(
        ["aborted on its rerun"], SamplingParams(max_tokens=400, ignore_eos=True), tied=True))
    streamed, stream = [], Client().stream(job)
    for delta in stream:
        streamed += delta.new_token_ids
        if len(streamed) >= 20:
            break
    # the stream waits, suspended, while its scheduler goes and the rerun is aborted (once
    # the restart is seen: ray.kill returns before the old scheduler is gone)
    pid = client.status()["scheduler_pid"]
    ray.kill(bringup.find_scheduler(), no_restart=False)
    wait_for(lambda: client.status()["scheduler_pid"] != pid, timeout=60, what="the restart")
    Client().abort(job)
    out = client.result(job, timeout=60).outputs[0]
    assert out.finish_reason == "abort" and out.token_ids == [] and len(streamed) >= 20
    rest = list(stream)  # no token again, and the finish
    assert [(d.new_token_ids, d.finish_reason) for d in rest] == [([], "abort")]


def test_a_call_waiting_longer_than_the_client_timeout_rides_out_a_restart(daemon):
    """The client's timeout_s bounds how long the scheduler may be gone, not the call: a stream
    open for longer than it still survives a restart (it used to fail at once)."""
    _, _, client = daemon
    job = client.submit("a long wait", SamplingParams(max_tokens=2000, ignore_eos=True))
    wait_for(lambda: sum(client.status_of(job)["num_tokens"]) > 0, what="the job running")
    # its workers stopped, so that it cannot finish first (the restart replaces them)
    pids = [w["pid"] for w in client.status()["workers"] if w.get("pid")]
    waiter, outcome = Client(timeout_s=8), {"streamed": []}  # a restart takes ~2-5 s here

    def wait_for_the_result():
        try:
            for delta in waiter.stream(job):
                outcome["streamed"] += delta.new_token_ids
            outcome["out"] = waiter.result(job)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["out"] = exc

    thread = threading.Thread(target=wait_for_the_result)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        thread.start()
        threading.Event().wait(waiter.timeout_s + 1)
        assert not client.status_of(job)["finished"], (pids, client.status()["workers"])
        seen = len(outcome["streamed"])
        ray.kill(bringup.find_scheduler(), no_restart=False)
        # the restarted scheduler runs the job again from its first token, with its seed: once
        # past what the stream had seen, the stream goes on where it was
        wait_for(lambda: client.status_of(job)["num_tokens"][0] > seen + 2, timeout=120,
                 what="the job run again past what was streamed")
        assert client.abort(job)
    finally:
        for pid in pids:
            _continue(pid)
    thread.join(timeout=60)
    assert outcome["out"].outputs[0].finish_reason == "abort", outcome["out"]
    assert outcome["streamed"] == outcome["out"].outputs[0].token_ids
    wait_for(lambda: len(ready_workers(client)) == 2, timeout=120, what="both workers back")


def test_a_stream_rides_out_two_restarts_further_apart_than_the_client_timeout(daemon):
    """A reconnect that found the scheduler not answering yet kept the loss after the stream
    went on, so a second restart timeout_s later failed at once. The first outage here: a
    dead handle (the scheduler gone), then the scheduler found but stopped for 3 s."""
    _, _, client = daemon
    job = client.submit("twice", SamplingParams(max_tokens=2000, ignore_eos=True))
    waiter, outcome = Client(timeout_s=8), {"streamed": []}  # a restart takes ~2-5 s here

    def stream():
        try:
            for delta in waiter.stream(job):
                outcome["streamed"] += delta.new_token_ids
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    status = client.status()
    pid, workers = status["scheduler_pid"], [w["pid"] for w in status["workers"] if w.get("pid")]
    gone = _Gone.remote()
    ray.kill(gone)
    waiter._scheduler = gone
    os.kill(pid, signal.SIGSTOP)
    lost = time.monotonic()
    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(3)
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: len(outcome["streamed"]) > 5 or "error" in outcome, timeout=60,
             what="the stream going on after the first outage")
    try:
        for worker in workers:  # so that the job cannot finish while the test waits
            os.kill(worker, signal.SIGSTOP)
        time.sleep(max(0.0, lost + waiter.timeout_s + 1 - time.monotonic()))
        seen = len(outcome["streamed"])
        ray.kill(bringup.find_scheduler(), no_restart=False)  # an outage of its own
        wait_for(lambda: len(outcome["streamed"]) > seen + 5 or "error" in outcome,
                 timeout=120, what="the stream going on after the restart")
    finally:
        for worker in workers:
            _continue(worker)
    client.abort(job)
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    wait_for(lambda: len(ready_workers(client)) == 2, timeout=120, what="both workers back")


@ray.remote(num_cpus=0)
class _Gone:
    """Killed at once: a handle to a scheduler that went."""

    def abort(self, job_id):
        pass

    def stream(self, job_ids, cursors=None, resumed=False, caller=None):
        yield


def test_an_abort_whose_answer_was_lost_to_a_restart_still_says_it_aborted(daemon):
    """The scheduler may abort the job and go before it answers: the retry finds the job
    finished, yet this abort is what ended it."""
    _, _, client = daemon
    job = client.submit("aborted twice", SamplingParams(max_tokens=400, ignore_eos=True))
    assert ray.get(bringup.find_scheduler().abort.remote(job))  # the try that did the work
    gone = _Gone.remote()
    ray.kill(gone)
    lossy = Client()
    lossy._scheduler = gone  # the scheduler that went before answering
    assert lossy.abort(job)
    assert not client.abort(job)  # an abort of a finished job, with no restart, still says no


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # killed with its scheduler
        pass


def test_an_interrupted_drain_is_given_up_and_up_ends_a_drain_too(daemon, capsys, monkeypatch):
    cfg, _, client = daemon
    monkeypatch.setattr(bringup, "WAIT_REPORT_S", 0.2)
    job = client.submit("hold the drain", SamplingParams(max_tokens=400, ignore_eos=True))

    def interrupt(status):  # Ctrl-C while `down --drain` waits
        assert status["draining"]
        raise KeyboardInterrupt

    monkeypatch.setattr(daemon_cmds, "print_draining", interrupt)
    assert cli.main(["down", "--drain"]) == 130
    assert "the daemon stays up and takes new jobs again" in capsys.readouterr().err
    assert not client.status()["draining"]  # was: refused every job until down and up
    client.abort(client.submit("taken", SamplingParams(max_tokens=2)))
    ray.get(bringup.find_scheduler().set_draining.remote(True))  # a drain whose caller died
    assert cli.main(["up"]) == 0
    assert "it takes new jobs again" in capsys.readouterr().err
    assert not client.status()["draining"]
    client.abort(job)

    def up_elsewhere(status):  # `pagedserve up` in another terminal while this one drains
        assert cli.main(["up"]) == 0
    monkeypatch.setattr(daemon_cmds, "print_draining", up_elsewhere)
    job = client.submit("hold it again", SamplingParams(max_tokens=1500, ignore_eos=True))
    assert cli.main(["down", "--drain"]) == 1  # it used to go on and take the daemon down
    assert "the drain was ended while `down --drain` waited" in capsys.readouterr().err
    assert bringup.find_scheduler() is not None and not client.status()["draining"]
    client.abort(job)


def test_down_drain_refuses_new_jobs_and_goes_down_once_the_others_finish(daemon, capsys,
                                                                          monkeypatch):
    cfg, _, client = daemon
    monkeypatch.setattr(bringup, "WAIT_REPORT_S", 0.2)
    for job_id in client.jobs(finished_limit=0):  # earlier tests' leftovers would hold it up
        client.abort(job_id["job_id"])
    ids = client.submit_many(["drain a", "drain b"], SamplingParams(max_tokens=400,
                                                                   ignore_eos=True))
    down = threading.Thread(target=cli.main, args=(["down", "--drain"],))
    down.start()
    try:
        wait_for(lambda: client.status()["draining"], timeout=30, what="draining")
        assert "new jobs are refused" in daemon_cmds.format_status(client.status())
        with pytest.raises(DrainingError, match="^pagedserve is draining to go down"):
            client.submit_many(["late"], SamplingParams(max_tokens=2), wait_for_room=True)
        assert not client.status_of(ids[0])["finished"]
    finally:
        down.join(timeout=120)
    out, err = capsys.readouterr()
    assert out == "pagedserve is down\n"  # nothing left for the journal: both jobs finished
    assert "pagedserve: draining: 2 jobs unfinished" in err
    assert bringup.find_scheduler() is None
    bringup.up(cfg, min_workers=2)  # for the tests that follow


def test_two_drains_at_once_both_end_with_the_daemon_down(daemon, capsys):
    """`down --drain` in two terminals: both wait for the job, both end saying the daemon is
    down (exit 0), whichever stopped it."""
    cfg, _, client = daemon
    job = client.submit("drain me twice", SamplingParams(max_tokens=300, ignore_eos=True))
    codes = []
    downs = [threading.Thread(target=lambda: codes.append(cli.main(["down", "--drain"])))
             for _ in range(2)]
    for down in downs:
        down.start()
    for down in downs:
        down.join(timeout=120)
    assert codes == [0, 0]
    assert capsys.readouterr().out.splitlines() == ["pagedserve is down"] * 2
    assert bringup.find_scheduler() is None
    bringup.up(cfg, min_workers=2)  # for the tests that follow
    assert Client().result(job).outputs[0].finish_reason == "length"


def test_a_drain_goes_on_through_a_scheduler_restart(daemon, capsys, monkeypatch):
    """The restarted scheduler starts undrained: `down --drain` took that for `up` ending the
    drain, gave up, and left the daemon taking new jobs."""
    cfg, _, client = daemon
    monkeypatch.setattr(bringup, "WAIT_REPORT_S", 0.2)
    job = client.submit("drain through it", SamplingParams(max_tokens=300, ignore_eos=True))
    killed = []

    def restart_once(status):
        if not killed:
            killed.append(status["scheduler_pid"])
            ray.kill(bringup.find_scheduler(), no_restart=False)
    monkeypatch.setattr(daemon_cmds, "print_draining", restart_once)
    assert cli.main(["down", "--drain"]) == 0
    assert capsys.readouterr().out == "pagedserve is down\n" and killed
    assert bringup.find_scheduler() is None
    bringup.up(cfg, min_workers=2)  # for the tests that follow
    assert Client().result(job).outputs[0].finish_reason == "length"  # kept across both


def test_a_submit_the_daemon_goes_down_under_says_its_jobs_stay_for_the_next_up(
        daemon, capsys, monkeypatch):
    """It said only "not up; run `pagedserve up`", which then ran the jobs for nobody."""
    cfg, _, client = daemon
    monkeypatch.setitem(Client.__init__.__kwdefaults__, "timeout_s", 2.0)  # the CLI's client
    codes = []
    submit = threading.Thread(target=lambda: codes.append(cli.main(
        ["submit", "--prompt", "left behind", "--max-tokens", "1500", "--ignore-eos"])))
    submit.start()
    wait_for(lambda: [j for j in client.jobs(0) if j["num_tokens"][0] > 0], timeout=60,
             what="the submitted job generating")
    assert bringup.down() == 1
    submit.join(timeout=60)
    assert codes == [2]
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pagedserve: error: pagedserve is not up on this cluster")
    assert "the next `up` runs them (`pagedserve jobs` lists them" in error
    bringup.up(cfg, min_workers=2)
    left = [j["job_id"] for j in client.jobs(0) if not j["finished"]]
    assert len(left) == 1 and client.abort(left[0])  # resumed from the journal: stop it


def test_down_leaves_nothing_running_and_up_resumes_what_was_unfinished(daemon, capsys):
    cfg, _, client = daemon
    names = [worker_actor_name(w["worker_id"]) for w in client.status()["workers"]]
    long_jobs = [client.submit(f"unfinished {i}", SamplingParams(max_tokens=600,
                                                                 ignore_eos=True, seed=i))
                 for i in range(2)]
    wait_for(lambda: all(client.status_of(j)["num_tokens"][0] > 0 for j in long_jobs),
             timeout=60, what="both long jobs generating")
    # too short for them: exit 1, so that a script's `down --drain && ...` does not go on
    assert cli.main(["down", "--drain", "--timeout", "1"]) == 1
    assert capsys.readouterr().out == ("pagedserve is down; the drain timed out after 1 s; the "
                                       "journal keeps 2 unfinished jobs, which the next "
                                       "`pagedserve up` resumes\n")
    assert bringup.find_scheduler() is None
    for name in names:
        wait_for(lambda: not _actor_exists(name), timeout=60, what=f"{name} gone")
    wait_for(lambda: ray.available_resources().get("NPU") == 2, timeout=60,
             what="every NPU free again")
    assert bringup.down() is None  # nothing left to stop
    _up_that_fails_leaves_nothing_up(cfg)
    with Journal(cfg.scheduler.journal_path) as journal:  # a job this version no longer takes
        journal.record_accepted("stale", [65, 66], {"n": 100_000})
    with open(cfg.scheduler.journal_path, "ab") as f:  # and a torn last write
        f.write(b"\x07torn")
    status = bringup.up(cfg, min_workers=2)  # also leaves it up for the fixture's teardown
    assert status["jobs_resumed"] == 2 and status["jobs_not_resumed"] == 1
    assert "dropped the last 5 bytes" in status["journal_damage"]
    assert "journal damaged at start: " in daemon_cmds.format_status(status)
    workers = [Client().status_of(j)["workers"][0] for j in long_jobs]
    assert None not in workers and len(set(workers)) == 2  # not both to the first one ready
    assert "not resumed: 1 journal job no longer valid" in daemon_cmds.format_status(status)
    for job_id in long_jobs:
        assert len(Client().result(job_id, timeout=300).outputs[0].token_ids) == 600


def _up_that_fails_leaves_nothing_up(cfg):
    """A model that cannot load, workers that cannot, or workers no node can hold fail `up`
    with the cause on one line and leave no scheduler behind to be reused by the corrected
    `up` that follows."""
    data = config_to_dict(cfg)
    bad_model = config_from_dict({**data, "engine": {**data["engine"], "model": "/no/such"}}, "t")
    with pytest.raises(bringup.DaemonStartError,
                       match=r"^the scheduler could not start: model directory /no/such "):
        bringup.up(bad_model)
    assert bringup.find_scheduler() is None
    no_room = config_from_dict({**data, "engine": {**data["engine"], "kv_cache_gib": 1e-5}}, "t")
    with pytest.raises(bringup.DaemonStartError,
                       match=r"^workers fail to start: .*KV cache budget.*; the daemon was taken down$"):
        bringup.up(no_room)
    assert bringup.find_scheduler() is None
    too_big = config_from_dict({**data, "cluster": {**data["cluster"], "worker_num_cpus": 8}}, "t")
    with pytest.raises(bringup.DaemonStartError, match=r"^only 0 of 2 workers can be placed: "
                       r"each needs 1 NPU and 8 CPUs \(cluster.worker_num_cpus\)"):
        bringup.up(too_big)  # at once, not after up's timeout: no node has 8 CPUs
    assert bringup.find_scheduler() is None


def _actor_exists(name):
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False

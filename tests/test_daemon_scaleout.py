"""A node that joins the cluster later gets a worker for its NPU without a restart; one that
crashes leaves no worker waiting for its NPU; one whose workers cannot start stops the starts on
it alone; one stopped under an idle client process does not take that process with it. A
Client outliving its Ray connection says so."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from daemon_helpers import daemon_config, process_gone, ready_workers, wait_for

from cluster import bringup
from cluster.client import Client, ClientDisconnectedError
from scheduler.sampling_params import SamplingParams
from scheduler.service import NAMESPACE

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"NPU": 1},
                                                      "include_dashboard": False})
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield c
    finally:
        bringup.down()
        ray.shutdown()
        c.shutdown()


def test_added_node_gets_a_worker_and_serves_jobs(cluster, tmp_path):
    bringup.up(daemon_config(tmp_path), min_workers=1)
    client = Client()
    head_node = ready_workers(client)[0]["node_id"]
    new_node = cluster.add_node(num_cpus=2, resources={"NPU": 1})
    workers = wait_for(lambda: len(ready_workers(client)) == 2 and ready_workers(client),
                       timeout=180, what="a worker on the new node")
    assert {w["node_id"] for w in workers} == {head_node, new_node.node_id}
    ids = [client.submit(f"job {i} " * (i + 1), SamplingParams(max_tokens=8, temperature=0))
           for i in range(8)]
    assert all(len(client.result(j, timeout=120).outputs[0].token_ids) == 8 for j in ids)
    assert {client.status_of(j)["workers"][0] for j in ids} == {w["worker_id"] for w in workers}


def test_a_crashed_node_leaves_no_worker_waiting_for_its_npu(cluster, tmp_path):
    """A node that dies without a clean shutdown: its jobs finish elsewhere with the tokens of
    an undisturbed run, and a worker the scheduler started for its NPU before Ray counted the
    node dead (it could never be placed) is withdrawn: status lists no worker "starting"
    forever, and `up` answers at once instead of waiting for it."""
    client = Client()
    node = next(w["node_id"] for w in ready_workers(client)
                if w["node_id"] != ray.get_runtime_context().get_node_id())
    doomed = next(n for n in cluster.worker_nodes if n.node_id == node)
    # prompts whose greedy outputs have no near-tie (top two logprobs within 1e-3) in their
    # 200 tokens: the engine is not batch-invariant, and "crash 2 crash 2 crash 2 " met one at
    # token 53 (4e-6 apart), where a failover recomputing the sample could take the other
    prompts = [f"lost node {i} " * (i + 1) for i in range(8)]
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    ids = client.submit_many(prompts, params)
    wait_for(lambda: all(client.status_of(j)["num_tokens"][0] > 0 for j in ids), timeout=120,
             what="every job generating")
    cluster.remove_node(doomed, allow_graceful=False)
    crashed = [client.result(j, timeout=300).outputs[0].token_ids for j in ids]
    again = [client.result(j, timeout=300).outputs[0].token_ids
             for j in client.submit_many(prompts, params)]
    assert crashed == again and client.status()["failovers"] > 0
    wait_for(lambda: ray.cluster_resources().get("NPU") == 1, timeout=120,
             what="Ray counting the node dead")
    wait_for(lambda: len(client.status()["workers"]) == 1, timeout=60,
             what="no worker but the head node's")
    started = time.monotonic()
    bringup.up(daemon_config(tmp_path), min_workers=1)
    assert time.monotonic() - started < 10
    cluster.add_node(num_cpus=2, resources={"NPU": 1})
    wait_for(lambda: len(ready_workers(client)) == 2, timeout=180, what="a worker on a new node")


def test_a_node_whose_workers_fail_to_start_does_not_stop_respawns_elsewhere(cluster):
    """Workers that fail to start on one node (its model cache unusable) must not keep the
    other nodes' NPUs from getting a new worker when theirs dies: the jobs waited forever."""
    client = Client()
    cluster.add_node(num_cpus=2, resources={"NPU": 1},
                     env_vars={"PAGEDSERVE_CACHE": "/dev/null/x"})
    wait_for(lambda: "Not a directory" in (client.status()["last_spawn_error"] or ""),
             timeout=120, what="a worker failing to start on the bad node")
    _until_no_worker_starts(client)  # its further tries failed too, and it gets no more
    victim = ready_workers(client)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    job = client.submit("after the bad node", SamplingParams(max_tokens=8, temperature=0))
    assert len(client.result(job, timeout=120).outputs[0].token_ids) == 8
    wait_for(lambda: victim["node_id"] in {w["node_id"] for w in ready_workers(client)
                                           if w["worker_id"] != victim["worker_id"]},
             timeout=120, what="a new worker on the victim's node")


IDLE_DRIVER = """
import sys, time
import ray
from cluster.client import Client
ray.init(address=sys.argv[1], _temp_dir=sys.argv[2], namespace="pagedserve", log_to_driver=False)
client = Client()
client.result(client.submit("idle after this", {"max_tokens": 2}))
print(ray.get_runtime_context().get_node_id(), flush=True)
time.sleep(600)
"""


def test_a_client_process_done_with_its_calls_outlives_its_node_stopping(cluster, tmp_path):
    """Ray ends a driver at once (status 1, not a word) when the node it is attached to stops
    while it owns an object in that node's object store: `pagedserve serve`, idle after its
    requests, died so at `ray stop` before it could say that the cluster went away. A Client
    owns its caller token only while calls that need it run."""
    bringup.up(daemon_config(tmp_path), min_workers=1)
    node_dir = tempfile.mkdtemp(prefix="ps-node-")  # short: Ray's socket paths live under it
    try:
        node = cluster.add_node(num_cpus=0, temp_dir=node_dir)  # which the driver picks by it
        proc = subprocess.Popen([sys.executable, "-c", IDLE_DRIVER, cluster.address, node_dir],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == node.node_id
            cluster.remove_node(node, allow_graceful=True)
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(node_dir, ignore_errors=True)


def test_a_client_made_before_ray_shutdown_says_to_make_a_new_one(cluster, tmp_path):
    """Its calls raised Ray's bare "Can't find actor ... It might be dead or it's from a
    different cluster", having first connected Ray again where the caller had not."""
    bringup.up(daemon_config(tmp_path), min_workers=1)
    client = Client()
    ray.shutdown()
    try:
        with pytest.raises(ClientDisconnectedError, match=r"shut down \(ray.shutdown\(\)\); "
                                                          "create a new Client$"):
            client.status()
        assert not ray.is_initialized()
    finally:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    with pytest.raises(ClientDisconnectedError):
        next(client.stream("any"))
    with pytest.raises(ClientDisconnectedError):
        asyncio.run(client.aresult("any"))
    assert Client().status()["workers"]


def test_a_call_waiting_for_up_ends_when_ray_is_shut_down_under_it(cluster, tmp_path):
    """It went on looking the scheduler up, and the first lookup after the shutdown started
    a new local Ray cluster, with no NPUs, that the process then stayed connected to."""
    bringup.up(daemon_config(tmp_path), min_workers=1)
    client = Client()
    pid = client.status()["scheduler_pid"]
    bringup.down()  # which returns before the scheduler is gone: it would answer the call
    wait_for(lambda: process_gone(pid), timeout=30, what="the scheduler gone")
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(_raised_by(client.status)))
    waiting.start()
    time.sleep(2)  # the call now waits for an `up` (down_wait_s: 60 s)
    ray.shutdown()
    try:
        waiting.join(timeout=10)
        assert not waiting.is_alive()
        assert isinstance(outcome[0], ClientDisconnectedError), outcome
        assert not ray.is_initialized()
    finally:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)


def test_an_up_waiting_for_workers_says_that_a_down_took_the_daemon_away(cluster, tmp_path):
    """`up` waiting for workers while `pagedserve down` ran elsewhere failed with "the
    scheduler could not start: The actor is dead because it was killed by `ray.kill`.", as if
    its config or model were wrong."""
    bringup.up(daemon_config(tmp_path), min_workers=1)
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(_raised_by(
        lambda: bringup.up(daemon_config(tmp_path), min_workers=50, timeout=60))))
    waiting.start()
    time.sleep(1)  # its wait_ready call is in
    bringup.down()
    waiting.join(timeout=30)
    assert isinstance(outcome[0], bringup.DaemonStartError), outcome
    assert str(outcome[0]).startswith("the daemon was taken down while `up` waited for its "
                                      "workers (by `pagedserve down`")


def _raised_by(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return exc
    return None


def _until_no_worker_starts(client, quiet_s=4.0):
    """Until no worker has been starting for ``quiet_s`` (longer than a resource poll)."""
    quiet_since = time.monotonic()
    deadline = quiet_since + 180
    while time.monotonic() - quiet_since < quiet_s:
        assert time.monotonic() < deadline, "workers still starting after 180 s"
        if len(ready_workers(client)) < len(client.status()["workers"]):
            quiet_since = time.monotonic()
        time.sleep(0.2)

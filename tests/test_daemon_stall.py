"""A hung worker, its process stopped with SIGSTOP (Ray still counts it alive, as it would a
worker stuck on its device), is found by the scheduler's stall watch and killed; its jobs
finish elsewhere with the tokens an undisturbed run gives."""
import os
import signal

import ray

from daemon_helpers import daemon_config, ready_workers, wait_for

from cluster import bringup, daemon_cmds
from cluster.client import Client
from scheduler.sampling_params import SamplingParams
from scheduler.service import NAMESPACE

STALL_TIMEOUT_S = 3.0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except FileNotFoundError:
        return True


def test_a_hung_worker_is_killed_and_its_jobs_finish_elsewhere(tmp_path):
    cfg = daemon_config(tmp_path, worker_stall_timeout_s=STALL_TIMEOUT_S)
    ray.init(address="local", num_cpus=3, resources={"NPU": 2}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    stopped = None
    try:
        bringup.up(cfg, min_workers=2)
        client = Client()
        prompts = [f"job {i}: the cluster" for i in range(4)]
        params = [SamplingParams(max_tokens=300, temperature=0.8, seed=i, ignore_eos=True)
                  for i in range(4)]
        undisturbed = [client.result(j, timeout=300).outputs[0].token_ids
                       for j in client.submit_many(prompts, params)]

        ids = client.submit_many(prompts, params)
        started = wait_for(lambda: next((s for s in map(client.status_of, ids)
                                         if 0 < s["num_tokens"][0] < 200), None),
                           interval=0.01, what="a job halfway through")
        victim = next(w for w in ready_workers(client) if w["worker_id"] == started["workers"][0])
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped = victim["pid"]

        assert [client.result(j, timeout=300).outputs[0].token_ids for j in ids] == undisturbed
        status = client.status()
        assert status["stalled_workers_killed"] == 1 and status["failovers"] >= 1
        assert "hung workers killed: 1 " in daemon_cmds.format_status(status)
        wait_for(lambda: _gone(stopped), timeout=60, what="the hung process killed")
        wait_for(lambda: len(ready_workers(client)) == 2, what="a new worker on the freed NPU")
    finally:
        if stopped is not None and not _gone(stopped):
            os.kill(stopped, signal.SIGKILL)
        bringup.down()
        ray.shutdown()

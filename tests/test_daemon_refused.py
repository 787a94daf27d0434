"""Refusals on a one-NPU cluster: a job the scheduler took while no worker was ready, then
refused by its worker, leaves no sample behind on that worker (the stall watch would probe it,
idle, forever); a worker whose engine refuses its config is not started again."""
import time

import pytest
import ray

from daemon_helpers import daemon_config, wait_for

from cluster import bringup
from cluster.client import Client, JobFailedError
from cluster.config import config_from_dict, config_to_dict
from scheduler.sampling_params import SamplingParams
from scheduler.service import NAMESPACE

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py


@pytest.fixture(scope="module")
def small_cache_config(tmp_path_factory):
    data = config_to_dict(daemon_config(tmp_path_factory.mktemp("refused"),
                                        worker_stall_timeout_s=2))
    data["engine"]["kv_cache_gib"] = 0.004  # 65 blocks: ~1,000 tokens, under max_model_len
    return config_from_dict(data, "test")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, resources={"NPU": 1}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        bringup.down()
        ray.shutdown()


def _samples_held(scheduler) -> dict[str, int]:
    return ray.get(scheduler.__ray_call__.remote(
        lambda actor: {w: len(s.samples) for w, s in actor.service.workers.items()}))


def test_a_job_refused_by_its_worker_is_not_held_there(cluster, small_cache_config):
    scheduler, _ = bringup._create_scheduler(small_cache_config)
    client = Client()
    assert not any(w["ready"] for w in client.status()["workers"])  # no KV size to check yet
    job = client.submit("x " * 10, SamplingParams(max_tokens=1900, temperature=0))
    with pytest.raises(JobFailedError, match="KV blocks"):
        client.result(job, timeout=120)
    wait_for(lambda: any(w["ready"] for w in client.status()["workers"]), what="a worker")
    assert set(_samples_held(scheduler).values()) == {0}
    ok = client.submit("y " * 10, SamplingParams(max_tokens=4, temperature=0))
    assert len(client.result(ok, timeout=120).outputs[0].token_ids) == 4
    time.sleep(0.5)  # its last report
    assert set(_samples_held(scheduler).values()) == {0}


def test_a_worker_whose_engine_refuses_its_config_is_not_started_again(cluster,
                                                                       small_cache_config):
    bringup.down()
    data = config_to_dict(small_cache_config)
    data["engine"]["kv_cache_gib"] = 1e-5  # under one block: every start fails alike
    scheduler, created = bringup._create_scheduler(config_from_dict(data, "test"))
    assert created
    with pytest.raises(ray.exceptions.RayTaskError,
                       match="workers fail to start: a KV cache budget of 10737 bytes "):
        ray.get(scheduler.wait_ready.remote(1, 60))
    status = ray.get(scheduler.status.remote())
    assert status["worker_start_failures"] == 1 and status["workers"] == []
    wait_for(lambda: ray.available_resources().get("NPU") == 1, what="its NPU free again")
    bringup.down()

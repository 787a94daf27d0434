"""A node that joins the cluster later gets a worker for its NPU without a restart."""
import pytest
import ray
from ray.cluster_utils import Cluster

from daemon_helpers import daemon_config, ready_workers, wait_for

from cluster import bringup
from cluster.client import Client
from scheduler.sampling_params import SamplingParams
from scheduler.service import NAMESPACE


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

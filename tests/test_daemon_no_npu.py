"""`up` on a Ray cluster that has no NPU resources at all fails at once, saying so; then
the job verbs say at once that the daemon is not up. So does the embedded cluster of a config
that leaves the NPUs to Ray's detection (simulated_npus 0) on a host where Ray finds none."""
import time

import pytest
import ray

from daemon_helpers import daemon_config

from cluster import bringup, cli
from cluster.config import with_overrides
from cluster.embedded import EmbeddedDaemon
from scheduler.service import NAMESPACE

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py


def test_up_on_a_cluster_without_npus_fails_at_once(tmp_path, capsys):
    ray.init(address="local", num_cpus=1, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    try:
        started = time.monotonic()
        with pytest.raises(bringup.DaemonStartError,
                           match=r"^the Ray cluster has no NPU resources: start its nodes with "
                                 r"`ray start --resources=.*; the daemon was taken down$"):
            bringup.up(daemon_config(tmp_path), min_workers=1, timeout=120)
        assert time.monotonic() - started < 60  # not the whole timeout
        assert bringup.find_scheduler() is None
        started = time.monotonic()
        assert cli.main(["jobs"]) == 2  # the job verbs say so at once, too
        assert capsys.readouterr().err == (
            "pagedserve: error: pagedserve is not up on this cluster; run `pagedserve up`\n")
        assert time.monotonic() - started < 30  # not the minute a Client rides out restarts
        started = time.monotonic()
        assert cli.main(["logs"]) == 2  # it took its 30-s call timeout to say so
        assert capsys.readouterr().err == (
            "pagedserve: error: pagedserve is not up on this cluster; run `pagedserve up`\n")
        assert time.monotonic() - started < 15
    finally:
        bringup.down()
        ray.shutdown()


def test_an_embedded_cluster_with_no_npu_detected_fails_at_once(tmp_path):
    """It came up with no worker, and its requests waited forever (`pagedserve serve`)."""
    cfg = with_overrides(daemon_config(tmp_path), cluster={"simulated_npus": 0})
    started = time.monotonic()
    with pytest.raises(bringup.DaemonStartError, match="^the Ray cluster has no NPU resources"):
        EmbeddedDaemon(cfg)
    assert time.monotonic() - started < 60
    assert not ray.is_initialized()

"""Test-wide settings: tests/ on sys.path for shared helpers, and one torch thread.

One intra-op thread keeps the small shapes of the tests fast and their float reductions
identical across processes (Ray workers use one thread too). pytest runs in two processes
(pytest-xdist, `-n 2` in pyproject.toml): the modules that start a Ray cluster are marked
`xdist_group("ray")` and run one after another in one of them, as two local clusters at once
would fight over the cores and over `ray stop`; the Ray tests mostly wait (on process starts,
restarts, timeouts), so the CPU-only tests run in the other meanwhile. `-n 0` runs serially.

Ray's implicit `ray.init()` (any ray.get/put/kill/get_actor with no connection) is off: it
started a cluster with no NPUs that the next module's LLM(workers=N) then joined. A call that
would have made one fails where it is made instead.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # read when a test module first imports ray

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _leaves_no_ray_connection():
    """A module that leaves this process connected to Ray errs in its own teardown, rather
    than the next module's LLM(workers=N) or EmbeddedDaemon joining its cluster."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this module left the process connected to Ray")

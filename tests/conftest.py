"""Test-wide settings: tests/ on sys.path for shared helpers, and one torch thread.

One intra-op thread keeps the small shapes of the tests fast and their float reductions
identical across processes (Ray workers use one thread too). pytest runs in two processes
(pytest-xdist, `-n 2` in pyproject.toml): the modules that start a Ray cluster are marked
`xdist_group("ray")` and run one after another in one of them, as two local clusters at once
would fight over the cores and over `ray stop`; the Ray tests mostly wait (on process starts,
restarts, timeouts), so the CPU-only tests run in the other meanwhile. `-n 0` runs serially.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

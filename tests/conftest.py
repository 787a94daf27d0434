"""Test-wide settings: tests/ on sys.path for shared helpers, and one torch thread.

One intra-op thread keeps the small shapes of the tests fast and their float reductions
identical across processes (Ray workers use one thread too); pytest runs tests one at a time.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

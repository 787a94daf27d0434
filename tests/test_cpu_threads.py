"""numba's OpenMP pool beside torch's: its idle threads sleep, unless the user says otherwise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Prints what the OpenMP runtime numba's pool loaded reads from the environment, as libgomp
# itself reports it (omp_display_env), and whether the process's environment was left as it was.
SHOW_NUMBA_POOL_SETTINGS = """
import ctypes, os
import torch
import worker.backends.cpu_simd
import numba
torch_copy = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
loaded = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
others = sorted(os.path.realpath(p) for p in loaded if os.path.realpath(p) != torch_copy)
if numba.threading_layer() != "omp" or not others:
    print("SKIP numba's pool does not run a second libgomp here", flush=True)
else:
    print("ENV", os.environ.get("GOMP_SPINCOUNT"), flush=True)
    ctypes.CDLL(others[0]).omp_display_env(1)
"""


def _numba_pool_settings(**environ: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", SHOW_NUMBA_POOL_SETTINGS], env={**env, **environ},
                          capture_output=True, text=True, timeout=120, check=True)
    said = done.stdout + done.stderr
    if said.startswith("SKIP"):
        pytest.skip(said.strip())
    return said


def test_numba_pools_idle_threads_do_not_spin_on_the_cores_torch_needs():
    """By default its threads spun ~4 ms of CPU after each parallel kernel (the decode
    attention of every layer), beside the matmuls torch runs next."""
    said = _numba_pool_settings()
    assert "GOMP_SPINCOUNT = '0'" in said, said
    assert "ENV None" in said, "the setting must not stay in the environment (torch's children)"


def test_a_users_own_openmp_wait_setting_is_kept():
    said = _numba_pool_settings(GOMP_SPINCOUNT="5000")
    assert "GOMP_SPINCOUNT = '5000'" in said, said

"""A CPU engine tunes glibc to keep freed activation memory (the speed effect is measured by
``benchmarks/throughput.py``, which reports page faults per run)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from worker import host_memory

REPO_ROOT = Path(__file__).resolve().parents[1]

# A fresh process, so nothing has applied the tuning before the engine is built.
ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from worker import host_memory
    from worker.engine import Engine, EngineConfig
    def applied():  # what retain_freed_memory() cached; None before its first call
        tuning = host_memory.retain_freed_memory
        return tuning() if tuning.cache_info().currsize else None
    before = applied()
    Engine(EngineConfig(model="tiny", device=sys.argv[1], kv_cache_gib=0.01))
    print(json.dumps({"before": before, "after": applied()}))
""")


def test_cpu_engine_applies_the_tuning():
    result = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, "cpu"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"before": None, "after": True}


def test_glibc_accepts_the_thresholds_once():
    assert host_memory.retain_freed_memory() is True
    assert host_memory.retain_freed_memory() is True

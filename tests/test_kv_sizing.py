"""Engines starting together on one host check its memory for their KV caches one at a time."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from daemon_helpers import wait_for
from worker.engine import Engine, EngineConfig
from worker import kv_sizing
from worker.kv_sizing import host_kv_claim

REPO_ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys\nfrom worker import kv_sizing\nkv_sizing.HOST_KV_LOCK = sys.argv[1]\n"
          "with kv_sizing.host_kv_claim('cpu'):\n"
          "    print('held', flush=True)\n    sys.stdin.readline()\n")


def _inside_the_claim(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code is host_kv_claim.__wrapped__.__code__:
            return True
        frame = frame.f_back
    return False


def test_an_engine_waits_for_another_process_checking_and_allocating_its_cache(tmp_path,
                                                                              monkeypatch):
    """Each checked the host's memory before any allocated, so N workers of one host could
    together take more than it has; now the second waits, then sees what the first took.
    (A lock file of the test's own, so that no other engine on the host waits on it.)"""
    lock = tmp_path / "kv.lock"
    monkeypatch.setattr(kv_sizing, "HOST_KV_LOCK", str(lock))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=REPO_ROOT,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        built = []
        thread = threading.Thread(target=lambda: built.append(
            Engine(EngineConfig(model="tiny", kv_cache_gib=0.01))))
        thread.start()
        wait_for(lambda: _inside_the_claim(thread) or not thread.is_alive(), timeout=120,
                 what="the engine at the lock")
        assert not built  # it did not allocate while the other process held the lock
        holder.stdin.write("\n")
        holder.stdin.flush()
        thread.join(timeout=120)
        assert built and built[0].kv.num_free_blocks > 0
    finally:
        holder.kill()
        holder.wait()

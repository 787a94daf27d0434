"""Shared set-up for the daemon's integration tests: a pinned-auth local Ray and a test config."""
import os
import time

from cluster.config import config_from_dict, config_to_dict, load_config

os.environ["RAY_AUTH_MODE"] = "disabled"  # a stray token file must not break a run


def daemon_config(tmp_path, **scheduler):
    data = config_to_dict(load_config("cpu-sim"))
    data["engine"]["kv_cache_gib"] = 0.05
    data["cluster"]["resource_poll_interval_s"] = 0.5
    data["scheduler"]["journal_path"] = str(tmp_path / "journal.msgpack")
    data["scheduler"]["journal_fsync_interval_s"] = 0.01
    data["scheduler"].update(scheduler)
    return config_from_dict(data, "test")


def wait_for(predicate, timeout=120.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except FileNotFoundError:
        return True


def ready_workers(client):
    return [w for w in client.status()["workers"] if w.get("ready")]

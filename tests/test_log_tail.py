"""Reading the tail of an actor's log file, and how `pagedserve logs` shows the tails."""
from cluster.logs_cmd import format_tails
from worker.log_tail import tail_lines


def test_the_last_lines_come_whole_across_read_chunks_without_rays_marks(tmp_path):
    log = tmp_path / "worker.err"
    lines = [f"line {i} " + "x" * (i % 300) for i in range(5000)]  # ~800 KiB: many chunks
    log.write_bytes(("\n".join([":job_id:01000000", ":actor_name:WorkerActor"] + lines)
                     + "\n").encode())
    assert tail_lines(str(log), 3) == lines[-3:]
    assert tail_lines(str(log), 1200) == lines[-1200:]
    assert tail_lines(str(log), 10_000) == lines  # the whole file, less Ray's marks
    assert tail_lines(str(log), 0) == []
    log.write_bytes(b"ok\nbad \xff byte\nlast")  # no final newline, a stray byte
    assert tail_lines(str(log), 2) == ["bad \ufffd byte", "last"]


def test_each_tail_is_headed_by_whose_it_is_and_says_why_it_has_no_lines():
    tails = [
        {"source": "scheduler", "node_id": "abcdef0123", "pid": 7, "file": "/logs/s.err",
         "lines": ["INFO:pagedserve.scheduler:worker w1 ready on cpu:0"]},
        {"source": "w1", "node_id": "abcdef0123", "pid": 8, "file": "/logs/w1.err",
         "lines": []},
        {"source": "w2", "node_id": "fedcba9876", "error": "did not answer within 10 s",
         "lines": []},
        {"source": "w3", "node_id": "fedcba9876", "pid": 9, "file": None, "lines": []},
        {"source": "w4", "node_id": "abcdef0123", "pid": 10, "file": "/logs/w4.err",
         "gone": "died: it was killed by `ray.kill`.", "gone_for_s": 150.0,
         "lines": ["INFO:pagedserve.engine:KV cache: 90 blocks"]},
        {"source": "w5", "node_id": "fedcba9876", "pid": 11, "file": "/logs/w5.err",
         "gone": "killed: hung", "gone_for_s": 7200.0, "error": "its node has left the cluster",
         "lines": []},
    ]
    assert format_tails(tails).splitlines() == [
        "== scheduler (pid 7 on node abcdef01): /logs/s.err",
        "INFO:pagedserve.scheduler:worker w1 ready on cpu:0",
        "== worker w1 (pid 8 on node abcdef01): /logs/w1.err",
        "   (empty)",
        "== worker w2 (node fedcba98)",
        "   (did not answer within 10 s)",
        "== worker w3 (pid 9 on node fedcba98)",
        "   (its stderr is not a file here: no log to show)",
        "== worker w4 (pid 10 on node abcdef01; gone 2 min ago): /logs/w4.err",
        "   (died: it was killed by `ray.kill`.)",
        "INFO:pagedserve.engine:KV cache: 90 blocks",
        "== worker w5 (pid 11 on node fedcba98; gone 2 h ago): /logs/w5.err",
        "   (killed: hung)",
        "   (its node has left the cluster)",
    ]


def test_a_worker_still_loading_its_model_is_named_so_not_as_silent():
    """A loading actor answers no call until its model is in: on a device that takes minutes,
    "did not answer within 10 s" read like a hung worker."""
    import asyncio
    import concurrent.futures
    from types import SimpleNamespace

    from scheduler.logs import _worker_tail

    never = SimpleNamespace(future=concurrent.futures.Future)
    actor = SimpleNamespace(log_tail=SimpleNamespace(remote=lambda count: never))
    loading = SimpleNamespace(worker_id="w1", node_id="n1", actor=actor, info=None)
    ready = SimpleNamespace(**{**vars(loading), "info": {"max_tokens_fit": 1}})
    assert asyncio.run(_worker_tail(loading, 5, 0.1))["error"] == (
        "still loading its model: it answers once it is ready (`pagedserve status`)")
    assert asyncio.run(_worker_tail(ready, 5, 0.1))["error"] == "did not answer within 0.1 s"


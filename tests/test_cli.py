"""The pagedserve CLI: generate's JSON output, and one-line errors (exit 2) for bad input."""
import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys

import pytest

from cluster import daemon_cmds
from cluster.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_is_in_input_order(capsys, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"prompt": "Hello there", "max_tokens": 5, "temperature": 0}),
        json.dumps({"prompt_token_ids": [72, 105], "max_tokens": 3, "temperature": 0,
                    "logprobs": 2}),
        "",
        json.dumps({"prompt": "Third", "max_tokens": 4, "temperature": 0}),
    ]))
    code, out, _ = run(capsys, "generate", "--prompts", str(jobs), "--json", "--ignore-eos")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [len(r["token_ids"]) for r in records] == [5, 3, 4]
    assert records[1]["num_prompt_tokens"] == 2
    assert len(records[1]["logprobs"]) == 3 and "logprobs" not in records[0]
    assert all(r["finish_reason"] == "length" and isinstance(r["text"], str) for r in records)


def test_prompts_dash_reads_the_jobs_from_stdin(capsys, monkeypatch, tmp_path):
    lines = ('{"prompt": "Hello", "max_tokens": 4, "temperature": 0}\n\n'
             '{"prompt_token_ids": [72, 105], "max_tokens": 3, "temperature": 0}\n')
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(lines)
    code, from_file, _ = run(capsys, "generate", "--prompts", str(jobs), "--json")
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, from_stdin, _ = run(capsys, "generate", "--prompts", "-", "--json")
    assert code == 0 and from_stdin == from_file and len(from_stdin.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines + '{"prompt": ""}\n'))
    code, out, err = run(capsys, "generate", "--prompts", "-")
    assert code == 2 and out == "" and err == "pagedserve: error: stdin:4: prompt is empty\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = run(capsys, "generate", "--prompts", "-")
    assert code == 2 and err == "pagedserve: error: stdin holds no jobs\n"


def test_generate_streams_text_to_the_terminal(capsys):
    code, out, _ = run(capsys, "generate", "--prompt", "a", "--prompt", "b", "--max-tokens", "4",
                       "--temperature", "0")
    assert code == 0
    assert out.startswith("--- [0] ") and "--- [1] " in out
    code, out, _ = run(capsys, "generate", "--prompt", "a", "--n", "2", "--max-tokens", "3",
                       "--seed", "1", "--json")
    samples = [s["text"] for s in json.loads(out)["samples"]]
    code, out, _ = run(capsys, "generate", "--prompt", "a", "--n", "2", "--max-tokens", "3",
                       "--seed", "1")
    assert code == 0 and out == f"--- [0.0] {samples[0]}\n--- [0.1] {samples[1]}\n"


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "prompt is empty"),
    # before the model loads: a checkpoint that takes minutes to load is not loaded for it
    (["--prompt", "", "--model", "/no/such/model"], "prompt is empty"),
    (["--prompt", "x" * 3000], "max_model_len"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["--prompt", "hi", "--model", __file__], "is not a directory"),
    (["--prompt", "hi", "--max-model-len", "0"], "max_model_len=0: must be an integer >= 1"),
    (["--prompt", "hi", "--max-model-len", "100000"], "exceeds this model's limit of 2048"),
    (["--prompt", "hi", "--kv-cache-gib", "0"], "kv_cache_gib=0.0: must be a finite number > 0"),
    (["--prompt", "hi", "--kv-cache-gib", "inf"], "kv_cache_gib=inf: must be a finite number > 0"),
    (["--prompt", "hi", "--kv-cache-gib", "1e9"], "GiB of memory this host has available"),
    (["--prompt", "hi", "--block-size", "0"], "block_size=0: must be an integer >= 1"),
    (["--prompt", "hi", "--memory-utilization", "1.5"],
     "memory_utilization=1.5: must be a number in (0, 1]"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, "generate", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pagedserve: error:") and message in err


@pytest.mark.parametrize("value", ["-1", "x"])
def test_jobs_refuses_a_count_below_zero_before_it_connects(capsys, value):
    with pytest.raises(SystemExit) as exited:  # -1 listed "no jobs" though 1,000 had finished
        main(["jobs", "--finished", value])
    assert exited.value.code == 2
    assert f"--finished: must be an integer >= 0, got '{value}'" in capsys.readouterr().err


def test_generate_takes_the_device_memory_share_npu_and_cuda_size_their_kv_cache_from():
    """The README sizes an npu/cuda KV cache by memory_utilization, which generate had no flag
    for: only --kv-cache-gib, which applies to cpu alone."""
    from cluster.cli import build_parser
    from cluster.engine_args import engine_options

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--memory-utilization", "0.5"])
    assert engine_options(args)["memory_utilization"] == 0.5


def _help_of(capsys, verb: str) -> str:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_seed_help_says_how_each_verb_draws_an_unseeded_jobs_tokens(capsys):
    """submit's --seed help said an unseeded job drew from the engine's shared generator, as
    generate's does; the daemon gives each such job a random seed when it accepts it."""
    submit, generate = _help_of(capsys, "submit"), _help_of(capsys, "generate")
    assert "shared generator" not in submit
    assert "the daemon gives each job a random seed when it accepts it" in submit
    assert "draws from the engine's shared generator" in generate


@pytest.mark.parametrize("argv", [["up", "--timeout", "-1"], ["down", "--drain", "--timeout", "0"],
                                  ["up", "--timeout", "nan"]])
def test_daemon_timeouts_must_be_positive_before_anything_connects(capsys, argv):
    """`down --drain --timeout -5` went down at once without a drain; `up --timeout -1` started
    the daemon and then failed."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "--timeout: must be a number of seconds > 0" in capsys.readouterr().err


def test_a_line_that_is_not_json_names_the_file_and_line(capsys, tmp_path):
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and f"{jobs}:2: not valid JSON" in err and err.count("\n") == 1
    jobs.write_text('{"prompt": "ok", "stop": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))  # was a RecursionError
    assert code == 2 and err == f"pagedserve: error: {jobs}:1: JSON nested too deeply\n"


def test_a_jobs_priority_needs_the_priority_policy(capsys, tmp_path):
    """A line's "priority" was accepted and ignored: generate had no way to pick the policy."""
    jobs = tmp_path / "ranked.jsonl"
    jobs.write_text('{"prompt": "a", "max_tokens": 2}\n{"prompt": "b", "max_tokens": 2, '
                    '"priority": -1}\n')
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and f"{jobs}:2: invalid priority=-1: the scheduling policy is fcfs" in err
    code, out, _ = run(capsys, "generate", "--prompts", str(jobs), "--policy", "priority",
                       "--json")
    assert code == 0 and [json.loads(line)["index"] for line in out.splitlines()] == [0, 1]


def test_generate_json_carries_prompt_logprobs_when_a_line_asks(capsys, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 2, "prompt_logprobs": 2}\n'
                    '{"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 2}\n')
    code, out, _ = run(capsys, "generate", "--prompts", str(jobs), "--json")
    scored, plain = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "prompt_logprobs" not in plain
    assert [lp["token_id"] for lp in scored["prompt_logprobs"]] == [6, 7, 8]
    assert all(len(lp["top"]) == 2 and lp["logprob"] <= 0 for lp in scored["prompt_logprobs"])
    code, out, _ = run(capsys, "generate", "--prompt", "abc", "--prompt-logprobs", "0",
                       "--max-tokens", "1", "--json")
    flag = json.loads(out)  # "abc" is BOS + 3 bytes: 3 tokens scored, no alternatives
    assert code == 0 and [len(lp["top"]) for lp in flag["prompt_logprobs"]] == [0, 0, 0]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "temprature": 0.5}',
     'unknown field(s) temprature; a line holds "prompt" or "prompt_token_ids", optionally '
     '"priority", and sampling fields: frequency_penalty, '),
    ('{"prompt": "a", "priority": true}', '"priority" must be an integer in [-2**63, 2**63)'),
])
def test_a_line_with_a_bad_field_names_it(capsys, tmp_path, line, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(line + "\n")
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and err.startswith(f"pagedserve: error: {jobs}:1: {message}")


def test_a_job_the_engine_refuses_names_its_file_line(capsys, tmp_path):
    """Token ids are checked against the model's vocabulary only once it is loaded; the error
    still names the line (blank lines counted), and no job runs."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "ok"}\n\n{"prompt_token_ids": [1, 99999]}\n')
    code, out, err = run(capsys, "generate", "--prompts", str(jobs), "--json")
    assert code == 2 and out == ""
    assert err == (f"pagedserve: error: {jobs}:3: prompt_token_ids must be integers in "
                   "[0, 262); got [99999]\n")
    jobs.write_text('{"prompt_token_ids": [1, 999]}\n')  # the file's only job
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and err.startswith(f"pagedserve: error: {jobs}:1: prompt_token_ids must")
    code, _, err = run(capsys, "generate", "--prompt", "ok", "--prompt", "")
    assert code == 2 and err == ("pagedserve: error: job 1: prompt is empty (no job of the "
                                 "batch was queued)\n")


def test_a_job_too_large_for_the_kv_cache_names_its_file_line(capsys, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "max_tokens": 2}\n{"prompt": "b", "max_tokens": 1000}\n')
    code, out, err = run(capsys, "generate", "--prompts", str(jobs), "--kv-cache-gib", "0.001")
    assert code == 2 and out == ""
    assert err.startswith(f"pagedserve: error: {jobs}:2: request of 1002 tokens needs 63 KV "
                          "blocks") and err.count("\n") == 1


def test_a_line_that_is_not_utf8_is_named_and_a_json_string_may_hold_u2028(capsys, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and err == (f"pagedserve: error: {jobs}:2: not UTF-8 text (byte 0xff at "
                                 "column 13)\n")
    # a raw line separator inside a string is JSON, not a line break; a BOM is no field
    jobs.write_text('\ufeff{"prompt": "a\u2028b", "max_tokens": 1}\n', encoding="utf-8")
    code, out, _ = run(capsys, "generate", "--prompts", str(jobs), "--json")
    assert code == 0 and json.loads(out)["num_prompt_tokens"] == 6  # BOS + a + 3 bytes + b


def test_job_ids_on_stdin_may_start_with_a_bom_and_a_bad_byte_is_named(monkeypatch):
    from cluster.job_cmds import given_ids

    stdin = io.TextIOWrapper(io.BytesIO(b'\xef\xbb\xbf{"job_id": "abc"}\ndef\n'))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert given_ids(["-", "ghi"]) == ["abc", "def", "ghi"]  # the BOM made line 1 an id
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\n\xffdef\n")))
    with pytest.raises(ValueError, match="stdin:2: not UTF-8 text"):
        given_ids(["-"])


def test_unknown_sampling_field_in_a_line_is_named(capsys, tmp_path):
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text('{"prompt": "ok", "temprature": 0}\n')
    code, _, err = run(capsys, "generate", "--prompts", str(jobs))
    assert code == 2 and "temprature" in err


def test_installed_entry_point_reports_errors_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompt", "hi",
                           "--max-tokens", "-3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "pagedserve: error: invalid max_tokens=-3: must be an integer >= 1"
    help_proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_proc.returncode == 0 and "generate" in help_proc.stdout
    version_proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--version"],
                                  capture_output=True, text=True, timeout=60)
    assert (version_proc.returncode, version_proc.stdout) == (
        0, f"pagedserve {importlib.metadata.version('pagedserve')}\n")


def test_a_reader_that_leaves_early_is_not_an_error():
    """`pagedserve jobs --json | head`: the closed pipe printed "error: [Errno 32] Broken
    pipe" with exit 2."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompt", "hi",
                               "--max-tokens", "2", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


@pytest.mark.parametrize("command", ["status", "serve"])
def test_an_address_where_nothing_listens_fails_at_once(command):
    # ray.init alone would retry such an address for minutes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", command, "--address",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pagedserve: error: no Ray cluster at '127.0.0.1:{port}'")
    assert f":{port}: Connection refused" in error
    assert ("leave --address out" in error) == (command == "serve")


def test_an_interrupt_a_library_turned_into_another_error_still_ends_as_an_interrupt(
        monkeypatch, capsys):
    """Ctrl-C in numba's first compile (a lazy import) left numpy half-imported: the run
    ended in an 85-line RecursionError traceback, exit 1, in 5 of 30 tries."""
    import signal

    def interrupted_inside_a_library(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise RecursionError("maximum recursion depth exceeded") from None
        return 0

    monkeypatch.setattr("cluster.generate_cmd.run", interrupted_inside_a_library)
    assert main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "pagedserve: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_closed_standard_streams_read_nothing_and_write_nowhere(tmp_path):
    """`<&-` and `>&-` made sys.stdin / sys.stdout None: an AttributeError traceback."""
    no_stdin = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompts", "-"],
                              preexec_fn=lambda: os.close(0), capture_output=True, text=True)
    assert (no_stdin.returncode, no_stdin.stderr) == (2, "pagedserve: error: stdin holds no jobs\n")
    no_stdout = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--prompt", "a",
                                "--max-tokens", "2"],
                               preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True)
    assert (no_stdout.returncode, no_stdout.stderr) == (0, "")


def test_an_interrupt_mid_line_ends_the_streamed_line_first(monkeypatch, capsys):
    """'pagedserve: interrupted' came on the line of the text streamed so far."""
    from cluster.llm import LLM
    from worker.output import RequestOutput

    def interrupted_mid_line(self, prompts, params, *, priorities, on_output):
        on_output(0, RequestOutput("r", 0, [104, 105], "hi", 3))
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "generate", interrupted_mid_line)
    assert main(["generate", "--prompt", "x"]) == 130
    out, err = capsys.readouterr()
    assert (out, err) == ("hi\n", "pagedserve: interrupted\n")


def test_serve_stops_once_the_ray_cluster_is_gone(monkeypatch):
    """After `ray stop`, requests hung until Ray's driver gave up on the GCS a minute later
    and killed the server with no answer to anyone."""
    import types

    from cluster import serve_cmd

    monkeypatch.setattr(serve_cmd, "CLUSTER_PROBE_S", 0.05)
    monkeypatch.setattr(serve_cmd, "CLUSTER_GONE_S", 0.2)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % probe.getsockname()[1]
    marked = []
    server = types.SimpleNamespace(should_exit=False)
    client = types.SimpleNamespace(mark_cluster_gone=marked.append)
    watch = serve_cmd.ClusterWatch(address, server, client)
    watch.start()
    watch.join(timeout=10)
    assert server.should_exit and watch.gone.startswith("nothing answers at ")
    assert marked == [watch.gone]


def test_the_status_total_counts_samples_the_scheduler_holds_for_a_worker_as_waiting():
    """They were left out of the table's total (Prometheus's requests_waiting had them)."""
    worker = {"worker_id": "w1", "ready": True, "node_id": "n" * 16, "device": "cpu:0",
              "npu_ids": ["0"], "pid": 7, "kv_used": 3, "kv_total": 10, "running": 2,
              "waiting": 4, "tokens_per_s": 1.0}
    status = {"workers": [worker], "jobs_unfinished": 9, "failovers": 0, "pending_samples": 3}
    assert "2 running, 7 waiting (3 for a worker)\n" in daemon_cmds.format_status(status)
    assert "2 running, 4 waiting\n" in daemon_cmds.format_status({**status, "pending_samples": 0})


def test_the_status_table_shows_each_workers_prefix_cache_hit_rate_in_80_columns():
    """Only `status --json` and /metrics had it: the table gave no sign whether routing by
    prefix kept the caches warm."""
    worker = {"worker_id": "w1234abcd", "ready": True, "node_id": "n" * 16, "device": "cpu:0",
              "npu_ids": ["0"], "pid": 1234567, "kv_used": 65536, "kv_total": 131072,
              "running": 256, "waiting": 1024, "tokens_per_s": 12345.6,
              "prefix_hit_tokens": 850, "prefix_query_tokens": 1000}
    cold = {**worker, "worker_id": "w2", "prefix_hit_tokens": 0, "prefix_query_tokens": 0}
    status = {"workers": [worker, cold], "jobs_unfinished": 9, "failovers": 0}
    header, first, second, *totals = daemon_cmds.format_status(status).splitlines()
    assert header.split()[-1] == "prefix" and len(header) <= 80
    assert first.endswith(" 85%") and len(first) <= 80 and second.endswith(" -")
    assert "prefix cache: 85% of 1000 prompt tokens looked up were cached" in totals
    no_lookups = daemon_cmds.format_status({**status, "workers": [cold]})
    assert "prefix cache:" not in no_lookups


def test_the_status_totals_keep_to_80_columns_too():
    """The rows did, but the total line ran to 106 columns on a fresh two-worker daemon."""
    worker = {"worker_id": "w1234abcd", "ready": True, "node_id": "n" * 16, "device": "cpu:0",
              "npu_ids": ["0"], "pid": 1234567, "kv_used": 65536, "kv_total": 131072,
              "running": 256, "waiting": 1024, "tokens_per_s": 12345.6,
              "prefix_hit_tokens": 850, "prefix_query_tokens": 1000}
    status = {"workers": [worker, {**worker, "worker_id": "w2"}], "jobs_unfinished": 12345,
              "failovers": 678, "pending_samples": 300}
    table = daemon_cmds.format_status(status)
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "512 running, 2348 waiting (300 for a worker)" in table
    assert "24691.2 tok/s, KV 131072/262144 blocks; jobs unfinished 12345, failovers 678" in table


def test_the_status_table_names_the_last_gone_worker_and_where_its_log_is():
    """A failover showed only as a count: which worker went, when and why was nowhere."""
    gone = [{"worker_id": "w1", "node_id": "n1", "pid": 7, "why": "died: earlier",
             "gone_for_s": 4000.0},
            {"worker_id": "w2", "node_id": "n1", "pid": 8,
             "why": "died: it was killed by `ray.kill`.", "gone_for_s": 95.0}]
    status = {"workers": [], "jobs_unfinished": 0, "failovers": 3, "workers_gone": 11}
    assert daemon_cmds.format_status({**status, "gone_workers": gone}).splitlines()[-1] == (
        "gone: 11 workers since the scheduler started, the last w2 2 min ago (died: it was "
        "killed by `ray.kill`.); `pagedserve logs` shows the end of the last 2's logs")
    one = daemon_cmds.format_status({**status, "gone_workers": gone[1:], "workers_gone": 1})
    assert one.splitlines()[-1].endswith("`pagedserve logs` shows the end of its log")
    assert "gone:" not in daemon_cmds.format_status({**status, "gone_workers": []})


def test_up_waiting_for_more_workers_than_the_cluster_has_npus_for_says_so(capsys):
    """`up --min-workers 3` on a cluster with 2 NPUs said "2 ready, 0 loading the model" every
    10 s until its timeout, with no word that it waited for nodes to join."""
    worker = {"worker_id": "w1", "ready": True}
    status = {"workers": [worker, {**worker, "worker_id": "w2"}], "uptime_s": 12.0,
              "placeable_workers": 2}
    daemon_cmds.print_loading(status, min_workers=3)
    daemon_cmds.print_loading(status, min_workers=2)
    assert capsys.readouterr().err.splitlines() == [
        "pagedserve: waiting for workers: 2 ready, 0 loading the model (up 12 s); the cluster "
        "has NPUs for 2 workers, fewer than --min-workers 3: waiting for nodes to join",
        "pagedserve: waiting for workers: 2 ready, 0 loading the model (up 12 s)"]


def test_the_status_table_says_one_of_a_thing_in_the_singular(capsys):
    """It said "1 workers ready" and "resumed at start: 1 unfinished jobs"."""
    worker = {"worker_id": "w1", "ready": True, "node_id": "n" * 16, "device": "cpu:0",
              "npu_ids": ["0"], "pid": 7, "kv_used": 3, "kv_total": 10, "running": 2,
              "waiting": 4, "tokens_per_s": 1.0}
    notes = ("jobs_resumed", "results_restored", "jobs_not_resumed", "tied_jobs_aborted",
             "engine_failures", "quarantined_samples")
    one = {"workers": [worker], "jobs_unfinished": 1, "failovers": 0, **dict.fromkeys(notes, 1)}
    two = {**one, "workers": [worker, {**worker, "worker_id": "w2"}], **dict.fromkeys(notes, 2)}
    phrases = ("total: {} ready,", "resumed at start: {} from", "the results of {} from",
               "not resumed: {} no longer", "aborted for nobody: {} of", "(workers replaced; {} "
               "waiting")
    nouns = ("worker", "unfinished job", "finished job", "journal job", "job", "sample")
    for status, plural in ((one, ""), (two, "s")):
        table = daemon_cmds.format_status(status)
        for phrase, noun in zip(phrases, nouns):
            assert phrase.format(f"{len(status['workers'])} {noun}{plural}") in table
    daemon_cmds.print_draining({"jobs_unfinished": 1})
    assert capsys.readouterr().err == "pagedserve: draining: 1 job unfinished\n"


def test_serve_on_a_daemon_already_up_with_another_config_says_what_did_not_take(capsys):
    """`serve --config` on a running daemon kept its config without a word (`up` said it)."""
    daemon_cmds.warn_config_not_applied({"config_not_applied": []}, again="serve")
    assert capsys.readouterr().err == ""  # serve runs on the daemon up: nothing to say
    daemon_cmds.warn_config_not_applied(
        {"config_not_applied": ["engine.max_num_seqs: running 256, asked 64"]}, again="serve")
    err = capsys.readouterr().err
    assert "then `serve`" in err
    assert err.strip().endswith("engine.max_num_seqs: running 256, asked 64")

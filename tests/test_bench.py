"""pagedserve bench: arrival statistics, length sampling, SSE accounting, percentiles and goodput
(pure, fast); the load loop against a small local SSE server; one run against the real server."""
import argparse
import asyncio
import contextlib
import io
import json
import math
import re
import socket
import statistics
import sys
import threading
import time

import numpy as np
import pytest

from serving import serving

from cluster import bench
from cluster.bench import (DONE, BenchRequest, LoadSpec, RequestResult, RunOutcome, Target,
                           arrival_gaps, parse_sse_line, percentile, summarize)
from cluster.cli import main
from cluster.progress import LineProgress, progress

pytestmark = pytest.mark.xdist_group("ray")  # see conftest.py


def run_cli(capsys, *argv):
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- arrivals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_gaps_have_mean_one_over_rate_and_unit_cv(rate):
    gaps = arrival_gaps(20000, rate, "poisson", seed=1)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.05)  # exponential
    assert min(gaps) >= 0


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_keep_the_mean_and_scale_variance_by_burstiness(burstiness):
    rate = 8.0
    gaps = arrival_gaps(40000, rate, "gamma", burstiness, seed=2)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Gamma(shape k, scale 1/(rate k)) has variance 1/(rate^2 k).
    assert statistics.pvariance(gaps) == pytest.approx(1 / (rate**2 * burstiness), rel=0.08)


def test_arrivals_repeat_with_a_seed_and_differ_without():
    assert arrival_gaps(50, 3.0, seed=7) == arrival_gaps(50, 3.0, seed=7)
    assert arrival_gaps(50, 3.0, seed=7) != arrival_gaps(50, 3.0, seed=8)
    assert arrival_gaps(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("text", ["0", "-2", "nan", "fast"])
def test_bad_rates_are_rejected(text):
    with pytest.raises(ValueError, match="rate"):
        bench.parse_rate(text)


def test_rates_parse_numbers_and_inf():
    assert bench.parse_rate("2.5") == 2.5 and math.isinf(bench.parse_rate("inf"))


# -- workloads --------------------------------------------------------------------------------

@pytest.mark.parametrize("mean_len, ratio", [(128, 0.5), (64, 0.0), (3, 1.0), (10, 0.25)])
def test_lengths_stay_in_the_asked_range_and_cover_it(mean_len, ratio):
    lengths = bench.sample_lengths(np.random.default_rng(0), 5000, mean_len, ratio)
    low, high = max(1, mean_len * (1 - ratio)), mean_len * (1 + ratio)
    assert all(low <= n <= high for n in lengths)
    assert min(lengths) == math.ceil(low) and max(lengths) == math.floor(high)


def test_random_workload_token_ids_and_text():
    ids = bench.random_workload(30, 40, 9, 0.5, seed=3, kind="ids", vocab_size=100)
    assert all(len(r.prompt) == r.prompt_tokens and 20 <= r.prompt_tokens <= 60 for r in ids)
    assert all(0 <= t < 100 for r in ids for t in r.prompt)
    assert all(5 <= r.max_tokens <= 13 for r in ids)
    again = bench.random_workload(30, 40, 9, 0.5, seed=3, kind="ids", vocab_size=100)
    assert [r.prompt for r in again] == [r.prompt for r in ids]
    text = bench.random_workload(10, 50, 9, 0.0, seed=3, kind="text")
    assert all(isinstance(r.prompt, str) and len(r.prompt) == 50 for r in text)
    assert all(r.prompt_tokens is None for r in text)


def test_dataset_reads_prompts_and_cycles(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "max_tokens": 3, "id": "x"}) + "\n\n"
                    + json.dumps({"prompt": [1, 2, 3]}) + "\n")
    requests = bench.load_dataset(path, 5, default_max_tokens=7)
    assert [r.prompt for r in requests] == ["hello", [1, 2, 3]] * 2 + ["hello"]
    assert [r.max_tokens for r in requests[:2]] == [3, 7]
    assert [r.prompt_tokens for r in requests[:2]] == [None, 3]


@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    ('{"text": "x"}', '"prompt"'),
    ('{"prompt": ""}', '"prompt"'),
    ('{"prompt": [1, "a"]}', '"prompt"'),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
])
def test_bad_dataset_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        bench.load_dataset(path, 2, 8)
    assert f"{path}:2:" in str(info.value)


# -- SSE accounting ---------------------------------------------------------------------------

def chunk(text):
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text}]})


def feed(result, timed_lines):
    for line, now in timed_lines:
        event = parse_sse_line(line)
        if event is not None:
            result.on_event(event, now)


def test_sse_lines_parse_to_payloads_done_or_nothing():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data:[DONE]") is DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None
    for bad in ("data: {not json", "data: [1, 2]"):
        with pytest.raises(ValueError, match="bad SSE"):
            parse_sse_line(bad)


def test_stream_timings_and_usage_token_count():
    arrivals = [1.25, 1.5, 1.75, 2.25]
    usage = 'data: {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 6}}'
    result = RequestResult(asked_tokens=6, prompt_tokens=None, start=1.0)
    feed(result, [(chunk(c), t) for c, t in zip("abcd", arrivals)]
         + [("", 2.3), (usage, 2.4), ("data: [DONE]", 3.0)])
    assert result.ok and result.done
    assert result.ttft == pytest.approx(arrivals[0] - 1.0)
    assert result.itls == pytest.approx(list(np.diff(arrivals)))
    assert result.e2el == pytest.approx(2.0)
    assert (result.output_tokens, result.prompt_tokens, result.chunks) == (6, 11, 4)
    assert result.tpot == pytest.approx((result.e2el - result.ttft) / (6 - 1))


def test_without_usage_tokens_are_counted_from_chunks():
    result = RequestResult(asked_tokens=8, prompt_tokens=5, start=0.0)  # 3 came, not the 8 asked
    feed(result, [(chunk("x"), 0.1), (chunk("y"), 0.2), (chunk(""), 0.3), ("data: [DONE]", 0.3)])
    assert result.output_tokens == 3 and result.prompt_tokens == 5 and result.ok


def test_an_error_event_or_a_missing_done_fails_the_request():
    failed = RequestResult(asked_tokens=3, prompt_tokens=5)
    feed(failed, [(chunk("x"), 0.1), ('data: {"error": {"message": "worker died"}}', 0.2)])
    assert not failed.ok and failed.error == "worker died"
    unfinished = RequestResult(asked_tokens=3, prompt_tokens=5)
    feed(unfinished, [(chunk("x"), 0.1)])
    assert not unfinished.ok and unfinished.tpot is None



def test_a_text_holding_unicode_line_breaks_stays_one_event():
    """vLLM's events hold U+2028, U+2029 and U+0085 raw (JSON leaves them so); the bench read
    lines with httpx's aiter_lines, which ends one at each, and failed such a request as "bad
    SSE data line". The format ends lines at CR, LF and CRLF alone."""
    import httpx

    texts = ["a\u2028b", "\u2029\u0085"]
    events = [f"data: {json.dumps({'choices': [{'text': t}]}, ensure_ascii=False)}"
              for t in texts] + ["data: [DONE]"]
    body = "\r\n\r\n".join(events).encode() + b"\r\n\r\n"

    async def pieces():  # 7 bytes at a time: CRLFs and characters cut in two
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    async def send():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=pieces()))
        result = RequestResult(2, 4)
        async with httpx.AsyncClient(transport=transport) as client:
            await bench.send_request(client, Target("http://stub"), ids_requests(1, 2)[0],
                                     result, 0.0)
        return result

    result = asyncio.run(send())
    assert result.ok, result.error
    assert result.chunks == 2

# -- metrics ----------------------------------------------------------------------------------

def test_percentile_matches_numpy():
    rng = np.random.default_rng(5)
    for size in (1, 2, 7, 100, 1001):
        values = list(rng.exponential(3.0, size))
        for q in (0, 10, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def finished(ttft, e2el, tokens, start=0.0):
    result = RequestResult(asked_tokens=tokens, prompt_tokens=10, start=start)
    result.on_event({"choices": [{"text": "a"}]}, start + ttft)
    result.on_event({"choices": [], "usage": {"completion_tokens": tokens}}, start + e2el)
    result.on_event(DONE, start + e2el)
    return result


def test_summary_figures_and_goodput_follow_the_definitions():
    rng = np.random.default_rng(9)
    results = [finished(float(t), float(t + e), int(n)) for t, e, n in
               zip(rng.uniform(0.05, 0.6, 40), rng.uniform(0.5, 3.0, 40), rng.integers(1, 60, 40))]
    broken = RequestResult(asked_tokens=5, prompt_tokens=10)
    broken.error = "HTTP 503: overloaded"
    duration = 12.5
    slos = {"ttft": 400.0, "tpot": 40.0}
    summary = summarize(RunOutcome(LoadSpec(2.0), results + [broken], duration), slos)

    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    good = [r for r in results if r.ttft <= 0.4
            and (r.output_tokens == 1 or (r.e2el - r.ttft) / (r.output_tokens - 1) <= 0.04)]
    assert (summary["completed"], summary["failed"]) == (40, 1)
    assert summary["first_error"] == "HTTP 503: overloaded"
    assert summary["good_requests"] == len(good) and 0 < len(good) < 40
    assert summary["goodput"] == pytest.approx(len(good) / duration)
    assert summary["request_throughput"] == pytest.approx(40 / duration)
    out_tokens = sum(r.output_tokens for r in results)
    assert summary["output_throughput"] == pytest.approx(out_tokens / duration)
    assert summary["total_token_throughput"] == pytest.approx((out_tokens + 400) / duration)
    assert summary["tpot_ms"]["p90"] == pytest.approx(np.percentile(tpots, 90) * 1e3)
    assert summary["ttft_ms"]["mean"] == pytest.approx(np.mean([r.ttft for r in results]) * 1e3)
    assert summary["e2el_ms"]["p99"] == pytest.approx(
        np.percentile([r.e2el for r in results], 99) * 1e3)
    assert bench.format_summary(summary).count("\n") > 10


@pytest.mark.parametrize("items, message", [
    (["ttft"], "NAME:MS"), (["latency:5"], "NAME:MS"), (["tpot:abc"], "not a number"),
    (["e2el:0"], "> 0"),
])
def test_bad_goodput_slos(items, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_slos(items)


# -- the load loop against a small local SSE server -------------------------------------------

class StubServer:
    """A minimal OpenAI-style streaming endpoint: one chunk per token every ``gap`` seconds.
    Prompt "slow" never finishes; prompt "reject", or more than ``max_tokens_limit`` tokens
    asked (as a context overflow), gets HTTP 400. Tracks peak concurrency."""

    def __init__(self, gap=0.01, api_key=None, max_tokens_limit=None):
        self.gap, self.api_key, self.max_tokens_limit = gap, api_key, max_tokens_limit
        self.active = self.peak = self.served = 0
        self.prompts = []  # as received, in order
        self.lock = threading.Lock()

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def completions(request):
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
            body = await request.json()
            self.prompts.append(body["prompt"])
            if body["prompt"] == "reject" or body["max_tokens"] > (self.max_tokens_limit or 1e9):
                return JSONResponse({"error": {"message": "prompt rejected"}}, status_code=400)
            return StreamingResponse(self.stream(body), media_type="text/event-stream")

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "stub-model"}]})

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/models", models)])

    async def stream(self, body):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            steps = 10**6 if body["prompt"] == "slow" else body["max_tokens"]
            for _ in range(steps):
                await asyncio.sleep(self.gap)
                yield chunk("t") + "\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": steps}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
            self.served += 1
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture()
def stub():
    state = StubServer()
    with serving(state.app()) as state.url:
        yield state


def ids_requests(count, max_tokens):
    return [BenchRequest([1, 2, 3, 4], max_tokens, 4) for _ in range(count)]


def test_load_respects_max_concurrency_and_counts_tokens(stub):
    outcome = asyncio.run(bench.run_load(Target(stub.url), ids_requests(12, 5),
                                         LoadSpec(math.inf, max_concurrency=3)))
    assert all(r.ok for r in outcome.results) and stub.peak == 3
    assert all(r.output_tokens == 5 and len(r.itls) == 4 for r in outcome.results)
    assert all(r.ttft >= stub.gap * 0.9 and r.e2el >= 5 * stub.gap * 0.9 for r in outcome.results)
    # three at a time, each taking >= 5 gaps: four waves at least
    assert outcome.duration_s >= 4 * 5 * stub.gap * 0.9


def test_arrivals_spread_the_requests_over_time(stub):
    rate, count = 20.0, 10
    outcome = asyncio.run(bench.run_load(Target(stub.url), ids_requests(count, 1),
                                         LoadSpec(rate, seed=4)))
    starts = [r.start for r in outcome.results]
    planned = np.cumsum(arrival_gaps(count, rate, seed=4))
    assert all(s >= p - 0.005 for s, p in zip(starts, planned))
    assert starts[-1] < planned[-1] + 0.5


def test_timeouts_and_http_errors_are_failed_requests_not_crashes(stub):
    requests = [BenchRequest("slow", 4, None), BenchRequest("reject", 4, None),
                *ids_requests(2, 3)]
    outcome = asyncio.run(bench.run_load(Target(stub.url, timeout_s=0.5), requests,
                                         LoadSpec(math.inf)))
    slow, rejected, *good = outcome.results
    assert "--timeout" in slow.error and not slow.ok
    assert rejected.error == "HTTP 400: prompt rejected"
    assert all(r.ok for r in good) and outcome.duration_s < 5
    cut = asyncio.run(bench.run_load(Target(stub.url), requests[:1] + ids_requests(1, 2),
                                     LoadSpec(math.inf, max_duration_s=0.4)))
    assert "cut off" in cut.results[0].error and cut.results[1].ok


def test_cli_sweep_writes_json_document(stub, capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "--base-url", stub.url, "--num-prompts", "6",
                             "--sweep-rates", "50,inf", "--random-input-len", "8",
                             "--random-output-len", "4", "--goodput", "ttft:5000", "--json",
                             "--output", str(out_file), "--per-request")
    assert code == 0, err
    document = json.loads(out)
    assert document == json.loads(out_file.read_text())
    assert document["model"] == "stub-model"
    assert [run["request_rate"] for run in document["runs"]] == [50.0, "inf"]
    for run in document["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0 and run["good_requests"] == 6
        assert run["outputs_of_asked_length"] == 6 and run["input_tokens_known"]
        assert [r["output_tokens"] for r in run["requests"]] == \
               [r["asked_tokens"] for r in run["requests"]]
    assert "TTFT" in err and "rate" in err


def test_a_server_that_goes_away_ends_the_run_and_the_sweep(capsys):
    """The run went on sending each remaining request at its arrival time into a closed port
    (at a low rate, one refused request a second for the rest of the run), and then started
    the sweep's later rates against the same closed port."""
    stub, servers = StubServer(), contextlib.ExitStack()
    url = servers.enter_context(serving(stub.app()))
    threading.Timer(1.0, servers.close).start()
    began = time.monotonic()
    code, out, err = run_cli(capsys, "--base-url", url, "--num-prompts", "200",
                             "--sweep-rates", "20,inf", "--random-output-len", "2", "--json")
    assert time.monotonic() - began < 5  # the 200 arrivals at 20/s alone span 10 s
    run, = json.loads(out)["runs"]  # the "inf" run never started
    assert re.match(r"\d+ requests in a row refused over 1\.\d s: ", run["server_gone"])
    assert 0 < run["completed"] < 40 and run["completed"] + run["failed"] == 200
    # the unsent ones are told apart from those sent and failed (they were one "failed" count)
    assert 100 < run["not_sent"] <= run["failed"] - bench.SERVER_GONE_AFTER
    failed_row, = [line.split() for line in err.splitlines() if "failed requests" in line]
    assert failed_row[2:] == [str(run["failed"]), f"({run['not_sent']}", "not", "sent)"]
    assert f"{run['failed']} of 200 requests failed ({run['not_sent']} not sent)" in err
    assert code == 1 and "stopped accepting connections during the run at rate 20.0" in err
    assert err.rstrip().endswith("1 later run not started") and "stopped sending" in err


def test_progress_off_a_terminal_goes_on_while_no_request_finishes(capsys, monkeypatch):
    """Lines came only when a request finished: a run of long generations said nothing in a
    log for as long as they took."""
    from cluster import bench_cmd, progress as progress_module

    monkeypatch.setattr(progress_module, "LINE_INTERVAL_S", 0.2)
    monkeypatch.setattr(bench_cmd, "PROGRESS_TICK_S", 0.05)
    with serving(StubServer(gap=0.05).app()) as url:  # 20 tokens: ~1 s per request
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "2",
                               "--random-output-len", "20", "--random-range-ratio", "0")
    assert code == 0, err
    assert err.count("rate inf: 0/2 req (0%) after ") >= 3


def test_refusals_end_a_run_only_when_nothing_answers_in_between_for_a_second():
    """Three refusals in a row ended a run however close together: at a high rate, a blip of
    the server's listener was enough."""
    watch = bench.ServerWatch()
    refused = RequestResult(1, 1, error="ConnectError: refused", refused=True)
    answered = RequestResult(1, 1, error="HTTP 503: daemon down")
    broken = RequestResult(1, 1, error="ReadError: connection lost")
    for t, result in enumerate((refused, refused, answered, refused, broken, refused)):
        watch.saw(result, now=float(t))
    assert watch.gone is None and not watch.event.is_set()
    watch.saw(refused, now=6.0)  # the third in a row since the answer, refused since 3.0
    assert watch.gone == "3 requests in a row refused over 3.0 s: ConnectError: refused"
    assert watch.event.is_set()
    blip = bench.ServerWatch()
    for i in range(10):  # ten refusals within half a second
        blip.saw(refused, now=i * 0.05)
    assert blip.gone is None
    blip.saw(refused, now=1.0)
    assert blip.gone.startswith("11 requests in a row refused over 1.0 s")


def test_progress_off_a_terminal_is_plain_timed_lines():
    """Off a terminal the bars were disabled: a bench or submit run in a log showed nothing
    until its end."""
    stream = io.StringIO()
    with LineProgress(4, "rate 2", "req", stream, interval_s=0.0) as bar:
        bar.update()
        bar.update(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("rate 2: 1/4 req (25%) after ")
    assert lines[1].startswith("rate 2: 4/4 req (100%) after ") and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    with LineProgress(4, "jobs", "job", quiet, interval_s=60.0) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""  # short work: no line at all
    assert isinstance(progress(3, "jobs", "job", io.StringIO()), LineProgress)


def test_each_run_of_a_sweep_sends_fresh_random_prompts(stub, capsys):
    """A later rate must not find the earlier runs' prompts in the server's prefix cache: on
    cpu-sim a repeated all-at-once run of 1024-token prompts had TTFT p50 112 ms, the first 592."""
    code, out, err = run_cli(capsys, "--base-url", stub.url, "--num-prompts", "5",
                             "--sweep-rates", "inf,inf,inf", "--random-input-len", "16",
                             "--random-output-len", "2", "--json")
    assert code == 0, err
    runs = [stub.prompts[1 + 5 * i:1 + 5 * (i + 1)] for i in range(3)]  # after the probe
    assert all(len(run) == 5 for run in runs)
    distinct = [{tuple(p) for p in run} for run in runs]
    assert not distinct[0] & distinct[1] and not distinct[1] & distinct[2] \
        and not distinct[0] & distinct[2]
    assert [run["seed"] for run in json.loads(out)["runs"]] == [0, 1, 2]


def test_ctrl_c_in_a_sweep_still_writes_the_runs_that_finished(stub, capsys, tmp_path,
                                                               monkeypatch):
    """They were lost with the interrupt, though their tables were printed."""
    from cluster import bench_cmd

    real_run = bench_cmd._run_with_progress
    runs = []

    async def interrupted_second_run(*args):
        runs.append(args)
        if len(runs) == 2:  # Ctrl-C while the second rate runs
            raise KeyboardInterrupt
        return await real_run(*args)

    monkeypatch.setattr(bench_cmd, "_run_with_progress", interrupted_second_run)
    out_file = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "--base-url", stub.url, "--num-prompts", "3",
                             "--sweep-rates", "inf,inf,inf", "--random-input-len", "8",
                             "--random-output-len", "2", "--json", "--output", str(out_file))
    assert code == 130 and err.endswith("pagedserve: interrupted\n")
    assert "writing the 1 run that finished" in err
    document = json.loads(out)
    assert document == json.loads(out_file.read_text())
    assert [run["completed"] for run in document["runs"]] == [3]


@pytest.mark.parametrize("flag, name", [("--output", "bench.json"), ("--plot", "bench.png")])
def test_an_output_file_that_cannot_be_written_is_refused_before_any_request(stub, capsys,
                                                                             tmp_path, flag, name):
    """Found only after the run, the error threw away a run that may have taken an hour."""
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    code, _, err = run_cli(capsys, "--base-url", stub.url, "--num-prompts", "2",
                           flag, str(tmp_path / "no-such-dir" / name))
    assert code == 2 and err.count("\n") == 1 and flag in err and "no-such-dir" in err
    assert stub.prompts == []


def test_cli_reports_a_rejected_key_in_one_line(capsys):
    with serving(StubServer(api_key="secret").app()) as url:
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "2")
        assert code == 2 and err.count("\n") == 1 and "invalid API key" in err
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "2",
                               "--api-key", "secret", "--random-output-len", "2")
        assert code == 0, err


def test_the_key_may_come_from_the_environment_where_ps_does_not_show_it(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    with serving(StubServer(api_key="secret").app()) as url:
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "2",
                               "--random-output-len", "2")
        assert code == 0, err


def test_a_run_with_failed_requests_exits_1_after_its_report(capsys):
    """The short test request fits and passes, the real ones longer than 8 tokens are refused:
    the table said "failed 3" and the exit code was 0 (1 only once every request had failed),
    which scripts miss."""
    with serving(StubServer(max_tokens_limit=8).app()) as url:
        # asked lengths 4, 4, 5, 11, 9 and 12: three over the limit
        code, out, err = run_cli(capsys, "--base-url", url, "--num-prompts", "6",
                                 "--random-output-len", "8", "--json")
        run, = json.loads(out)["runs"]
        assert (run["completed"], run["failed"]) == (3, 3) and "first error" in err
        assert code == 1 and err.endswith("pagedserve: 3 of 6 requests failed (see the errors "
                                          "above)\n")
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "6",
                               "--random-output-len", "16", "--random-range-ratio", "0")
        assert code == 1 and "6 of 6 requests failed" in err
        code, _, err = run_cli(capsys, "--base-url", url, "--num-prompts", "6",
                               "--random-output-len", "8", "--random-range-ratio", "0")
        assert code == 0, err


def closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "rate"),
    (["--sweep-rates", "1,-4"], "rate"),
    (["--sweep-rates", "1,,4"], "'1,,4' has an empty rate"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--goodput", "ttft=5"], "NAME:MS"),
    (["--random-range-ratio", "1.5"], "range-ratio"),
    (["--random-input-len", "0"], "--random-input-len must be >= 1"),  # was "lengths must"
    (["--random-output-len", "0"], "--random-output-len must be >= 1"),
    (["--dataset", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    ([], "cannot reach the server"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "--base-url", closed_port_url(), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pagedserve: error:") and message in err


def test_plot_draws_a_png_of_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    from cluster.bench_plot import draw

    outcomes = [RunOutcome(LoadSpec(rate), [finished(0.1 * k, 0.5 * k + 0.2, 8) for k in
                                            range(1, 9)], 4.0) for rate in (1.0, math.inf)]
    path = tmp_path / "bench.png"
    draw(outcomes, [summarize(o) for o in outcomes], str(path))
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000


def test_plot_without_matplotlib_is_one_line_before_any_request(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code, _, err = run_cli(capsys, "--base-url", closed_port_url(), "--plot", "x.png")
    assert code == 2 and err.count("\n") == 1 and "pip install 'pagedserve[plot]'" in err


# -- against the real server: Ray, the daemon, the HTTP API -----------------------------------

LIVE_KEY = "bench-key-5c1e"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    import ray
    from daemon_helpers import daemon_config  # also pins RAY_AUTH_MODE=disabled

    from cluster import bringup
    from cluster.client import Client
    from cluster.http import create_app
    from scheduler.service import NAMESPACE

    cfg = daemon_config(tmp_path_factory.mktemp("bench"))
    ray.init(address="local", num_cpus=2, resources={"NPU": 1}, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False)
    try:
        bringup.up(cfg, min_workers=1)
        with serving(create_app(Client(), cfg, api_keys=(LIVE_KEY,))) as url:
            yield url
    finally:
        bringup.down()
        ray.shutdown()


def test_bench_against_the_real_server(live_server, capsys):
    code, out, err = run_cli(capsys, "--base-url", live_server, "--api-key", LIVE_KEY,
                             "--num-prompts", "8", "--sweep-rates", "inf,4", "--seed", "3",
                             "--random-input-len", "24", "--random-output-len", "10",
                             "--json", "--per-request")
    assert code == 0, err
    document = json.loads(out)
    assert document["model"] == "tiny"
    inf_run, paced_run = document["runs"]
    for i, run in enumerate(document["runs"]):  # run i's prompts are drawn with seed 3 + i
        asked = [r.max_tokens for r in bench.random_workload(8, 24, 10, 0.5, seed=3 + i)]
        assert run["completed"] == 8 and run["failed"] == 0, run["first_error"]
        records = run["requests"]
        assert [r["asked_tokens"] for r in records] == asked
        assert [r["output_tokens"] for r in records] == asked  # ignore_eos, counted by usage
        assert all(0 < r["ttft_s"] <= r["e2el_s"] for r in records)
        # a request whose tokens all came in one chunk (a busy host) has no inter-token gap
        assert all(r["tpot_s"] > 0 and min(r["itls_s"], default=0) >= 0 for r in records)
        assert run["total_output_tokens"] == sum(asked) and run["input_tokens_known"]
        assert run["ttft_ms"]["p50"] <= run["e2el_ms"]["p50"]
        assert run["output_throughput"] == pytest.approx(sum(asked) / run["duration_s"])
    # all at once: every request is sent before the first answer; at 4 req/s they spread out
    assert max(r["start_s"] for r in inf_run["requests"]) < \
        min(r["start_s"] + r["ttft_s"] for r in inf_run["requests"])
    planned = np.cumsum(arrival_gaps(8, 4.0, seed=3))
    assert all(r["start_s"] >= p - 0.01 for r, p in zip(paced_run["requests"], planned))


def test_a_connect_error_of_this_machine_is_not_taken_for_a_server_gone():
    """At --request-rate inf, each request opens a connection at once; past `ulimit -n` they
    failed with "All connection attempts failed", and three of them ended the run saying the
    server had stopped accepting connections, though it was serving the rest."""
    import errno

    import httpx

    def out_of_files(request):
        raise httpx.ConnectError("All connection attempts failed") from OSError(
            errno.EMFILE, "Too many open files")

    async def send(client, url):
        result = RequestResult(2, 4)
        await bench.send_request(client, Target(url), ids_requests(1, 2)[0], result, 0.0)
        return result

    async def both():
        async with httpx.AsyncClient(transport=httpx.MockTransport(out_of_files)) as client:
            local = await send(client, "http://127.0.0.1:1")
        with socket.socket() as s:  # a port nothing listens on: a real refusal
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        async with bench.make_client(None) as client:
            return local, await send(client, f"http://127.0.0.1:{port}")

    local, closed = asyncio.run(both())
    assert not local.refused and "Too many open files" in local.error
    assert "--max-concurrency" in local.error
    assert closed.refused
    watch = bench.ServerWatch()
    for _ in range(bench.SERVER_GONE_AFTER):
        watch.saw(local)
    assert watch.gone is None


def test_every_bench_and_up_option_with_a_default_states_it_in_its_help():
    """`bench --help` gave no default for --num-prompts and the random lengths, so a user
    could not tell what a run without them measured."""
    from cluster.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    silent = [f"{verb} {action.option_strings[0]}" for verb in ("bench", "up")
              for action in verbs[verb]._actions
              if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
              and "default" not in (action.help or "")]
    assert not silent, f"options whose help gives no default: {silent}"

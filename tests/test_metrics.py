"""The HTTP server's Prometheus metrics, in process (no Ray): what a stream's meter records and
what a scrape exposes."""
import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import http
from cluster.client import DaemonUnavailableError
from cluster.http import StreamMeter
from cluster.http_models import ResponseContext
from cluster.metrics import ServerMetrics
from worker.models.tiny import tiny_model_dir
from worker.output import RequestOutput
from worker.tokenizer import Tokenizer


def delta(index, tokens, prompt=0):
    return RequestOutput(f"job{prompt}", index, list(range(tokens)), "x" * tokens, 5)


def samples(metrics, status=None):
    text = metrics.render(status).decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels or "le" not in s.labels}


@pytest.mark.parametrize("prompts,n", [(1, 1), (1, 3), (2, 2)])
def test_tpot_is_the_gap_between_one_choices_tokens_whatever_n(prompts, n):
    """Choices stream side by side: with n=3 the server used to report a third of the gap that
    each choice's client sees (it divided by the tokens of all choices together)."""
    meter, gap = StreamMeter(started=0.0), 0.01
    for step in range(10):
        for prompt in range(prompts):
            for index in range(n):
                meter.add(prompt, delta(index, 1, prompt), now=0.1 + step * gap)
    assert meter.ttft == pytest.approx(0.1)
    assert meter.tpot == pytest.approx(gap)
    assert meter.completion_tokens == 10 * prompts * n
    metrics = ServerMetrics()
    meter.record(metrics, "completions")
    scraped = samples(metrics)
    assert scraped["pagedserve_time_per_output_token_seconds_sum"] == pytest.approx(gap)
    assert scraped["pagedserve_time_per_output_token_seconds_count"] == 1


def test_a_stream_of_first_chunks_only_has_no_tpot():
    meter = StreamMeter(started=0.0)
    meter.add(0, delta(0, 2), now=0.5)
    meter.add(0, delta(1, 2), now=0.6)
    assert meter.ttft == pytest.approx(0.5) and meter.tpot is None


STATUS = {"workers": [{"worker_id": "w1", "ready": True, "running": 2, "waiting": 1,
                       "kv_used": 4, "kv_total": 16, "preemptions": 3}],
          "pending_samples": 1, "jobs_unfinished": 4, "failovers": 2, "workers_gone": 5}


def test_a_scrape_says_whether_the_daemon_answered():
    """While the daemon is down its gauges are absent; an alert on workers_ready < 1 would not
    fire: daemon_up 0 says it, as an exporter's `up` does."""
    metrics = ServerMetrics()
    answered = samples(metrics, STATUS)
    assert answered["pagedserve_daemon_up"] == 1 and answered["pagedserve_workers_ready"] == 1
    assert answered["pagedserve_requests_waiting"] == 2
    down = samples(metrics)
    assert down["pagedserve_daemon_up"] == 0 and "pagedserve_workers_ready" not in down


def test_the_counters_a_scheduler_restart_resets_carry_its_start_as_created():
    """They restart from 0 with the scheduler; `_created` is how a Prometheus client library
    tells a scraper when a counter started, as the server's own counters already do."""
    started_at = time.time() - 100
    scraped = samples(ServerMetrics(), {**STATUS, "started_at": started_at})
    for name in ("failovers", "workers_gone", "hung_workers_killed", "engine_failures",
                 "worker_start_failures"):
        assert scraped[f"pagedserve_{name}_created"] == started_at
    assert scraped["pagedserve_failovers_total"] == 2
    assert scraped["pagedserve_workers_gone_total"] == 5


def stream_events(outputs, meter):
    ctx = ResponseContext("cmpl-x", 0, "tiny", False, Tokenizer.from_dir(tiny_model_dir()),
                          prompts=[[1, 2]])
    return http._events(None, ctx, outputs, ["x"], 1, False, meter)


async def drain(events):
    return [event async for event in events]


def test_a_stream_cut_short_counts_by_why():
    """After its 200 a stream's failure is only an error event: http_requests_total counted it
    as a success, and a stream whose client left too."""
    async def daemon_gone():
        yield 0, delta(0, 1)
        raise DaemonUnavailableError("the pagedserve daemon does not answer")

    metrics, failed, left = ServerMetrics(), StreamMeter(0.0), StreamMeter(0.0)
    events = asyncio.run(drain(stream_events(daemon_gone(), failed)))
    assert b"daemon_unavailable" in events[-2] and events[-1] == b"data: [DONE]\n\n"
    failed.record(metrics, "completions")
    left.add(0, delta(0, 1), now=0.1)  # and its client went
    left.record(metrics, "chat")
    finished = StreamMeter(0.0, finished=True)
    finished.record(metrics, "chat")
    scraped = {(s.labels.get("endpoint"), s.labels.get("reason")): s.value
               for family in text_string_to_metric_families(metrics.render(None).decode())
               for s in family.samples if s.name == "pagedserve_http_streams_unfinished_total"}
    assert scraped == {("completions", "error"): 1, ("chat", "client_gone"): 1}

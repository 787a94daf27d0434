"""Prometheus metrics of the HTTP server: latencies it measures itself, and the daemon's gauges
read from the scheduler's status at scrape time."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

PREFIX = "pagedserve"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; from a few ms (a warm decode step) to minutes (a long queue or a slow device).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class DaemonCollector:
    """Turns the last ``Client.status()`` snapshot into metric families. The snapshot is set
    just before each exposition, on the same thread, so a scrape sees one consistent status."""

    def __init__(self) -> None:
        self.status: dict | None = None

    def collect(self):
        status = self.status
        # as an exporter's `up`: without it, a daemon that is down only leaves series absent
        yield _total_gauge("daemon_up", "1 when the daemon's scheduler answered this scrape "
                           "(the daemon's figures below come from it), else 0",
                           int(status is not None))
        if status is None:
            return
        started = status.get("started_at")  # its counters below count from 0 since then
        workers = [w for w in status["workers"] if w.get("ready")]
        yield _total_gauge("requests_running", "Sequences in the workers' running batches",
                           sum(w.get("running", 0) for w in workers))
        yield _total_gauge("requests_waiting", "Sequences waiting in worker queues or for a "
                           "worker", sum(w.get("waiting", 0) for w in workers)
                           + status.get("pending_samples", 0))
        yield _total_gauge("generation_tokens_per_second", "Generated tokens per second over "
                           "the workers' recent windows, summed over workers",
                           sum(w.get("tokens_per_s", 0.0) for w in workers))
        yield _total_gauge("workers_ready", "Workers that have loaded the model", len(workers))
        yield _total_gauge("jobs_unfinished", "Jobs accepted and not finished",
                           status.get("jobs_unfinished", 0))
        yield _per_worker(GaugeMetricFamily, "kv_cache_usage_ratio",
                          "Share of the worker's KV blocks in use", workers,
                          lambda w: w.get("kv_used", 0) / w["kv_total"] if w.get("kv_total")
                          else 0.0)
        yield _per_worker(GaugeMetricFamily, "kv_cache_blocks_used", "KV blocks in use",
                          workers, lambda w: w.get("kv_used", 0))
        yield _per_worker(GaugeMetricFamily, "prefix_cache_hit_rate",
                          "Prompt tokens served from the prefix cache / prompt tokens looked "
                          "up, over the worker's life", workers,
                          lambda w: w.get("prefix_hit_rate", 0.0))
        yield _per_worker(CounterMetricFamily, "preemptions", "Sequences preempted for KV "
                          "blocks (recomputed later), over the worker's life", workers,
                          lambda w: w.get("preemptions", 0))
        yield _total_counter("failovers", "Samples re-routed after their worker died, since "
                             "the scheduler started", status.get("failovers", 0), started)
        yield _total_counter("workers_gone", "Workers that died, were killed as hung or whose "
                             "engine failed (then replaced), since the scheduler started",
                             status.get("workers_gone", 0), started)
        yield _total_counter("hung_workers_killed", "Workers killed for not stepping nor "
                             "answering while they had work, since the scheduler started",
                             status.get("stalled_workers_killed", 0), started)
        yield _total_counter("engine_failures", "Workers whose engine raised in a step (then "
                             "replaced), since the scheduler started",
                             status.get("engine_failures", 0), started)
        yield _total_counter("worker_start_failures", "Workers that failed to start (a model "
                             "or config error, or a crash while loading), since the scheduler "
                             "started", status.get("worker_start_failures", 0), started)
        yield _total_gauge("journal_unwritable", "1 while the job journal cannot be written "
                           "(no job is accepted), else 0", int(bool(status.get("journal_error"))))


def _total_gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _total_counter(name: str, documentation: str, value: float,
                   created: float | None) -> CounterMetricFamily:
    counter = CounterMetricFamily(f"{PREFIX}_{name}", documentation)
    counter.add_metric([], value, created=created)
    return counter


def _per_worker(family, name: str, documentation: str, workers: list[dict], value):
    metric = family(f"{PREFIX}_{name}", documentation, labels=["worker"])
    for w in workers:
        metric.add_metric([w["worker_id"]], value(w))
    return metric


class ServerMetrics:
    """One registry per server (so several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.daemon = DaemonCollector()
        self.registry.register(self.daemon)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From a streamed request's arrival at the "
            "HTTP server to its first token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean gap between output tokens of one "
            "streamed request, after its first (with several choices, each choice's, averaged)",
            buckets=TPOT_BUCKETS, registry=self.registry)
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds", "From a generation request's arrival to its "
            "last byte", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests answered, by route and status code",
            ["route", "code"], registry=self.registry)
        self.streams_unfinished = Counter(
            f"{PREFIX}_http_streams_unfinished", "Streams that ended before their last token, "
            "after their 200 status: reason error (an error event: a job failed or the daemon "
            "went away) or client_gone", ["endpoint", "reason"], registry=self.registry)
        self.tokens = Counter(
            f"{PREFIX}_http_tokens", "Tokens of requests served over HTTP",
            ["kind"], registry=self.registry)

    def observe_stream(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)

    def render(self, status: dict | None) -> bytes:
        """The exposition text, with the daemon's gauges from ``status``."""
        self.daemon.status = status
        return generate_latest(self.registry)

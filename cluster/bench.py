"""Serving benchmark logic: synthetic and JSONL workloads, arrival times, an async streaming load
generator for an OpenAI-compatible /v1/completions endpoint, and latency/throughput metrics."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.jobs_file import read_jsonl

ARRIVALS = ("poisson", "gamma")
SLO_NAMES = ("ttft", "tpot", "e2el")
# A run stops sending once this many requests in a row, over at least this long, found no
# server to connect to: the rest would only fail the same way, one arrival at a time. The
# time keeps a blip of the listener at a high rate from ending a run.
SERVER_GONE_AFTER = 3
SERVER_GONE_OUTAGE_S = 1.0
# Connect errors of this machine, not the server: out of open files or local ports (each request
# of --request-rate inf opens its connection at once). They must not read as a server gone.
LOCAL_CONNECT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL})
DONE = object()  # what parse_sse_line returns for the stream's closing `data: [DONE]`
WORDS = ("alpha", "block", "cache", "decode", "engine", "fabric", "graph", "host", "index",
         "kernel", "layer", "memory", "node", "offset", "page", "queue", "rank", "slot",
         "token", "vector", "worker")


# -- workload ---------------------------------------------------------------------------------

@dataclass(slots=True)
class BenchRequest:
    """One prompt to send; ``prompt_tokens`` is None when only the server can count them."""

    prompt: str | list[int]
    max_tokens: int
    prompt_tokens: int | None


def sample_lengths(rng: np.random.Generator, count: int, mean_len: int,
                   range_ratio: float, flag: str = "lengths") -> list[int]:
    """``count`` integers drawn uniformly from [len*(1-ratio), len*(1+ratio)], each at least 1.
    ``flag`` names the option ``mean_len`` came from in the error for a bad one."""
    if mean_len < 1:
        raise ValueError(f"{flag} must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    low = max(1, math.ceil(mean_len * (1.0 - range_ratio)))
    high = max(low, math.floor(mean_len * (1.0 + range_ratio)))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]


def random_workload(count: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    kind: str = "ids", vocab_size: int = 256) -> list[BenchRequest]:
    """Synthetic prompts: random token ids in [0, vocab_size), or random words of about
    ``input_len`` characters (kind "text"); output lengths drawn the same way."""
    _check_count(count)
    if vocab_size < 1:
        raise ValueError(f"--random-vocab-size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(rng, count, input_len, range_ratio, "--random-input-len")
    outputs = sample_lengths(rng, count, output_len, range_ratio, "--random-output-len")
    requests = []
    for n_in, n_out in zip(inputs, outputs):
        if kind == "ids":
            ids = [int(t) for t in rng.integers(0, vocab_size, size=n_in)]
            requests.append(BenchRequest(ids, n_out, n_in))
        elif kind == "text":
            requests.append(BenchRequest(random_text(rng, n_in), n_out, None))
        else:
            raise ValueError(f"unknown prompt kind {kind!r}; use ids or text")
    return requests


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {count}")


def random_text(rng: np.random.Generator, num_chars: int) -> str:
    words: list[str] = []
    size = 0
    while size <= num_chars:  # the join is one shorter than size
        words.append(WORDS[int(rng.integers(len(WORDS)))])
        size += len(words[-1]) + 1
    return " ".join(words)[:num_chars]


def load_dataset(path: str | Path, count: int, default_max_tokens: int) -> list[BenchRequest]:
    """``count`` requests from a JSONL file of {"prompt": text or token ids, "max_tokens": n}
    lines (other keys ignored), cycling through the file if it is shorter; errors name the line."""
    _check_count(count)
    records = read_jsonl(path, lambda line, _: _dataset_record(line, default_max_tokens),
                         "dataset")
    if not records:
        raise ValueError(f"dataset {path} holds no prompts")
    return [records[i % len(records)] for i in range(count)]


def _dataset_record(line: str, default_max_tokens: int) -> BenchRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError('each line must be a JSON object with a "prompt"')
    prompt = record["prompt"]
    max_tokens = record.get("max_tokens", default_max_tokens)
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        prompt_tokens = len(prompt)
    elif isinstance(prompt, str) and prompt:
        prompt_tokens = None
    else:
        raise ValueError('"prompt" must be a non-empty string or list of token ids')
    if not (_is_int(max_tokens) and max_tokens >= 1):
        raise ValueError(f'"max_tokens" must be an integer >= 1, got {max_tokens!r}')
    return BenchRequest(prompt, max_tokens, prompt_tokens)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- arrivals ---------------------------------------------------------------------------------

def parse_rate(text: str) -> float:
    """A request rate in requests/s: a positive number or "inf" (everything at once)."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"request rate must be a number or inf, got {text!r}") from None
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {text!r}")
    return rate


def arrival_gaps(count: int, rate: float, arrival: str = "poisson", burstiness: float = 1.0,
                 seed: int = 0) -> list[float]:
    """Seconds to wait before each request (the first gap included). Poisson: exponential gaps
    of mean 1/rate; gamma: shape ``burstiness`` with the same mean (below 1 burstier, above 1
    more regular); rate inf: no waiting."""
    check_arrival(rate, arrival, burstiness)
    if math.isinf(rate):
        return [0.0] * count
    shape = 1.0 if arrival == "poisson" else burstiness
    rng = np.random.default_rng(seed)
    return [float(g) for g in rng.gamma(shape, 1.0 / (rate * shape), size=count)]


def check_arrival(rate: float, arrival: str, burstiness: float) -> None:
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; use one of {', '.join(ARRIVALS)}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")


# -- one streamed request ---------------------------------------------------------------------

def parse_sse_line(line: str):
    """The JSON payload of an SSE ``data:`` line, DONE for ``data: [DONE]``, None for any other
    line (blank separators, comments, event names)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise ValueError(f"bad SSE data line: {data[:80]!r}")
    return payload


@dataclass(slots=True)
class RequestResult:
    """What one request measured; times are seconds, ``start`` on the run's clock."""

    asked_tokens: int
    prompt_tokens: int | None
    start: float = 0.0
    ttft: float | None = None
    e2el: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    usage_tokens: int | None = None
    done: bool = False
    error: str = ""
    refused: bool = False  # no connection to the server could be made
    unsent: bool = False  # not sent at all: the server was gone by its arrival time
    _last: float = 0.0

    def on_event(self, event, now: float) -> None:
        """Account one parsed SSE event received at time ``now``."""
        if event is DONE:
            self.done = True
            self.e2el = now - self.start
            return
        if "error" in event:
            self.error = _error_text(event["error"])
            return
        if event.get("choices"):  # a content chunk (the usage-only last chunk has none)
            if self.ttft is None:
                self.ttft = now - self.start
            else:
                self.itls.append(now - self._last)
            self._last = now
            self.chunks += 1
        usage = event.get("usage")
        if usage:
            self.usage_tokens = usage.get("completion_tokens", self.usage_tokens)
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ok(self) -> bool:
        return not self.error and self.done and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def _error_text(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


@dataclass(slots=True)
class Target:
    """Where and how to send requests."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 120.0

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, request: BenchRequest) -> dict:
        body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.model:
            body["model"] = self.model
        return body


async def send_request(client, target: Target, request: BenchRequest,
                       result: RequestResult, clock_zero: float) -> None:
    """Stream one completion into ``result``; failures are recorded, never raised."""
    import httpx

    result.start = time.perf_counter() - clock_zero
    try:
        await asyncio.wait_for(_stream(client, target, request, result, clock_zero),
                               target.timeout_s)
    except asyncio.TimeoutError:
        result.error = f"no complete response within --timeout {target.timeout_s:g} s"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        cause = _os_error_under(exc)
        if cause is not None and cause.errno in LOCAL_CONNECT_ERRNOS:
            result.error += (f" ({cause.strerror}, on this machine: --max-concurrency caps "
                             "the connections open at once)")
        else:
            result.refused = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
    except ValueError as exc:  # a malformed stream
        result.error = str(exc)
    if not result.error and not result.done:
        result.error = "stream ended before data: [DONE]"


def _os_error_under(exc: BaseException) -> OSError | None:
    """The OSError with an errno that an httpx error wraps (anyio adds one without, "All
    connection attempts failed", in between)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


async def _stream(client, target, request, result, clock_zero) -> None:
    async with client.stream("POST", target.completions_url, json=target.body(request),
                             headers=target.headers()) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", "replace")
            result.error = f"HTTP {response.status_code}: {_http_error_message(body)}"
            return
        async for line in sse_lines(response.aiter_text()):
            event = parse_sse_line(line)
            if event is not None:
                result.on_event(event, time.perf_counter() - clock_zero)
                if result.error or result.done:
                    return


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(texts: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream, ended at CR, LF or CRLF alone, as the format has it:
    httpx's aiter_lines also ends one at U+2028, U+2029, U+0085 (str.splitlines), which JSON
    leaves raw, so an event of a text holding one (vLLM sends them so) was cut in two."""
    pending = ""
    async for text in texts:
        pending += text
        held = "\r" if pending.endswith("\r") else ""  # perhaps the first half of a CRLF
        *lines, pending = _SSE_LINE_END.split(pending.removesuffix(held))
        pending += held
        for line in lines:
            yield line
    if pending.removesuffix("\r"):
        yield pending.removesuffix("\r")


def _http_error_message(body: str) -> str:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:200] or "(empty body)"
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if key in payload:
                return _error_text(payload[key])[:200]
    return body.strip()[:200]


# -- the load loop ----------------------------------------------------------------------------

@dataclass(slots=True)
class LoadSpec:
    """How requests arrive: ``rate`` requests/s (inf: all at once), at most ``max_concurrency``
    in flight, the whole run cut off after ``max_duration_s``."""

    rate: float
    arrival: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0
    max_concurrency: int | None = None
    max_duration_s: float = 3600.0

    def __post_init__(self) -> None:
        check_arrival(self.rate, self.arrival, self.burstiness)
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.max_duration_s > 0:
            raise ValueError(f"--max-duration must be > 0 s, got {self.max_duration_s}")


@dataclass(slots=True)
class RunOutcome:
    spec: LoadSpec
    results: list[RequestResult]
    duration_s: float
    server_gone: str | None = None  # why the run stopped sending early, if it did


class ServerWatch:
    """Notices a server that has stopped accepting connections: ``SERVER_GONE_AFTER`` requests
    in a row refused, the first at least ``SERVER_GONE_OUTAGE_S`` before the last. Any HTTP
    response in between shows it is there."""

    def __init__(self) -> None:
        self.refused_in_a_row = 0
        self.refused_since = 0.0
        self.gone: str | None = None
        self.event = asyncio.Event()

    def saw(self, result: RequestResult, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not result.refused:
            if result.ok or result.error.startswith("HTTP "):
                self.refused_in_a_row = 0
            return
        if self.refused_in_a_row == 0:
            self.refused_since = now
        self.refused_in_a_row += 1
        outage = now - self.refused_since
        if (self.refused_in_a_row >= SERVER_GONE_AFTER and outage >= SERVER_GONE_OUTAGE_S
                and self.gone is None):
            self.gone = (f"{self.refused_in_a_row} requests in a row refused over "
                         f"{outage:.1f} s: {result.error}")
            self.event.set()

    def not_sent(self, result: RequestResult) -> None:
        result.error = f"not sent: the server is gone ({self.gone})"
        result.unsent = True


def make_client(limit: int | None):
    import httpx

    # trust_env=False: a proxy from the environment must not sit between us and the server.
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    return httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)


async def run_load(target: Target, requests: list[BenchRequest], spec: LoadSpec,
                   on_finish=None) -> RunOutcome:
    """Send ``requests`` at the arrival times of ``spec``; returns when all have finished or
    failed, when ``spec.max_duration_s`` has passed (unfinished ones then count as failed), or
    soon after the server stops accepting connections (the unsent ones then fail unsent)."""
    gaps = arrival_gaps(len(requests), spec.rate, spec.arrival, spec.burstiness, spec.seed)
    results = [RequestResult(r.max_tokens, r.prompt_tokens) for r in requests]
    watch = ServerWatch()
    async with make_client(spec.max_concurrency) as client:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(_dispatch(client, target, requests, results, gaps, spec,
                                             start, on_finish, watch), spec.max_duration_s)
        except asyncio.TimeoutError:
            for result in results:
                if not result.ok and not result.error:
                    result.error = f"cut off: the run passed {spec.max_duration_s:g} s"
        duration = time.perf_counter() - start
    return RunOutcome(spec, results, duration, watch.gone)


async def _dispatch(client, target, requests, results, gaps, spec, start, on_finish,
                    watch: ServerWatch) -> None:
    gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None

    async def one(i: int) -> None:
        if gate is None:
            await send_request(client, target, requests[i], results[i], start)
        else:
            async with gate:
                if watch.gone:  # waited for a slot while the server went away
                    watch.not_sent(results[i])
                else:
                    await send_request(client, target, requests[i], results[i], start)
        watch.saw(results[i])
        if on_finish:
            on_finish(results[i])

    tasks = []
    due = 0.0
    for i, gap in enumerate(gaps):
        due += gap
        delay = start + due - time.perf_counter()
        if delay > 0 and not watch.gone:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watch.event.wait(), delay)
        if watch.gone:
            for result in results[i:]:
                watch.not_sent(result)
                if on_finish:
                    on_finish(result)
            break
        tasks.append(asyncio.ensure_future(one(i)))
    try:
        await asyncio.gather(*tasks)
    finally:  # cut off by max_duration_s: let every request see its cancellation
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def check_server(target: Target, request: BenchRequest) -> None:
    """Send one short request first, so an unreachable server, a wrong key or model or a bad
    prompt is one clear error instead of a run of failures."""
    probe = BenchRequest(request.prompt, min(request.max_tokens, 4), request.prompt_tokens)
    result = RequestResult(probe.max_tokens, probe.prompt_tokens)
    async with make_client(1) as client:
        await send_request(client, target, probe, result, time.perf_counter())
    if result.refused:
        raise OSError(f"cannot reach the server at {target.base_url}: {result.error}")
    if not result.ok:
        raise ValueError(f"test request to {target.completions_url} failed: {result.error}")


async def first_model_id(base_url: str, api_key: str | None) -> str | None:
    """The first model the server lists at /v1/models, or None if it lists none."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with make_client(1) as client:
        try:
            response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers,
                                        timeout=10.0)
        except httpx.ConnectError as exc:
            raise OSError(f"cannot reach the server at {base_url}: {exc}") from None
        except httpx.HTTPError:
            return None
    if response.status_code != 200:
        return None
    try:
        models = response.json().get("data") or []
        return str(models[0]["id"]) if models else None
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


# -- metrics ----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in milliseconds (None when there are no values)."""
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = [v * 1e3 for v in values_s]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput takes NAME:MS with NAME one of {', '.join(SLO_NAMES)}, "
                             f"got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {name}: {value!r} is not a number of ms") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput {name} must be > 0 ms, got {value}")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a successful request stays within every SLO (ms); a request with one output
    token has no TPOT and meets a TPOT SLO."""
    if not result.ok:
        return False
    measured = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return all(measured[name] * 1e3 <= limit for name, limit in slos.items())


def summarize(outcome: RunOutcome, slos: dict[str, float] | None = None) -> dict:
    """The run's figures as a JSON-ready dict."""
    done = [r for r in outcome.results if r.ok]
    failed = [r for r in outcome.results if not r.ok]
    duration = outcome.duration_s
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    spec = outcome.spec
    summary = {
        "request_rate": "inf" if math.isinf(spec.rate) else spec.rate,
        "arrival": spec.arrival, "burstiness": spec.burstiness,
        "max_concurrency": spec.max_concurrency, "seed": spec.seed,
        "completed": len(done), "failed": len(failed),
        "not_sent": sum(r.unsent for r in failed),  # of the failed
        "first_error": failed[0].error if failed else None,
        "server_gone": outcome.server_gone,
        "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "input_tokens_known": all(r.prompt_tokens is not None for r in done),
        "outputs_of_asked_length": sum(r.output_tokens == r.asked_tokens for r in done),
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution_ms([r.ttft for r in done]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itls]),
        "e2el_ms": distribution_ms([r.e2el for r in done]),
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in outcome.results)
        summary["slos_ms"] = dict(slos)
        summary["good_requests"] = good
        summary["goodput"] = good / duration
    return summary


def request_records(outcome: RunOutcome) -> list[dict]:
    """Per-request figures (seconds), for --per-request output and plots."""
    return [{"start_s": r.start, "ok": r.ok, "prompt_tokens": r.prompt_tokens,
             "asked_tokens": r.asked_tokens, "output_tokens": r.output_tokens, "ttft_s": r.ttft,
             "tpot_s": r.tpot, "e2el_s": r.e2el, "itls_s": r.itls, "error": r.error or None}
            for r in outcome.results]


def format_summary(summary: dict) -> str:
    """The human table of one run."""
    rate = summary["request_rate"]
    title = f" rate {rate} req/s ({summary['arrival']}) "
    rows = [
        ("successful requests", f"{summary['completed']}"),
        ("failed requests", f"{summary['failed']}" + (f" ({summary['not_sent']} not sent)"
                                                      if summary["not_sent"] else "")),
        ("duration", f"{summary['duration_s']:.2f} s"),
        ("input tokens", f"{summary['total_input_tokens']}"
                         + ("" if summary["input_tokens_known"] else " (some unknown)")),
        ("output tokens", f"{summary['total_output_tokens']}"),
        ("request throughput", f"{summary['request_throughput']:.2f} req/s"),
        ("output token throughput", f"{summary['output_throughput']:.1f} tok/s"),
        ("total token throughput", f"{summary['total_token_throughput']:.1f} tok/s"),
    ]
    if "goodput" in summary:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in summary["slos_ms"].items())
        rows.append(("goodput", f"{summary['goodput']:.2f} req/s "
                                f"({summary['good_requests']} within {slos})"))
    if summary["first_error"]:
        rows.append(("first error", summary["first_error"]))
    if summary["server_gone"]:
        rows.append(("stopped sending", summary["server_gone"]))
    width = max(len(k) for k, _ in rows)
    lines = [f"{title:=^60}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  {'(ms)':<{width}}  {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2el_ms", "E2E latency")):
        cells = " ".join(_ms_cell(summary[key][p]) for p in ("mean", "p50", "p90", "p99"))
        lines.append(f"  {label:<{width}}  {cells}")
    return "\n".join(lines)


def _ms_cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.1f}"

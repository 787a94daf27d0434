"""The HTTP front door: an OpenAI-compatible FastAPI app over the daemon's Client, with bearer
API keys, a body size limit, content negotiation (JSON / msgpack), health and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgpack
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from cluster.client import (SCHEDULER_GONE, Client, DaemonNotUpError, DaemonUnavailableError,
                            JobFailedError)
from cluster.config import PagedServeConfig
from cluster.http_models import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                 GenerationRequest, Echo, ResponseContext, TokenizeRequest,
                                 bad_request, check_response_size, echo_chunk, full_response,
                                 in_request_terms, job_without_output, param_of, role_chunk,
                                 stream_chunk, usage_chunk, validation_error, without_output)
from cluster.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.metrics import ServerMetrics
from cluster.sse import DONE_EVENT, EventStream, sse_event
from cluster.version import pagedserve_version
from scheduler.sampling_params import InvalidRequestError, SamplingParams
from scheduler.service import (BatchTooLargeError, OverloadedError, UnavailableError,
                               UnknownJobError)
from scheduler.wording import counted
from worker.output import JobOutput, RequestOutput
from worker.generation_defaults import generation_defaults
from worker.tokenizer import ChatTemplateError, Tokenizer

log = logging.getLogger("pagedserve.http")

API_KEYS_ENV = "PAGEDSERVE_API_KEYS"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
HEALTH_TIMEOUT_S = 5.0
CONTEXT_EXCEEDED = "context_length_exceeded"
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 1
CONTEXT_REFRESH_S = 5.0  # how long the workers' capacity read from the daemon is trusted
ABORT_RETRY_S = 5.0  # how often an abort the unavailable daemon could not take is tried again
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = "pagedserve.request_id"  # where RequestId leaves it on the ASGI scope


def api_keys_from(cfg: PagedServeConfig, environ=os.environ) -> tuple[str, ...]:
    """Keys from PAGEDSERVE_API_KEYS (comma-separated) and the config's http.api_keys; both
    are accepted. None at all means the API is open."""
    from_env = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys([*from_env, *cfg.http.api_keys]))


# -- per-app state ----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Server:
    """What the routes share: the daemon's client, the served model's tokenizer and limits."""

    client: Client
    tokenizer: Tokenizer
    model_id: str
    api_keys: tuple[str, ...]
    max_body_bytes: int
    # longest prompt + output a request can count on: the model's as configured until
    # refresh_context reads the workers'
    context_len: int
    context_checked: float = float("-inf")
    # the checkpoint's generation_config.json sampling fields, for those a request leaves
    # unset (as vLLM's server does); max_tokens keeps OpenAI's meaning
    sampling_defaults: dict = field(default_factory=dict)
    trust_request_chat_template: bool = False  # http.trust_request_chat_template
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    started: int = field(default_factory=lambda: int(time.time()))
    _background: set = field(default_factory=set)
    # the aborts the unavailable daemon could not take (job id -> in_flight), and the one task
    # that retries them
    _unsent_aborts: dict[str, bool] = field(default_factory=dict)
    _abort_retrier: asyncio.Task | None = None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_id!r} (see GET /v1/models)",
                           param="model", code="model_not_found")

    async def refresh_context(self) -> int:
        """``context_len`` from the daemon's ready workers, re-read every CONTEXT_REFRESH_S: a
        daemon brought down and up again under this server may have another KV capacity. The
        last value stands while no worker is ready or the daemon does not answer at once."""
        if time.monotonic() - self.context_checked >= CONTEXT_REFRESH_S:
            self.context_checked = time.monotonic()
            try:
                status = await asyncio.wait_for(self.client.astatus(), HEALTH_TIMEOUT_S)
            except Exception as exc:  # the request itself will meet (and report) the trouble
                log.debug("could not read the daemon's capacity: %s", exc)
            else:
                self.context_len = _context_len(status) or self.context_len
        return self.context_len

    def check_room(self, prompt_len: int, request: GenerationRequest,
                   prompt: str = "the prompt") -> None:
        """A max_tokens (given, or completions' default of 16) that cannot fit beside the
        prompt is the client's error (as with OpenAI's API and vLLM's), not a silently shorter
        output; chat's default is the room left."""
        wanted = request.requested_max_tokens
        # OpenAI's (and vLLM's) wording and code: clients that shorten a prompt on this error
        # (LiteLLM's context-window fallbacks) look for them
        limit = f"This model's maximum context length is {self.context_len} tokens. However, "
        if prompt_len >= self.context_len:  # no max_tokens could fit: the prompt is at fault
            raise bad_request(f"{limit}{prompt} has {prompt_len} tokens, leaving no room for "
                              f"the completion. Please reduce the length of {prompt}.",
                              request.field_names().get("prompt", "prompt"),
                              code=CONTEXT_EXCEEDED)
        if wanted is not None and prompt_len + wanted > self.context_len:
            param = request.field_names().get("max_tokens", "max_tokens")
            given = "" if getattr(request, param) is not None else " by default"
            raise bad_request(
                f"{limit}you requested {prompt_len + wanted} tokens ({prompt_len} in {prompt}, "
                f"{wanted} in the completion, {param}{given}). Please reduce the length of "
                f"{prompt} or the completion.", param, code=CONTEXT_EXCEEDED)

    def chat_prompt(self, request: ChatRequest | TokenizeRequest) -> list[int]:
        """The messages' prompt; a template that fails (it may raise on purpose, to refuse a
        conversation) is the request's error, with the template's message."""
        options = request.template_options(self.trust_request_chat_template)
        messages = [m.as_template_input() for m in request.messages]
        try:
            return self.tokenizer.encode_chat(messages, **options)
        except (ChatTemplateError, InvalidRequestError) as exc:
            raise bad_request(str(exc), "messages" if request.chat_template is None
                              else "chat_template") from None

    def abort_soon(self, job_id: str, in_flight: bool = False) -> None:
        """Abort without waiting: called while the request's own task is being torn down.
        ``in_flight``: its submit went unanswered, and may reach the scheduler after the
        abort does (Ray does not keep the order of calls to an async actor)."""
        self._in_background(self._abort_quietly(job_id, in_flight))

    def _in_background(self, work) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _abort_quietly(self, job_id: str, in_flight: bool) -> None:
        """Its client was answered (an error, or it left): the job must not run on. While the
        daemon is unavailable the abort waits with the others it could not take, as `up`
        would resume the job."""
        try:
            await self.client.aabort(job_id, in_flight=in_flight)
        except DaemonUnavailableError as exc:
            if self._abort_retrier is None or self._abort_retrier.done():
                log.warning("could not abort job %s (%s); trying again every %g s, with the "
                            "other aborts the daemon cannot take meanwhile", job_id, exc,
                            ABORT_RETRY_S)
                self._abort_retrier = self._in_background(self._retry_unsent_aborts())
            self._unsent_aborts[job_id] = in_flight
        except UnknownJobError:  # never accepted (a submit that did not go through)
            pass
        except Exception as exc:  # noqa: BLE001 - best effort: it is logged
            log.warning("could not abort job %s: %s", job_id, exc)

    async def _retry_unsent_aborts(self) -> None:
        """Tries the oldest unsent abort every ABORT_RETRY_S, however many wait (a try of
        each kept 52% of a core busy once an outage had met 2,000 requests, and more with
        every request after); once the daemon takes one, the others are sent."""
        while self._unsent_aborts:
            await asyncio.sleep(ABORT_RETRY_S)
            job_id, in_flight = next(iter(self._unsent_aborts.items()))
            try:
                await self.client.aabort(job_id, in_flight=in_flight)
            except DaemonUnavailableError:
                continue
            except UnknownJobError:
                pass
            except Exception as exc:  # noqa: BLE001 - best effort: it is logged
                log.warning("could not abort job %s: %s", job_id, exc)
            unsent, self._unsent_aborts = self._unsent_aborts, {}
            del unsent[job_id]
            for other, other_in_flight in unsent.items():
                self.abort_soon(other, other_in_flight)


def _server(request: Request) -> Server:
    return request.app.state.server


def create_app(client: Client, cfg: PagedServeConfig, *,
               api_keys: tuple[str, ...] | None = None,
               tokenizer: Tokenizer | None = None) -> FastAPI:
    """The app for the daemon ``client`` talks to, serving ``cfg.engine.model``. ``api_keys``
    defaults to ``api_keys_from(cfg)``. A client not given its own ``down_wait_s`` is set to
    wait for no `up` once it finds the daemon down: requests get their 503 at once, not after
    a minute of the outage."""
    from worker.loader import resolve_model_path

    if client.down_wait_s is None:
        client.down_wait_s = 0.0

    path = resolve_model_path(cfg.engine.model)
    server = Server(client, tokenizer or Tokenizer.from_dir(path), cfg.engine.model,
                    api_keys_from(cfg) if api_keys is None else tuple(api_keys),
                    cfg.http.max_body_bytes, _model_context_len(cfg, path),
                    sampling_defaults={k: v for k, v in generation_defaults(path).items()
                                       if k != "max_tokens"},
                    trust_request_chat_template=cfg.http.trust_request_chat_template)
    app = FastAPI(title="pagedserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.include_router(router)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)  # a middleware's own error
    app.add_middleware(UnexpectedErrors)  # innermost: counted, and given the request id
    app.add_middleware(ConcurrencyLimit, limit=cfg.http.max_concurrent_requests)
    app.add_middleware(RequestCounter, metrics=server.metrics)
    if cfg.http.cors_allowed_origins:  # a preflight is answered before the rest
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.http.cors_allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(RequestId)  # outermost: every answer carries it, a 503 refusal too
    return app


def _context_len(status: dict) -> int | None:
    """The smallest room any ready worker has (model length and KV capacity); None if no
    worker is ready."""
    fits = [min(w["max_model_len"], w["max_tokens_fit"]) for w in status["workers"]
            if w.get("ready")]
    return min(fits) if fits else None


def _model_context_len(cfg: PagedServeConfig, model_path) -> int:
    from worker.loader import load_config

    return min(cfg.engine.max_model_len or 1 << 62, load_config(model_path).max_model_len)


# -- routes -----------------------------------------------------------------------------------


def has_api_key(request: Request) -> bool:
    """Whether the request carries a valid key, or the API is open (no keys)."""
    keys = _server(request).api_keys
    if not keys:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # compare with every key, in constant time, so timing tells nothing about a key
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matches)


async def require_api_key(request: Request) -> None:
    if not has_api_key(request):
        raise ApiError(401, "missing or invalid API key; send the header "
                            "'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
authorized = [Depends(require_api_key)]


@router.get("/health")
async def health(request: Request) -> Response:
    """Open without a key: 200 when the scheduler and at least one worker answer and new jobs
    are taken (not draining, the journal writable). Without a valid key (where keys are set)
    the body is the status alone: the reason may name the journal's path."""
    body = await _health(_server(request).client)
    code = 503 if body["status"] == "unavailable" else 200
    return JSONResponse(body if has_api_key(request) else {"status": body["status"]}, code)


async def _health(client: Client) -> dict:
    try:
        status = await asyncio.wait_for(client.astatus(), HEALTH_TIMEOUT_S)
    except DaemonNotUpError:  # taken down: the probe says so, as requests do
        return {"status": "unavailable", "reason": "pagedserve is not up on this cluster"}
    except Exception as exc:
        log.warning("health: the scheduler does not answer: %s", _why_no_answer(exc))
        return {"status": "unavailable", "reason": "the scheduler does not answer"}
    alive = await client.alive_workers(status, timeout=HEALTH_TIMEOUT_S)
    reason = ("no worker answers" if not alive
              else "draining (`pagedserve down --drain`)" if status.get("draining")
              else f"the job journal: {status['journal_error']}" if status.get("journal_error")
              else None)
    body = {"status": "unavailable" if reason else "ok", "workers_alive": len(alive),
            "workers_known": len(status["workers"])}
    if reason:
        body["reason"] = reason
    return body


def _why_no_answer(exc: Exception) -> str:
    # a timeout's message is empty: the warning ended in ": "
    return (f"no answer within {HEALTH_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError)
            else str(exc) or type(exc).__name__)


@router.get("/version")
async def server_version() -> dict:
    """Open without a key, as /health is."""
    return {"version": pagedserve_version()}


@router.get("/metrics", dependencies=authorized)
async def metrics(request: Request) -> Response:
    server = _server(request)
    try:
        status = await asyncio.wait_for(server.client.astatus(), HEALTH_TIMEOUT_S)
    except Exception as exc:  # still serve the server's own metrics
        log.warning("metrics: the scheduler does not answer: %s", _why_no_answer(exc))
        status = None
    return Response(server.metrics.render(status), media_type=METRICS_CONTENT_TYPE)


@router.post("/tokenize", dependencies=authorized)
async def tokenize(request: Request) -> Response:
    """The token ids a prompt (or chat messages) would be given, to count them against
    ``max_model_len`` before sending."""
    server = _server(request)
    body = await _parse(request, TokenizeRequest, server.max_body_bytes)
    server.check_model(body.model)
    body.check_one_input()
    if body.messages is not None:
        ids = await asyncio.to_thread(server.chat_prompt, body)
    else:
        ids = await asyncio.to_thread(server.tokenizer.encode, body.prompt,
                                      body.add_special_tokens)
    return _encode(request, {"tokens": ids, "count": len(ids),
                             "max_model_len": await server.refresh_context()})


@router.post("/detokenize", dependencies=authorized)
async def detokenize(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, DetokenizeRequest, server.max_body_bytes)
    server.check_model(body.model)
    vocab = server.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens must be integers in [0, {vocab})", "tokens")
    text = await asyncio.to_thread(server.tokenizer.decode, body.tokens)  # 1 MiB: ~0.1 s
    return _encode(request, {"prompt": text})


@router.get("/v1/models", dependencies=authorized)
async def list_models(request: Request) -> Response:
    return _encode(request, {"object": "list", "data": [_model_card(_server(request))]})


@router.get("/v1/models/{model:path}", dependencies=authorized)
async def get_model(model: str, request: Request) -> Response:
    server = _server(request)
    server.check_model(model)
    return _encode(request, _model_card(server))


def _model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.started,
            "owned_by": "pagedserve"}


@router.post("/v1/completions", dependencies=authorized)
async def completions(request: Request) -> Response:
    started = time.monotonic()
    server = _server(request)
    body = await _parse(request, CompletionRequest, server.max_body_bytes)
    server.check_model(body.model)
    # Tokenized here, not in the scheduler: its one event loop relays every job's tokens,
    # and a long prompt's encode would stall them all (~1 s for 1 MiB of text). Off this
    # server's event loop too, for the same reason.
    given = body.prompt_inputs()
    prompts = await asyncio.to_thread(
        lambda: [p if isinstance(p, list) else server.tokenizer.encode(p) for p in given])
    if body.echo and body.truncate_prompt_tokens is not None:
        raise bad_request("echo cannot be combined with truncate_prompt_tokens",
                          "truncate_prompt_tokens")
    await server.refresh_context()
    for i, ids in enumerate(prompts):
        server.check_room(body.kept_length(ids), body,
                          f"prompt {i}" if len(prompts) > 1 else "the prompt")
    echoed = [Echo(p if isinstance(p, str) else server.tokenizer.decode(p), ids)
              for p, ids in zip(given, prompts)] if body.echo else []
    params = body.sampling_params(server.sampling_defaults)
    return await _generate(request, body, prompts, params, started, echoed)


@router.post("/v1/chat/completions", dependencies=authorized)
async def chat_completions(request: Request) -> Response:
    started = time.monotonic()
    server = _server(request)
    body = await _parse(request, ChatRequest, server.max_body_bytes)
    server.check_model(body.model)
    prompt_ids = await asyncio.to_thread(server.chat_prompt, body)
    context_len = await server.refresh_context()
    server.check_room(body.kept_length(prompt_ids), body)
    # OpenAI's chat default is "until the model stops": the room left in the context
    room = {} if body.requested_max_tokens is not None else \
        {"max_tokens": max(1, context_len - body.kept_length(prompt_ids))}
    return await _generate(request, body, [prompt_ids],
                           body.sampling_params(server.sampling_defaults, **room), started)


# -- generation -------------------------------------------------------------------------------


async def _generate(request: Request, body: GenerationRequest, prompts: list[list[int]],
                    params: SamplingParams, started: float, echoed: list[Echo] = ()) -> Response:
    """One job per prompt, submitted together (all accepted or none), answered as one
    response; ``echoed``: what to put before each prompt's choices (echo=true)."""
    server = _server(request)
    chat = isinstance(body, ChatRequest)
    if not body.stream:
        check_response_size(prompts, params, bool(echoed), body.field_names())
    with _daemon_errors(body):
        job_ids = await _submit_or_withdraw(server, prompts, params, body.priority)
    ctx = ResponseContext(f"{'chatcmpl' if chat else 'cmpl'}-{job_ids[0]}", int(time.time()),
                          server.model_id, chat, server.tokenizer, echoed=list(echoed),
                          prompts=prompts, n=params.n,
                          skip_special_tokens=params.skip_special_tokens,
                          include_usage=body.stream and body.include_usage)
    endpoint = "chat" if chat else "completions"
    if body.stream:
        meter = StreamMeter(started)
        outputs = await _open_stream(server, body, job_ids)
        if body.prompt_only:
            outputs = _without_outputs(outputs)
        events = _events(server, ctx, outputs, job_ids, params.n, body.include_usage, meter)
        return EventStream(events, on_close=functools.partial(_close_stream, server, meter,
                                                               job_ids, endpoint))
    try:  # however it ends (the client gone, a job failed, the daemon gone), as a stream's
        with _daemon_errors(body):
            jobs = await _results_unless_gone(request, server, job_ids)
    finally:
        server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    if body.prompt_only:
        jobs = [job_without_output(job) for job in jobs]
    server.metrics.count_tokens(sum(job.num_prompt_tokens for job in jobs),
                                sum(len(o.token_ids) for job in jobs for o in job.outputs))
    # off the event loop: building and encoding 1M logprob entries takes ~9 s of CPU
    return await asyncio.to_thread(lambda: _encode(request, full_response(ctx, jobs, params.n)))


async def _submit_or_withdraw(server: Server, prompts: list[list[int]], params: SamplingParams,
                              priority: int) -> list[str]:
    """The jobs' ids; if the daemon did not answer, the jobs it may still take are aborted
    (the client is answered 503 and will not read them)."""
    try:
        return await server.client.asubmit_many(prompts, params, priority=priority, tied=True)
    except DaemonUnavailableError as exc:
        for job_id in getattr(exc, "in_flight", ()):
            server.abort_soon(job_id, in_flight=True)
        raise


async def _open_stream(server: Server, body: GenerationRequest, job_ids: list[str]
                       ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The jobs' outputs, once the scheduler has taken their stream: a refusal (overloaded)
    is still answered with its status code, and the jobs are aborted."""
    try:
        with _daemon_errors(body):
            return await server.client.aopen_stream(job_ids)
    except BaseException:  # the refusal, or the client gone meanwhile: nobody reads the jobs
        for job_id in job_ids:
            server.abort_soon(job_id)
        raise


async def _without_outputs(outputs: AsyncIterator[tuple[int, RequestOutput]]
                           ) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with contextlib.aclosing(outputs):
        async for place, delta in outputs:
            yield place, without_output(delta)


def _close_stream(server: Server, meter: StreamMeter, job_ids: list[str], endpoint: str) -> None:
    """However a stream ended, its latencies and the tokens it sent count in the metrics."""
    meter.record(server.metrics, endpoint)
    if not meter.finished:  # the client left mid-stream, or one of the jobs failed
        for job_id in job_ids:
            server.abort_soon(job_id)


async def _results_unless_gone(request: Request, server: Server,
                               job_ids: list[str]) -> list[JobOutput]:
    """Wait for the jobs, read in order; if the client disconnects meanwhile, or one of them
    fails (noticed once those before it have finished), the others are aborted."""
    waiter = asyncio.ensure_future(server.client.aresults(job_ids))
    answered = False
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                jobs = waiter.result()
                answered = True
                return jobs
            if await request.is_disconnected():
                raise _client_gone()
    finally:
        if not answered:
            waiter.cancel()
            for job_id in job_ids:
                server.abort_soon(job_id)


@dataclass(slots=True)
class ChoiceTimes:
    """When one choice of a stream (a prompt's sample) got its first and its latest tokens."""

    first_at: float
    first_chunk_tokens: int
    last_at: float = 0.0
    tokens: int = 0

    @property
    def tpot(self) -> float | None:
        later = self.tokens - self.first_chunk_tokens
        return None if later <= 0 else (self.last_at - self.first_at) / later


@dataclass(slots=True)
class StreamMeter:
    """Latencies and token counts of one stream, as its client sees them."""

    started: float
    # per (prompt, sample index): choices stream side by side, each at its own pace
    choices: dict[tuple[int, int], ChoiceTimes] = field(default_factory=dict)
    prompt_tokens_of: dict[int, int] = field(default_factory=dict)  # per prompt of the request
    finished: bool = False
    failed: bool = False  # ended by an error event

    def add(self, prompt: int, delta: RequestOutput, now: float) -> None:
        self.prompt_tokens_of[prompt] = delta.num_prompt_tokens
        if not delta.new_token_ids:
            return
        tokens = len(delta.new_token_ids)
        choice = self.choices.setdefault((prompt, delta.index), ChoiceTimes(now, tokens))
        choice.last_at = now
        choice.tokens += tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_tokens_of.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    @property
    def ttft(self) -> float | None:
        if not self.choices:
            return None
        return min(c.first_at for c in self.choices.values()) - self.started

    @property
    def tpot(self) -> float | None:
        """The mean over choices of each one's gap between tokens after its first chunk (as
        each choice's reader sees it); None when no choice has a token after its first."""
        gaps = [gap for c in self.choices.values() if (gap := c.tpot) is not None]
        return sum(gaps) / len(gaps) if gaps else None

    def record(self, metrics: ServerMetrics, endpoint: str) -> None:
        metrics.observe_stream(self.ttft, self.tpot)
        metrics.latency.labels(endpoint).observe(time.monotonic() - self.started)
        metrics.count_tokens(self.prompt_tokens, self.completion_tokens)
        if not self.finished:
            reason = "error" if self.failed else "client_gone"
            metrics.streams_unfinished.labels(endpoint, reason).inc()


async def _events(server: Server, ctx: ResponseContext,
                  outputs: AsyncIterator[tuple[int, RequestOutput]], job_ids: list[str], n: int,
                  include_usage: bool, meter: StreamMeter) -> AsyncIterator[bytes]:
    """The jobs' output as OpenAI server-sent events, as it arrives, ending with [DONE]; job
    i's samples are choices i * n onwards. Errors after the first byte can no longer change
    the status: they become an error event, and the other jobs are aborted."""
    try:
        async with contextlib.aclosing(outputs):  # ends the scheduler's call too
            if ctx.chat:
                for index in range(n):
                    yield sse_event(role_chunk(ctx, index))
            opened: set[int] = set()
            async for place, delta in outputs:
                if delta.finish_reason == "error":
                    meter.failed = True
                    yield sse_event(await _job_error(server, job_ids[place]))
                    break
                meter.add(place, delta, time.monotonic())
                index = place * n + delta.index
                if ctx.echoed and index not in opened:
                    opened.add(index)
                    yield sse_event(echo_chunk(ctx, place, delta, index))
                yield sse_event(stream_chunk(ctx, delta, index))
            else:
                meter.finished = True
                if include_usage:
                    yield sse_event(usage_chunk(ctx, meter.prompt_tokens, meter.completion_tokens))
    except Exception as exc:  # the daemon went away mid-stream
        log.warning("stream of jobs %s failed: %s", ", ".join(job_ids), exc)
        meter.failed = True
        yield sse_event(_daemon_error(exc).body())
    yield DONE_EVENT


async def _job_error(server: Server, job_id: str) -> dict:
    try:
        await server.client.aresult(job_id)
    except JobFailedError as exc:
        return _daemon_error(exc).body()
    return ApiError(500, f"job {job_id} failed", type="server_error").body()


# -- errors -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _daemon_errors(body: GenerationRequest):
    """The daemon's exceptions as API errors (the message only, never a traceback)."""
    try:
        yield
    except BatchTooLargeError as exc:  # more samples (prompts x n) than the queue holds
        raise bad_request(str(exc), "prompt") from None
    except InvalidRequestError as exc:
        if exc.job_index is not None and param_of(exc.reason, {}) in (None, "prompt"):
            # about one prompt of several
            raise bad_request(f"prompt {exc.job_index}: {exc.reason}", "prompt") from None
        # about a field every prompt shares (priority, logit_bias): the request's fault
        reason = str(exc) if exc.job_index is None else exc.reason
        raise bad_request(*in_request_terms(reason, body.field_names())) from None
    except (OverloadedError, JobFailedError, UnknownJobError, DaemonUnavailableError,
            *SCHEDULER_GONE) as exc:
        raise _daemon_error(exc) from None


def _daemon_error(exc: Exception) -> ApiError:
    if isinstance(exc, UnavailableError):  # draining, or the journal cannot be written
        return ApiError(503, str(exc), type="service_unavailable", code=exc.code)
    if isinstance(exc, OverloadedError):
        return ApiError(429, str(exc), type="rate_limit_error", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, JobFailedError):
        return ApiError(500, str(exc), type="server_error", code="job_failed")
    if isinstance(exc, UnknownJobError):  # gone while the request waited (not resumed)
        return ApiError(500, str(exc), type="server_error", code="job_lost")
    if isinstance(exc, (DaemonUnavailableError, *SCHEDULER_GONE)):
        # taken down (`pagedserve down`), not restarting: said as the CLI says it
        said = (str(exc) if isinstance(exc, DaemonNotUpError)
                else "the pagedserve daemon does not answer")
        return ApiError(503, f"{said}; retry later",
                        type="service_unavailable", code="daemon_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(500, "internal server error", type="server_error")


async def _on_api_error(request: Request, exc: ApiError) -> Response:
    return _encode(request, exc.body(), exc.status, exc.headers)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    error = ApiError(exc.status_code, str(exc.detail), code=_snake(str(exc.detail)),
                     headers=dict(exc.headers or {}))
    return await _on_api_error(request, error)


async def _on_unexpected_error(request: Request, exc: Exception) -> Response:
    # UnexpectedErrors calls this inside the middlewares; Starlette's own outermost one, for
    # an error of a middleware itself, outside them all, so the request id is set here
    request_id = request.scope.get(REQUEST_ID_KEY, "")
    log.error("unexpected error on %s %s (request %s)", request.method, request.url.path,
              request_id, exc_info=exc)
    return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), 500,
                        {REQUEST_ID_HEADER: request_id} if request_id else None)


def _snake(text: str) -> str:
    return "_".join(text.lower().split())


# -- bodies -----------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 if its Content-Length or its actual size is over ``limit`` bytes
    (the ASGI server discards what is left unread)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _too_large(limit) if declared.isdigit() else bad_request("bad Content-Length")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise _client_gone() from None
    return b"".join(chunks)


def _client_gone() -> ApiError:
    # 499 (nginx's "client closed request"): nobody reads it, but metrics count it
    return ApiError(499, "the client closed the connection", code="client_closed")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (http.max_body_bytes)",
                    code="request_too_large")


async def _parse(request: Request, model: type[BaseModel], limit: int):
    """The body as ``model``, decoded and validated off the event loop: a 1 MiB body of 50,000
    chat messages takes ~0.3 s, which would stall every stream this server sends."""
    body = await read_body(request, limit)
    return await asyncio.to_thread(_validated, body, request.headers.get("content-type"), model)


def _validated(body: bytes, content_type: str | None, model: type[BaseModel]):
    data = _decode(body, content_type)
    if not isinstance(data, dict):
        raise bad_request("the request body must be an object", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _decode(body: bytes, content_type: str | None) -> object:
    """JSON, or msgpack when the Content-Type says so. Nothing else is ever decoded (and
    nothing is unpickled)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in MSGPACK_TYPES:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception:  # untrusted bytes: every failure is the client's bad body
            raise bad_request("the request body is not valid msgpack", code="invalid_body") \
                from None
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") \
            from None
    where = _lone_surrogate_at(data) if _MAYBE_SURROGATE.search(body) else None
    if where is not None:
        # JSON may escape half of a UTF-16 pair ("\\ud83d", a string cut inside an emoji);
        # it is no text: the tokenizer and the journal would fail on it
        raise bad_request(f"{where or 'the body'} holds a lone UTF-16 surrogate (half of an "
                          "escaped character pair), which is not text", param=where or None,
                          code="invalid_json")
    return data


# what a surrogate in decoded JSON comes from: a \\ud800-\\udfff escape, or its raw UTF-8-like
# bytes (json.loads reads bytes with surrogatepass); most bodies have neither, and skip the walk
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _lone_surrogate_at(data: object) -> str | None:
    """The path (``messages.0.content``, as validation errors name a field) of a string, or
    key, holding a lone surrogate. Walked without recursion: JSON nests as deep as its decoder
    allows."""
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                named = key.encode("utf-8", "backslashreplace").decode()  # errors must be text
                path = f"{where}.{named}" if where else named
                if named != key:
                    return path
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), item)
                         for i, item in enumerate(value))
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _encode(request: Request, payload: dict, status: int = 200,
            headers: dict[str, str] | None = None) -> Response:
    if _prefers_msgpack(request.headers.get("accept", "")):
        return Response(msgpack.packb(payload, use_bin_type=True), status, headers,
                        media_type=MSGPACK_TYPES[0])
    return JSONResponse(payload, status, headers)


def _prefers_msgpack(accept: str) -> bool:
    """msgpack when the Accept header ranks it above JSON (JSON wins ties and absence)."""
    ranks: dict[str, float] = {}
    for item in accept.split(","):
        media, *options = (part.strip().lower() for part in item.split(";"))
        quality = 1.0
        for option in options:
            if option.startswith("q="):
                with contextlib.suppress(ValueError):
                    quality = float(option[2:])
        ranks[media] = max(quality, ranks.get(media, 0.0))
    msgpack_rank = max(ranks.get(media, 0.0) for media in MSGPACK_TYPES)
    return msgpack_rank > ranks.get("application/json", 0.0)


# -- request limiting and counting ------------------------------------------------------------


class _HttpMiddleware:
    """Plain ASGI middleware (so that streams and disconnect detection pass through untouched)
    acting on HTTP requests in ``handle``; every other scope goes straight on."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        raise NotImplementedError


class ConcurrencyLimit(_HttpMiddleware):
    """ASGI middleware answering 503 to a POST that arrives while ``limit`` are in progress,
    before its body is read, and closing its connection (which would otherwise hold what
    arrived of the body): 1,500 clients each sending most of a 1 MiB body (the largest taken)
    grew an unbounded server by 1.5 GiB. GETs pass: a busy server's health probe and metrics
    scrape must still be answered."""

    def __init__(self, app, limit: int) -> None:
        super().__init__(app)
        self.limit = limit
        self.in_progress = 0

    async def handle(self, scope, receive, send) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            busy = ApiError(503, f"the server is handling {counted(self.limit, 'request')} "
                                 "(http.max_concurrent_requests); retry later",
                            type="service_unavailable", code="too_many_requests_in_progress",
                            headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            await JSONResponse(busy.body(), busy.status, busy.headers)(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class RequestCounter(_HttpMiddleware):
    """ASGI middleware counting answered requests by route and status."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope, receive, send) -> None:
        status = 500

        async def recording_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # the route template (bounded label values), set on the scope by the router
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()


class UnexpectedErrors(_HttpMiddleware):
    """ASGI middleware answering an exception no handler took with a JSON 500. Starlette's
    outermost middleware answers it too, but then raises it on to uvicorn, which closes the
    connection: a client's next request on it then failed. A response already started cannot
    be replaced, so such an error goes on."""

    async def handle(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - answered and logged, as Starlette would
            if started:
                raise
            response = await _on_unexpected_error(Request(scope), exc)
            await response(scope, receive, send)


_REQUEST_ID_NAME = REQUEST_ID_HEADER.lower().encode()  # as ASGI gives header names


class RequestId(_HttpMiddleware):
    """ASGI middleware answering every request with an X-Request-Id header: the request's own
    (so that a client's or a proxy's logs match the server's), else a new one."""

    async def handle(self, scope, receive, send) -> None:
        given = dict(scope["headers"]).get(_REQUEST_ID_NAME)
        request_id = given.decode("latin-1") if given else uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != _REQUEST_ID_NAME]
                headers.append((_REQUEST_ID_NAME, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)

"""The per-device engine: add / abort / step over one model, one KV cache, one batch."""
from __future__ import annotations

import collections
import logging
import math
import time
import uuid
from dataclasses import dataclass

import torch

from kvcache.manager import KVCacheManager
from scheduler.batching import (BatchingConfig, ContinuousBatcher, ScheduledBatch,
                                check_priority_type)
from scheduler.prompts import job_prompt_ids, outside_vocab
from scheduler.request import FinishReason, Request
from scheduler.sampling_params import (InvalidRequestError, SamplingParams,
                                       params_for_sample)
from worker.backends import get_backend
from worker.host_memory import retain_freed_memory
from worker.kv_sizing import (KVCacheSize, check_backend_limits, host_kv_claim, run_profile_step,
                              size_kv_cache)
from worker.loader import load_config, load_model, resolve_model_path
from worker.models.fused_ops import PARALLEL_MIN_ROWS
from worker.output import EngineStats, RequestOutput
from worker.runner import ModelRunner, prepare_inputs
from worker.sampler import Sampler, SamplingRow, token_logprobs
from worker.streams import SampleStream
from worker.tokenizer import Tokenizer

log = logging.getLogger("pagedserve.engine")

RATE_WINDOW_S = 10.0  # stats' tokens/s counts the tokens generated this long ago at most
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto": the checkpoint's declared dtype (float32 where it declares none pagedserve runs in)
DTYPE_CHOICES = (*DTYPES, "auto")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # as vLLM and torch name them


@dataclass(slots=True)
class EngineConfig:
    """Everything one device's engine needs; cluster configs fill it."""

    model: str = "tiny"
    device: str = "cpu"
    device_index: int = 0
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_gib: float = 1.0  # cpu: the KV budget; npu/cuda size from free memory instead
    memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own limit
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    seed: int = 0  # for unseeded sampling

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be >= 1")
        if not 0 < self.kv_cache_gib < math.inf:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib}: must be a finite number > 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len}: must be >= 1 (or unset for "
                             "the model's own limit)")


def dtype_name(dtype: object) -> str:
    """One of DTYPE_CHOICES for a name, an alias ("half") or a torch.dtype; ValueError if none."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPE_CHOICES)}")
    return name


class Engine:
    """One device: continuous batching over a paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.device == "cpu":
            retain_freed_memory()
        path = resolve_model_path(config.model)
        self.backend = get_backend(config.device, config.device_index)
        model_config = load_config(path)
        self.dtype = (model_config.dtype or torch.float32) if config.dtype == "auto" \
            else DTYPES[config.dtype]
        check_backend_limits(self.backend, model_config, config.block_size, self.dtype)
        self.max_model_len = model_config.context_length(config.max_model_len)
        if model_config.window_note and config.max_model_len is None:
            log.warning("serving at most %d tokens per sequence%s", self.max_model_len,
                        model_config.window_note)
        batching = self._batching_config()  # its settings are checked before the slow load
        self.model, self.model_config = load_model(
            path, dtype=self.dtype, backend=self.backend)
        self.tokenizer = Tokenizer.from_dir(path)
        with host_kv_claim(config.device):
            num_blocks = self._num_kv_blocks()
            self.runner = ModelRunner(self.model, self.model_config, self.backend, num_blocks,
                                      config.block_size, self.dtype)
        self.kv = KVCacheManager(num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.batcher = ContinuousBatcher(batching, self.kv)
        if config.device == "cpu":  # npu/cuda ran a profiling forward while sizing the cache
            self._warm_up()
        self.sampler = Sampler(seed=config.seed)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(
            self.tokenizer.eos_token_ids)
        self._streams: dict[str, SampleStream] = {}  # by sample (request) id
        self._jobs: dict[str, list[SampleStream]] = {}  # by job id: its samples not yet done
        self._pending_forks: dict[str, list[Request]] = {}
        self._aborted: list[SampleStream] = []
        self._generated_window: collections.deque[tuple[float, float, int]] = collections.deque()
        self.prompt_tokens = 0
        self.generated_tokens = 0

    def _batching_config(self) -> BatchingConfig:
        c = self.config
        return BatchingConfig(
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=c.enable_chunked_prefill,
            enable_prefix_caching=c.enable_prefix_caching, policy=c.policy)

    def _warm_up(self) -> None:
        """A one-token and a parallel-sized forward on a scratch cache, so that the first
        request does not pay for loading the CPU kernels (numba's cached machine code and its
        registries: ~0.6 s in a new process, against ~10 ms for a short request after)."""
        for seq_len in (1, min(PARALLEL_MIN_ROWS, self.max_model_len)):
            run_profile_step(self.model, self.backend, [seq_len], self.config.block_size,
                             max_sampled=1)

    def _num_kv_blocks(self) -> int:
        """Blocks from kv_cache_gib on cpu, from device memory after a profiling forward on
        npu/cuda (worker/kv_sizing.py); the decision is kept in ``self.kv_size``."""
        self.kv_size: KVCacheSize = size_kv_cache(self.config, self.model, self.model_config,
                                                  self.backend, self.max_model_len)
        return self.kv_size.num_blocks

    # -- requests --------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0,
                    cache_salt: str | None = None, resumed_token_ids: list[int] | None = None,
                    queued_at: float = 0.0) -> str:
        """Queue a job; raises InvalidRequestError (nothing queued) for bad input.

        ``resumed_token_ids``: output a previous run already produced (failover); generation
        continues after them exactly as if it had never stopped, and they are not emitted again.
        ``queued_at``: when the job was first queued anywhere; among requests of one priority
        the earliest runs first (then the order of ``add_request`` calls), and is preempted last.
        """
        params = params.checked_copy() if params is not None else SamplingParams()
        check_priority_type(priority)  # the waiting queue would fail comparing it, mid-step
        prompt_ids = job_prompt_ids(prompt, params, self.tokenizer, self.model_config.vocab_size)
        resumed = list(resumed_token_ids or [])
        _check_daemon_args(resumed, cache_salt, queued_at, self.model_config.vocab_size)
        if resumed and params.n != 1:
            raise InvalidRequestError("resuming is per sample: n must be 1")
        if len(resumed) >= params.max_tokens:
            raise InvalidRequestError(f"{len(resumed)} resumed tokens leave nothing to generate "
                                      f"within max_tokens={params.max_tokens}")
        request_id = request_id or uuid.uuid4().hex
        sample_ids = [f"{request_id}/{i}" if params.n > 1 else request_id for i in range(params.n)]
        if request_id in self._jobs or any(s in self._streams for s in sample_ids):
            # until its last output is out (an aborted job's: at the next step), an id is taken
            raise InvalidRequestError(f"request id {request_id!r} is already in use (by a job "
                                      "or a sample of one that is not done)")
        per_sample = [params_for_sample(params, i) for i in range(params.n)]
        samples = [
            Request(sample_id, prompt_ids, sample, eos_token_ids=self.eos_token_ids,
                    priority=priority, seed=sample.seed, cache_salt=cache_salt,
                    token_ids=prompt_ids + resumed, queued_at=queued_at)
            for sample_id, sample in zip(sample_ids, per_sample)
        ]
        streams = [SampleStream(req, request_id, i, self.tokenizer) for i, req in enumerate(samples)]
        self.batcher.add(samples[0])  # last: whatever raised above left nothing queued
        self._streams.update((s.request.request_id, s) for s in streams)
        self._jobs[request_id] = streams
        if params.n > 1:
            self._pending_forks[samples[0].request_id] = samples[1:]
        return request_id

    def prompt_token_ids(self, request_id: str) -> list[int]:
        """The prompt a queued job runs on: its text encoded, cut as its params asked."""
        return list(self._jobs[request_id][0].request.prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        """Abort every sample of a job; its blocks are freed at once. False if unknown."""
        streams = self._jobs.get(request_id, [])
        for stream in streams:
            req = stream.request
            self._pending_forks.pop(req.request_id, None)
            if not req.is_finished:
                self.batcher.finish(req, FinishReason.ABORT)
                self._aborted.append(stream)
        return bool(streams)

    def has_unfinished(self) -> bool:
        return bool(self._streams)

    # -- one step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and return every sample's new output."""
        started = time.monotonic()
        outputs = self._collect_aborted()
        batch = self.batcher.schedule()
        if not batch.requests:
            return outputs
        inputs = prepare_inputs(batch, self.kv, self.runner.device)
        scorer = self._prompt_scorer(batch, inputs.prompt_rows) if inputs.prompt_rows else None
        logits = self.runner.execute(inputs, scorer)
        sampled_reqs = [batch.requests[i] for i in inputs.sampling_rows]
        sampled, forks = self._sample(logits, sampled_reqs)
        self._count_tokens(batch, len(sampled_reqs), len(forks), started)
        finished = self.batcher.update(batch, sampled)
        for parent, child in forks:
            self._start_fork(parent, child)
        touched = {r.request_id for r in sampled_reqs} | {r.request_id for r in finished}
        touched.update(child.request_id for _, child in forks)
        for rid in touched:
            out = self._emit(self._streams[rid])
            if out is not None:
                outputs.append(out)
        return outputs

    def _sample(self, logits: torch.Tensor, reqs: list[Request]):
        """Sample one token per request, plus the first token of each pending fork (n > 1),
        drawn from its parent's logits row."""
        rows = [_sampling_row(req) for req in reqs]
        sources = list(range(len(reqs)))
        forks: list[tuple[Request, Request]] = []
        for i, req in enumerate(reqs):
            for child in self._pending_forks.pop(req.request_id, ()):
                rows.append(_sampling_row(child))
                sources.append(i)
                forks.append((req, child))
        if forks:
            logits = logits.index_select(0, torch.tensor(sources, device=logits.device))
        result = self.sampler(logits, rows)
        everyone = reqs + [child for _, child in forks]
        for req, lp in zip(everyone, result.logprobs):
            if lp is not None:
                self._streams[req.request_id].logprobs.append(lp)
        for (_, child), token in zip(forks, result.token_ids[len(reqs):]):
            child.append_token(token)
        sampled = {req.request_id: t for req, t in zip(reqs, result.token_ids)}
        return sampled, forks

    def _prompt_scorer(self, batch: ScheduledBatch, prompt_rows):
        """The runner's callback for the logits of scored prompt positions (rows in
        ``prompt_rows`` order, a slice at a time): records each position's prompt logprob on
        its sample's stream. A position recorded before (a prompt recomputed after a
        preemption) is skipped."""
        owners = [(batch.requests[i], pos) for i, first, n in prompt_rows
                  for pos in range(first, first + n)]

        def score(start: int, logits: torch.Tensor) -> None:
            rows = owners[start:start + logits.shape[0]]
            new = [j for j, (req, pos) in enumerate(rows)
                   if pos >= len(self._streams[req.request_id].prompt_logprobs)]
            if not new:
                return
            found = token_logprobs(logits[new], [rows[j][0].prompt_token_ids[rows[j][1] + 1]
                                                 for j in new],
                                   [rows[j][0].params.prompt_logprobs for j in new])
            for j, lp in zip(new, found):  # each sample's positions ascend: appended in order
                self._streams[rows[j][0].request_id].prompt_logprobs.append(lp)

        return score

    def _start_fork(self, parent: Request, child: Request) -> None:
        """A sample of an n > 1 job joins its parent's blocks (or recomputes if it cannot)."""
        reason = child.check_token_stop(self.max_model_len)
        if reason is not None:
            self.batcher.finish(child, reason)
        else:
            self.runner.copy_blocks(self.batcher.fork(parent, child))

    def _count_tokens(self, batch: ScheduledBatch, num_sampled: int, num_forks: int,
                      started: float) -> None:
        """Prompt tokens: all computed but the decode rows' one token (the one sampled last
        step). A fork's first token was drawn from its parent's row: generated, not computed."""
        now = time.monotonic()
        self.generated_tokens += num_sampled + num_forks
        decoding = sum(1 for req in batch.requests
                       if req.num_computed_tokens >= req.num_prompt_tokens)
        self.prompt_tokens += batch.total_tokens - decoding
        self._generated_window.append((started, now, num_sampled + num_forks))
        self._forget_old_steps(now)

    def _forget_old_steps(self, now: float) -> None:
        while self._generated_window and now - self._generated_window[0][1] > RATE_WINDOW_S:
            self._generated_window.popleft()

    def _collect_aborted(self) -> list[RequestOutput]:
        aborted, self._aborted = self._aborted, []
        return [o for o in (self._emit(s) for s in aborted) if o is not None]

    def _emit(self, stream: SampleStream) -> RequestOutput | None:
        stream.absorb()
        req = stream.request
        if stream.stopped_by_text and not req.is_finished:
            self.batcher.finish(req, FinishReason.STOP)
        elif stream.stopped_by_text and req.finish_reason is FinishReason.LENGTH:
            req.finish_reason = FinishReason.STOP  # the stop text came with the last token
        out = stream.emit()
        if stream.done:
            del self._streams[stream.request.request_id]
            unfinished = self._jobs[stream.job_id]
            unfinished.remove(stream)
            if not unfinished:
                del self._jobs[stream.job_id]
        return out

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        kv = self.kv.stats()
        now = time.monotonic()
        # read-only, over a copy: a daemon's worker calls this from its event loop while its
        # engine thread steps (list() copies the deque under the GIL; popping here raced)
        recent = [s for s in list(self._generated_window) if now - s[1] <= RATE_WINDOW_S]
        window = sum(n for _, _, n in recent)  # an idle engine: 0 tokens/s, no fading average
        # from the start of the oldest step counted: its own run time too, or a step's tokens
        # read just after it ended would be a rate of thousands per millisecond
        span = (now - recent[0][0]) if recent else 0
        return EngineStats(
            num_running=len(self.batcher.running), num_waiting=self.batcher.num_waiting,
            kv_blocks_used=kv.used, kv_blocks_total=kv.num_blocks, kv_blocks_cached=kv.cached,
            prefix_hit_rate=kv.prefix_hit_rate, prefix_hit_tokens=kv.prefix_hit_tokens,
            prefix_query_tokens=kv.prefix_query_tokens,
            num_preemptions=self.batcher.num_preemptions, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            tokens_per_s=window / span if span > 0 else 0.0)


def _sampling_row(req: Request) -> SamplingRow:
    p = req.params
    needs_history = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
    return SamplingRow(
        params=p,
        prompt_token_ids=req.prompt_token_ids if needs_history else (),
        output_token_ids=req.output_token_ids if needs_history else (),
        seed=req.seed, position=req.num_tokens,
        banned=req.stop_ids() if req.num_output_tokens < p.min_tokens else ())


def _check_daemon_args(resumed: list, cache_salt: object, queued_at: object,
                       vocab_size: int) -> None:
    """The arguments the daemon's scheduler passes are checked too: a bad one would fail the
    step, and with it every request of the batch."""
    if bad := outside_vocab(resumed, vocab_size):
        raise InvalidRequestError(f"resumed_token_ids must be integers in [0, {vocab_size}); "
                                  f"got {bad[:5]}")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise InvalidRequestError(f"cache_salt={cache_salt!r}: must be a string")
    if isinstance(queued_at, bool) or not isinstance(queued_at, (int, float)) \
            or not math.isfinite(queued_at):
        raise InvalidRequestError(f"queued_at={queued_at!r}: must be a finite number")

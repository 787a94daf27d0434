"""What the engine hands back per step: incremental per-sample deltas, their msgpack wire form,
and engine statistics."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import msgpack


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's entry at one position, shaped as vLLM's ``Logprob``."""

    logprob: float
    rank: int | None = None  # 1 for the most likely token of the vocabulary
    decoded_token: str | None = None  # the token decoded alone, special tokens included


@dataclass(slots=True, eq=False)
class TokenLogprobs(Mapping):
    """The chosen token's logprob and the model's top alternatives, all from the raw logits.
    Also a mapping of token id to :class:`Logprob`, the chosen token first, as vLLM hands out
    each position's logprobs; it equals the dict of the same entries."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first, params.logprobs long
    rank: int | None = None  # the chosen token's rank in the vocabulary, 1 = most likely
    # the text of token_id, then of each top token, each decoded alone (None: not decoded)
    decoded: list[str] | None = None
    _mapping: dict[int, Logprob] | None = field(default=None, init=False, repr=False,
                                                compare=False)

    def _entries(self) -> dict[int, Logprob]:
        """Built on first use, once: Mapping reads every item through __getitem__."""
        if self._mapping is None:
            top = self.top or ()
            texts = self.decoded or [None] * (1 + len(top))
            ranked = {token_id: Logprob(logprob, rank, text) for rank, ((token_id, logprob), text)
                      in enumerate(zip(top, texts[1:]), start=1)}
            among_top = ranked.pop(self.token_id, None)
            rank = self.rank if self.rank is not None or among_top is None else among_top.rank
            self._mapping = {self.token_id: Logprob(self.logprob, rank, texts[0]), **ranked}
        return self._mapping

    def __getitem__(self, token_id: int) -> Logprob:
        return self._entries()[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenLogprobs):  # field by field: a dict does not say which was chosen
            return self._fields() == other._fields()
        return Mapping.__eq__(self, other)  # vLLM's form: a dict of token id -> Logprob

    __hash__ = None  # mutable, and equal to dicts

    def _fields(self) -> tuple:
        return self.token_id, self.logprob, self.top, self.rank, self.decoded


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one sample (``index`` among the job's n) since the last step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text: str
    num_prompt_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    emitted_at: float | None = None  # time.time() when the engine produced the newest token
    # of prompt tokens 1.. (token 0 has none), once, with the sample's first output
    prompt_logprobs: list[TokenLogprobs] | None = None
    stop_reason: int | str | None = None  # with a "stop" finish: the stop string or token id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def pack_outputs(outputs: list[RequestOutput]) -> bytes:
    """One step's outputs as msgpack: how a worker reports them to the scheduler. A report of 24
    outputs takes the engine thread ~0.8 ms this way, ~1.2 ms as pickled objects (Ray's own
    floor for a call is ~0.55 ms)."""
    return msgpack.packb([
        (o.request_id, o.index, o.new_token_ids, o.text, o.num_prompt_tokens, o.finish_reason,
         pack_logprobs(o.logprobs), o.emitted_at, pack_logprobs(o.prompt_logprobs),
         o.stop_reason)
        for o in outputs], use_bin_type=True)


def pack_logprobs(logprobs: list[TokenLogprobs] | None) -> list | None:
    return None if logprobs is None else [(lp.token_id, lp.logprob, lp.top, lp.rank, lp.decoded)
                                          for lp in logprobs]


def unpack_logprobs(packed: list | None) -> list[TokenLogprobs] | None:
    """The inverse of :func:`pack_logprobs`; journals written before ranks (or decoded texts)
    were kept have none."""
    return None if packed is None else [
        TokenLogprobs(token_id, logprob, [tuple(alt) for alt in top], *rank_and_decoded)
        for token_id, logprob, top, *rank_and_decoded in packed]


def unpack_outputs(blob: bytes) -> list[RequestOutput]:
    """The inverse of :func:`pack_outputs`."""
    return [RequestOutput(rid, index, ids, text, prompt_tokens, reason, unpack_logprobs(logprobs),
                          emitted_at, unpack_logprobs(prompt_logprobs), stop_reason)
            for rid, index, ids, text, prompt_tokens, reason, logprobs, emitted_at, prompt_logprobs,
            stop_reason in msgpack.unpackb(blob)]


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    prefix_hit_rate: float  # hit tokens / queried tokens, over the engine's life
    prefix_hit_tokens: int
    prefix_query_tokens: int
    num_preemptions: int
    prompt_tokens: int  # computed prompt tokens, excluding prefix-cache hits
    generated_tokens: int
    tokens_per_s: float  # generated tokens per second over the recent window


@dataclass(slots=True)
class CompletionOutput:
    """One sample's whole output so far."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        """Whether this sample has ended (a method, as vLLM's CompletionOutput has it)."""
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the sampled tokens' logprobs, when logprobs were asked for (as vLLM)."""
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


def with_unscored_first(scored: list[TokenLogprobs] | None) -> list[TokenLogprobs | None] | None:
    """The scores of prompt tokens 1.. as a job's ``prompt_logprobs``: None put first."""
    return None if scored is None else [None, *scored]


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """A job's timings in time.time() seconds, named as vLLM's RequestMetrics names them; None
    until it happens. Scheduling is not timed: there is no first_scheduled_time or
    time_in_queue."""

    arrival_time: float
    last_token_time: float | None
    first_token_time: float | None
    finished_time: float | None


@dataclass(slots=True)
class JobOutput:
    """A job's accumulated result: every sample, plus the timings a user reports on."""

    request_id: str
    outputs: list[CompletionOutput]
    arrival_time: float
    num_prompt_tokens: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    # if asked for: one entry per prompt token, None for the first (nothing scores it), as vLLM
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt: str | None = None  # the text given (None for token ids, or where not kept)
    prompt_token_ids: list[int] | None = None  # the tokens the job ran on
    last_token_time: float | None = None  # when the newest token arrived

    @classmethod
    def start(cls, request_id: str, n: int, now: float, prompt: str | list[int] | None = None,
              prompt_token_ids: list[int] | None = None) -> "JobOutput":
        return cls(request_id, [CompletionOutput(i) for i in range(n)], now,
                   num_prompt_tokens=len(prompt_token_ids or ()),
                   prompt=prompt if isinstance(prompt, str) else None,
                   prompt_token_ids=prompt_token_ids)

    def add(self, delta: RequestOutput, now: float) -> None:
        sample = self.outputs[delta.index]
        self.num_prompt_tokens = delta.num_prompt_tokens
        if delta.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
        sample.token_ids.extend(delta.new_token_ids)
        sample.text += delta.text
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = with_unscored_first(delta.prompt_logprobs)
        if delta.logprobs is not None:  # extended in place: a copy per delta is quadratic
            if sample.logprobs is None:
                sample.logprobs = []
            sample.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_reason
            if self.finished:
                self.finish_time = now

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def metrics(self) -> RequestMetrics:
        return RequestMetrics(self.arrival_time, self.last_token_time, self.first_token_time,
                              self.finish_time)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

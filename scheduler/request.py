"""Request: one sequence's state as the batching policy and the engine see it."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(slots=True, eq=False)
class Request:
    """A sequence being generated. ``token_ids`` is prompt + output; the first
    ``num_computed_tokens`` of them have KV in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    seed: int | None = None  # this sample's seed (derived from params.seed for n > 1)
    cache_salt: object = None  # extra prefix-cache key, e.g. a tenant
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    # when its job was first queued anywhere (the scheduler's time.time()); orders requests
    # before arrival_order, so a sample re-routed from a dead worker keeps its place
    queued_at: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    def output_slice(self, start: int, end: int | None = None) -> list[int]:
        """``output_token_ids[start:end]`` for ``0 <= start <= end``, without first copying the
        whole output (read at every step: a long output made each step cost its length)."""
        first = len(self.prompt_token_ids)
        return self.token_ids[first + start:None if end is None else first + end]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def stop_ids(self) -> tuple[int, ...]:
        """The token ids that end this request when sampled."""
        eos = () if self.params.ignore_eos else tuple(self.eos_token_ids)
        return eos + tuple(self.params.stop_token_ids)

    def check_token_stop(self, max_model_len: int) -> FinishReason | None:
        """Stop conditions that the last sampled token alone decides (stop strings are the
        engine's, since they need text)."""
        last = self.token_ids[-1]
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        if last in self.params.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

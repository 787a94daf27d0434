"""Continuous batching: which requests compute how many tokens in each step, and preemption."""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field

from kvcache.errors import RequestTooLargeError
from kvcache.manager import KVCacheManager
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.sampling_params import InvalidRequestError, is_int64

POLICIES = ("fcfs", "priority")


def check_priority_type(priority: object) -> None:
    """A priority must be a 64-bit integer: the waiting queue compares them, and the journal and
    the wire (msgpack) carry them."""
    if not is_int64(priority):
        raise InvalidRequestError(
            f"invalid priority={priority!r}: must be an integer in [-2**63, 2**63)")


def check_priority(priority: object, policy: str) -> None:
    """A new job's priority: a 64-bit integer, and other than 0 only under the priority policy
    (fcfs would ignore it silently)."""
    check_priority_type(priority)
    if priority != 0 and policy != "priority":
        raise InvalidRequestError(
            f"invalid priority={priority}: the scheduling policy is {policy}, which ignores "
            "priorities; use the priority policy (config engine.policy: priority, "
            "`generate --policy priority`, or LLM(..., scheduling_policy=\"priority\"))")


@dataclass(slots=True)
class BatchingConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # "priority": lower value first, FCFS among equals

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: must be one of {', '.join(POLICIES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # an unchunked sequence (a prompt, or one recomputed after preemption) longer than
            # the step budget could never be scheduled, and would block the queue behind it
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_model_len="
                f"{self.max_model_len} with chunked prefill off: raise max_num_batched_tokens, "
                "lower max_model_len, or turn chunked prefill on")


@dataclass(slots=True)
class ScheduledBatch:
    """A plain description of one step: the runner computes ``num_new_tokens[i]`` tokens of
    ``requests[i]`` starting at its ``num_computed_tokens``."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Does request i get a new token this step (its last uncomputed token is computed)?"""
        req = self.requests[i]
        return req.num_computed_tokens + self.num_new_tokens[i] == req.num_tokens

    def __len__(self) -> int:
        return len(self.requests)


class ContinuousBatcher:
    """Owns the waiting queue and the running batch of one device."""

    def __init__(self, config: BatchingConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[tuple[tuple, Request]] = []  # heap on _order_key
        self.running: list[Request] = []  # sorted by _order_key: victims come from the end
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- admission -------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request; rejects at once one that could never fit."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        if req.num_tokens > self.config.max_model_len:
            raise InvalidRequestError(
                f"prompt has {req.num_tokens} tokens; max_model_len is {self.config.max_model_len}"
            )
        longest = min(req.num_prompt_tokens + req.params.max_tokens, self.config.max_model_len)
        try:
            self.kv.check_fits(longest)
        except RequestTooLargeError as exc:  # the user's to fix, like any invalid request
            raise InvalidRequestError(str(exc)) from exc
        self.requests[req.request_id] = req
        self._push_waiting(req)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now and free its blocks; None if it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, FinishReason.ABORT)
        return req

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.free(req.request_id)
        # a waiting request is dropped lazily when it reaches the heap's top
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]]:
        """Start sample ``child`` (its first token already sampled) on ``parent``'s computed
        blocks; returns the KV block copies to make. If the batch is full or no block is free,
        the child is queued to recompute instead (the prefix cache still shares full blocks)."""
        self.requests[child.request_id] = child
        if (parent.status is RequestStatus.RUNNING
                and len(self.running) < self.config.max_num_seqs
                and self.kv.blocks_to_fork(parent.request_id) <= self.kv.num_free_blocks):
            pairs = self.kv.fork(parent.request_id, child.request_id)
            child.num_computed_tokens = child.num_tokens - 1
            child.status = RequestStatus.RUNNING
            bisect.insort(self.running, child, key=self._order_key)
            return pairs
        self._push_waiting(child)
        return []

    @property
    def num_waiting(self) -> int:
        return len(self.requests) - len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve_slots(req, req.num_computed_tokens + num_new, batch):
                break  # req itself was preempted: everything after it was too
            batch.requests.append(req)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget

    def _reserve_slots(self, req: Request, num_slots: int, batch: ScheduledBatch) -> bool:
        """Make room for req's slots, preempting the lowest-ranked running requests; False if
        req itself had to go."""
        while not self.kv.append_slots(req.request_id, num_slots):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.pop()
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(req)
        self._push_waiting(req)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0][1]
            if req.is_finished:  # aborted while waiting
                heapq.heappop(self.waiting)
                continue
            num_new = self._admit(req, budget)
            if num_new == 0:
                break
            heapq.heappop(self.waiting)
            bisect.insort(self.running, req, key=self._order_key)
            batch.requests.append(req)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _admit(self, req: Request, budget: int) -> int:
        """Allocate the whole prompt's blocks (reusing cached ones) if they fit with the
        watermark to spare; returns this step's token count, 0 if not admitted."""
        # prompt logprobs need the logits of every prompt position: no cached blocks then
        queried = self.config.enable_prefix_caching and req.params.prompt_logprobs is None
        prefix = self.kv.match_prefix(req.token_ids, req.cache_salt) if queried else []
        num_cached = len(prefix) * self.kv.block_size
        num_new = req.num_tokens - num_cached
        if num_new > budget and not self.config.enable_chunked_prefill:
            return 0
        if not self.kv.can_allocate(req.num_tokens, prefix):
            return 0
        self.kv.allocate(req.request_id, req.num_tokens, prefix)
        if queried and not req.num_preemptions:  # a recompute would count its own blocks
            self.kv.record_prefix_query(req.num_tokens, prefix)
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        return min(num_new, budget)

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Request]:
        """Advance the step's requests; append sampled tokens; return those that finished."""
        finished = []
        for req, num_new in zip(batch.requests, batch.num_new_tokens):
            if req.is_finished:  # aborted during the step
                continue
            req.num_computed_tokens += num_new
            token = sampled.get(req.request_id)
            if token is not None:
                req.append_token(token)
            if self.config.enable_prefix_caching:
                self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens,
                                     req.cache_salt)
            reason = req.check_token_stop(self.config.max_model_len) if token is not None else None
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    # -- ordering --------------------------------------------------------------------------

    def _order_key(self, req: Request) -> tuple[int, float, int]:
        priority = req.priority if self.config.policy == "priority" else 0
        return (priority, req.queued_at, req.arrival_order)

    def _push_waiting(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (self._order_key(req), req))

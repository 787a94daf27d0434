"""Cross-worker routing: which worker a new job goes to, given every worker's current load.

Two policies behind one ``Router`` protocol:

- ``least_loaded`` scores each worker by its outstanding work in tokens and its KV-cache use,
  and adds **prefix affinity**: a job whose prompt starts with the same full KV blocks as an
  earlier job goes to the worker that got that earlier job, where those blocks are likely still
  cached, unless that worker is clearly busier than the least-loaded one (the rule is on
  ``LeastLoadedRouter``).
- ``round_robin`` cycles through the workers in the order they are given.

The scheduler owns the loads: it counts each worker's outstanding tokens from the jobs it has
sent there (exact at every call, even in a burst of submits between worker reports) and takes
KV-cache use from the reports, so a router keeps no load state of its own.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class NoWorkerError(RuntimeError):
    """There is no live worker to route a job to."""

    def __init__(self) -> None:
        super().__init__("no live worker to route the job to; wait for the workers to start "
                         "(see `pagedserve status`) or add NPU resources to the cluster")


@dataclass(slots=True)
class WorkerLoad:
    """One worker as the router sees it, refreshed by the scheduler."""

    worker_id: str
    free_blocks: int
    total_blocks: int
    block_size: int
    # Tokens still to compute for the jobs routed here: unprefilled prompts + outputs to come.
    pending_tokens: int = 0

    @property
    def used_fraction(self) -> float:
        """Share of the KV cache in use; a worker with no cache yet counts as full."""
        if self.total_blocks <= 0:
            return 1.0
        return 1.0 - self.free_blocks / self.total_blocks


class Router(Protocol):
    def choose(self, prompt_token_ids: Sequence[int], loads: Sequence[WorkerLoad]) -> str:
        """The id of the worker that should run a job with this prompt; NoWorkerError if none."""
        ...

    def forget(self, worker_id: str) -> None:
        """Drop what is remembered about a worker that died."""
        ...


class LeastLoadedRouter:
    """Least-loaded routing with prefix affinity.

    A worker's score is ``pending_tokens + KV_WEIGHT * used_fraction``: tokens measure how long
    its queue takes to drain (a job count would weigh a 16-token prompt like a 4000-token one),
    and a full KV cache weighs like KV_WEIGHT more queued tokens, since it means preemptions
    ahead. The lowest score wins; ties go to the tied workers in turn, so that jobs arriving one
    at a time on an idle cluster still use every worker (and warm every worker's caches).

    Affinity: the router remembers, in an LRU map of at most ``capacity`` entries, which worker
    last received a prompt starting with a given run of full blocks (keys chain the blocks'
    tokens, like the KV prefix cache). Of each prompt it remembers a few such prefixes: its
    first 1..``max_prefix_blocks`` blocks (prompts behind one system prompt or set of examples),
    each power-of-two number of blocks, and all its full blocks up to ``max_match_blocks``
    (where the next turn of a conversation starts, however long the system prompt all
    conversations share). A new prompt looks its prefixes up, longest first: the first
    remembered worker whose score is at most ``best + max(AFFINITY_SLACK, AFFINITY_RATIO *
    best)`` gets the job; when none is within that limit the job goes to the least-loaded
    worker, and its prefixes are remembered there from then on.
    """

    KV_WEIGHT = 4096.0  # tokens
    AFFINITY_SLACK = 4096.0  # tokens
    AFFINITY_RATIO = 0.5

    def __init__(self, capacity: int = 10_000, max_prefix_blocks: int = 16,
                 max_match_blocks: int = 256) -> None:
        if capacity < 1 or max_prefix_blocks < 1 or max_match_blocks < max_prefix_blocks:
            raise ValueError("capacity and max_prefix_blocks must be >= 1, and "
                             "max_match_blocks >= max_prefix_blocks")
        self.capacity = capacity
        self.max_prefix_blocks = max_prefix_blocks
        self.max_match_blocks = max_match_blocks
        self._last_worker: OrderedDict[int, str] = OrderedDict()  # prefix key -> worker id
        self._ties_broken = 0

    def choose(self, prompt_token_ids: Sequence[int], loads: Sequence[WorkerLoad]) -> str:
        if not loads:
            raise NoWorkerError()
        scores = {load.worker_id: self.score(load) for load in loads}
        lowest = min(scores.values())
        tied = [load.worker_id for load in loads if scores[load.worker_id] == lowest]
        best = tied[self._ties_broken % len(tied)]
        self._ties_broken += len(tied) > 1
        keys = self._prefix_keys(prompt_token_ids, loads[0].block_size)
        chosen = self._affine_worker(keys, scores, scores[best]) or best
        self._remember(self._kept(keys), chosen)
        return chosen

    def forget(self, worker_id: str) -> None:
        stale = [key for key, worker in self._last_worker.items() if worker == worker_id]
        for key in stale:
            del self._last_worker[key]

    def score(self, load: WorkerLoad) -> float:
        return load.pending_tokens + self.KV_WEIGHT * load.used_fraction

    def _affine_worker(self, keys: list[int], scores: dict[str, float],
                       best_score: float) -> str | None:
        limit = best_score + max(self.AFFINITY_SLACK, self.AFFINITY_RATIO * best_score)
        for key in reversed(keys):  # the longest shared prefix first
            worker = self._last_worker.get(key)
            # A worker missing from the loads (dead, draining) or too busy is passed over.
            if worker in scores and scores[worker] <= limit:
                return worker
        return None

    def _kept(self, keys: list[int]) -> list[int]:
        """The keys of a prompt worth remembering (see the class docstring): a few per prompt,
        so that the map's capacity still covers many prompts."""
        last = len(keys) - 1
        return [key for i, key in enumerate(keys)
                if i < self.max_prefix_blocks or (i + 1) & i == 0 or i == last]

    def _remember(self, keys: list[int], worker_id: str) -> None:
        for key in keys:
            self._last_worker[key] = worker_id
            self._last_worker.move_to_end(key)
        while len(self._last_worker) > self.capacity:
            self._last_worker.popitem(last=False)

    def _prefix_keys(self, token_ids: Sequence[int], block_size: int) -> list[int]:
        """One chained key per leading full block, up to max_match_blocks.

        A collision only misplaces a job (a cache miss), never changes its output, so Python's
        tuple hash is strong enough here.
        """
        num_blocks = min(len(token_ids) // max(block_size, 1), self.max_match_blocks)
        keys: list[int] = []
        parent = 0
        for i in range(num_blocks):
            parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
            keys.append(parent)
        return keys


class RoundRobinRouter:
    """Each call takes the next worker of the given sequence, wrapping around."""

    def __init__(self) -> None:
        self._calls = 0

    def choose(self, prompt_token_ids: Sequence[int], loads: Sequence[WorkerLoad]) -> str:
        if not loads:
            raise NoWorkerError()
        chosen = loads[self._calls % len(loads)].worker_id
        self._calls += 1
        return chosen

    def forget(self, worker_id: str) -> None:
        """Nothing to drop: the cycle runs over whichever workers the next call is given."""


_ROUTERS: dict[str, type] = {"least_loaded": LeastLoadedRouter, "round_robin": RoundRobinRouter}
ROUTER_NAMES = tuple(_ROUTERS)


def make_router(name: str) -> Router:
    """A fresh router of the named policy; ValueError naming the allowed policies otherwise."""
    try:
        return _ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; allowed: {', '.join(ROUTER_NAMES)}") from None

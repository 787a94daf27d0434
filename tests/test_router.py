"""Cross-worker router: least-loaded scoring, prefix affinity and its limits, round robin."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.router import (LeastLoadedRouter, NoWorkerError, RoundRobinRouter, WorkerLoad,
                              make_router)

BLOCK = 4
OUTPUT_TOKENS = 16  # every routed job's max_tokens


def load(worker_id: str, pending: int = 0, free: int = 100, total: int = 100) -> WorkerLoad:
    return WorkerLoad(worker_id, free_blocks=free, total_blocks=total, block_size=BLOCK,
                      pending_tokens=pending)


def route(router, prompt, loads) -> str:
    """choose(), then add the job's tokens to the chosen worker's load, as the scheduler does."""
    chosen = router.choose(prompt, loads)
    next(w for w in loads if w.worker_id == chosen).pending_tokens += len(prompt) + OUTPUT_TOKENS
    return chosen


def prompt_of(*blocks: int, tail: int = 0) -> list[int]:
    """A prompt made of full blocks filled with the given values, plus ``tail`` extra tokens."""
    return [b for b in blocks for _ in range(BLOCK)] + [999] * tail


@pytest.mark.parametrize("seed", range(5))
def test_least_loaded_picks_the_worker_with_the_fewest_pending_tokens(seed):
    rng = random.Random(seed)
    loads = [load(f"w{i}", pending=rng.randrange(0, 20_000)) for i in range(6)]
    expected = min(loads, key=lambda w: w.pending_tokens).worker_id
    assert make_router("least_loaded").choose([1, 2, 3], loads) == expected


def test_least_loaded_picks_the_idle_worker():
    loads = [load("busy", pending=300), load("idle"), load("busier", pending=700)]
    assert LeastLoadedRouter().choose(prompt_of(1, 2), loads) == "idle"


def test_ties_go_to_the_tied_workers_in_turn():
    """Jobs that arrive one at a time on an idle cluster (each done before the next) use every
    worker, not just the first one listed; a less loaded worker still wins outright."""
    router = LeastLoadedRouter()
    idle = [load("a"), load("b"), load("c")]
    assert [router.choose([i], idle) for i in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert router.choose([9], [load("a", pending=5), load("b"), load("c", pending=5)]) == "b"


def test_a_nearly_full_kv_cache_counts_against_a_worker():
    loads = [load("full", free=2), load("roomy", free=90)]
    assert LeastLoadedRouter().choose([5, 6], loads) == "roomy"


def test_a_worker_with_no_cache_yet_counts_as_full():
    loads = [load("starting", free=0, total=0), load("ready", pending=100)]
    assert LeastLoadedRouter().choose([5], loads) == "ready"


def test_without_prefixes_jobs_spread_evenly_as_the_scheduler_adds_their_tokens():
    router = LeastLoadedRouter()
    loads = [load(f"w{i}") for i in range(3)]
    chosen = [route(router, prompt_of(i + 10), loads) for i in range(9)]
    assert sorted(chosen.count(w.worker_id) for w in loads) == [3, 3, 3]


def test_a_burst_of_uneven_prompts_is_balanced_by_tokens_not_by_job_count():
    """One 3000-token prompt outweighs twenty 100-token ones: they all go to the other worker
    (counting jobs would split them ten and ten)."""
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    long_job = route(router, [1000] * 3000, loads)
    short_jobs = [route(router, [2000 + i] * 100, loads) for i in range(20)]
    assert set(short_jobs) == {"a", "b"} - {long_job}
    route(router, [3000] * 1000, loads)  # now the short jobs' worker holds more: this one evens it
    assert abs(loads[0].pending_tokens - loads[1].pending_tokens) <= 1000


def test_jobs_sharing_a_prefix_go_to_the_same_worker():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b"), load("c")]
    first = route(router, prompt_of(1, 2, 3), loads)
    # Each of these shares the first one or two blocks; the other workers are less loaded.
    followers = [route(router, prompt_of(1, 2, 40 + i, tail=2), loads) for i in range(3)]
    assert followers == [first] * 3
    unrelated = route(router, prompt_of(7, 8), loads)
    assert unrelated != first


def test_affinity_yields_when_that_worker_is_clearly_more_loaded():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    first = route(router, prompt_of(1, 2), loads)
    other = next(w.worker_id for w in loads if w.worker_id != first)
    busy = next(w for w in loads if w.worker_id == first)
    busy.pending_tokens = int(router.AFFINITY_SLACK) + 1  # just past the allowed excess
    assert route(router, prompt_of(1, 2, 3), loads) == other
    # From then on the prefix is remembered on the worker that took it.
    busy.pending_tokens = 0
    assert route(router, prompt_of(1, 2, 4), loads) == other


def test_affinity_holds_within_the_allowed_excess():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    first = route(router, prompt_of(1, 2), loads)
    busy = next(w for w in loads if w.worker_id == first)
    busy.pending_tokens = int(router.AFFINITY_SLACK)  # exactly at the limit
    assert route(router, prompt_of(1, 2, 9), loads) == first


def test_the_longest_shared_prefix_decides():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    ab = route(router, prompt_of(1, 2), loads)
    owner = next(w for w in loads if w.worker_id == ab)
    owner.pending_tokens += 10 * int(router.AFFINITY_SLACK)  # force the next job elsewhere
    ac = route(router, prompt_of(1, 3), loads)
    assert ac != ab
    owner.pending_tokens -= 10 * int(router.AFFINITY_SLACK)
    assert route(router, prompt_of(1, 2, 5), loads) == ab
    assert route(router, prompt_of(1, 3, 5), loads) == ac


def test_a_conversation_goes_back_to_its_worker_past_a_long_shared_system_prompt():
    """Affinity looked at the first max_prefix_blocks blocks only: every conversation behind a
    longer system prompt matched the same keys, and its next turn went where the system prompt
    last went, not where its own history is cached."""
    router = LeastLoadedRouter(max_prefix_blocks=2)
    loads = [load("a"), load("b")]
    system = (1, 2, 3)
    first = route(router, prompt_of(*system, 10), loads)
    owner = next(w for w in loads if w.worker_id == first)
    owner.pending_tokens += 10 * int(router.AFFINITY_SLACK)  # the next conversation elsewhere
    second = route(router, prompt_of(*system, 20), loads)
    assert second != first
    owner.pending_tokens -= 10 * int(router.AFFINITY_SLACK)
    # each conversation's next turn: its history so far, then the new message
    assert route(router, prompt_of(*system, 10, 11, tail=2), loads) == first
    assert route(router, prompt_of(*system, 20, 21, tail=2), loads) == second


def test_forget_drops_affinity_to_a_dead_worker():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    first = route(router, prompt_of(1, 2), loads)
    other = next(w.worker_id for w in loads if w.worker_id != first)
    assert route(router, prompt_of(1, 2, 3), loads) == first  # affinity, though more loaded
    router.forget(first)
    # Still listed (e.g. respawned under the same id) but more loaded: no affinity is left.
    assert route(router, prompt_of(1, 2, 4), loads) == other


def test_a_worker_missing_from_the_loads_is_never_chosen():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    first = route(router, prompt_of(1, 2), loads)
    survivors = [w for w in loads if w.worker_id != first]
    assert route(router, prompt_of(1, 2, 3), survivors) == survivors[0].worker_id


def test_prompts_shorter_than_a_block_have_no_affinity():
    router = LeastLoadedRouter()
    loads = [load("a"), load("b")]
    short = [1] * (BLOCK - 1)
    first = route(router, short, loads)
    assert route(router, short, loads) != first


def test_affinity_memory_is_bounded_least_recently_used_first():
    router = LeastLoadedRouter(capacity=2, max_prefix_blocks=1)
    loads = [load("a"), load("b")]
    first = route(router, prompt_of(1), loads)
    assert route(router, prompt_of(1, 5), loads) == first  # remembered
    route(router, prompt_of(2), loads)
    route(router, prompt_of(3), loads)  # two newer prefixes push prefix 1 out
    owner = next(w for w in loads if w.worker_id == first)
    other = next(w for w in loads if w.worker_id != first)
    owner.pending_tokens, other.pending_tokens = 1, 0
    assert router.choose(prompt_of(1, 6), loads) == other.worker_id


def test_no_worker_is_a_clear_error():
    for name in ("least_loaded", "round_robin"):
        with pytest.raises(NoWorkerError, match="no live worker"):
            make_router(name).choose([1, 2, 3], [])


def test_round_robin_cycles_through_the_workers_in_order():
    router = make_router("round_robin")
    assert isinstance(router, RoundRobinRouter)
    loads = [load("a", pending=5000), load("b"), load("c")]
    ids = [w.worker_id for w in loads]
    assert [router.choose([1], loads) for _ in range(3 * len(ids))] == ids * 3


def test_round_robin_keeps_cycling_over_the_workers_left():
    router = make_router("round_robin")
    loads = [load("a"), load("b"), load("c")]
    router.choose([1], loads)
    router.forget("b")
    left = [w for w in loads if w.worker_id != "b"]
    chosen = [router.choose([1], left) for _ in range(4)]
    assert sorted(chosen) == ["a", "a", "c", "c"]


def test_make_router_rejects_an_unknown_name_listing_the_allowed():
    with pytest.raises(ValueError, match="least_loaded, round_robin"):
        make_router("random")


def test_the_router_imports_neither_torch_nor_ray():
    code = ("import sys, scheduler.router; "
            "assert not {'torch', 'ray'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

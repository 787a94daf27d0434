"""Continuous batching policy over a real KVCacheManager, driven without a model."""
import pytest

from kvcache.errors import RequestTooLargeError
from kvcache.manager import KVCacheManager
from scheduler.batching import BatchingConfig, ContinuousBatcher
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.sampling_params import InvalidRequestError, SamplingParams


def make(num_blocks=64, block_size=4, watermark=0.0, **cfg):
    kv = KVCacheManager(num_blocks, block_size, watermark=watermark)
    config = BatchingConfig(**{"max_model_len": 1024, **cfg})
    return ContinuousBatcher(config, kv), kv


def req(rid, prompt_len, max_tokens=4, priority=0, first=1):
    return Request(rid, list(range(first, first + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), priority=priority)


def step(b):
    """One step with a stand-in model that always samples token 9; returns the batch."""
    batch = b.schedule()
    sampled = {r.request_id: 9 for i, r in enumerate(batch.requests) if batch.samples(i)}
    b.update(batch, sampled)
    return batch


def first_preempted(b, limit=20) -> list[str]:
    """Steps until one preempts; the ids it preempted."""
    for _ in range(limit):
        batch = step(b)
        if batch.preempted:
            return [r.request_id for r in batch.preempted]
    pytest.fail("expected a preemption")


def run_all(b, limit=1000):
    for _ in range(limit):
        if not b.has_unfinished():
            return
        step(b)
    raise AssertionError("batcher did not drain")


def test_budget_is_shared_and_running_requests_go_first():
    b, _ = make(max_num_batched_tokens=32)
    for i in range(3):
        b.add(req(f"r{i}", 20, first=100 * i))
    first = b.schedule()
    assert [r.request_id for r in first.requests] == ["r0", "r1"]
    assert first.num_new_tokens == [20, 12]  # r1's prefill is chunked
    b.update(first, {"r0": 9})
    second = b.schedule()
    # running first: r0 decodes one token, r1 finishes its prefill, then r2 gets the rest
    assert [r.request_id for r in second.requests] == ["r0", "r1", "r2"]
    assert second.num_new_tokens == [1, 8, 20]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    b, _ = make(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    b.add(req("a", 20))
    b.add(req("b", 20))
    batch = b.schedule()
    assert [r.request_id for r in batch.requests] == ["a"]


def test_without_chunked_prefill_the_budget_must_hold_the_longest_sequence():
    # a longer sequence could never be scheduled whole: refused up front, not left waiting
    with pytest.raises(ValueError, match="max_num_batched_tokens=32 is below max_model_len=33"):
        BatchingConfig(max_num_batched_tokens=32, max_model_len=33, enable_chunked_prefill=False)
    BatchingConfig(max_num_batched_tokens=32, max_model_len=1024)  # chunked: any budget


def test_max_num_seqs_caps_the_running_batch():
    b, _ = make(max_num_seqs=2)
    for i in range(4):
        b.add(req(f"r{i}", 3))
    assert len(b.schedule().requests) == 2
    assert b.num_waiting == 2


def test_preemption_frees_the_newest_requests_blocks():
    b, kv = make(num_blocks=6, block_size=4)
    b.add(req("old", 8, max_tokens=12))
    b.add(req("new", 8, max_tokens=12, first=100))
    preempting = None
    for _ in range(20):
        batch = step(b)
        if batch.preempted:
            preempting = batch
            break
    assert preempting is not None
    assert [r.request_id for r in preempting.preempted] == ["new"]
    victim = preempting.preempted[0]
    assert victim.status is RequestStatus.WAITING and victim.num_computed_tokens == 0
    assert not kv.has_sequence("new")
    assert b.num_preemptions == 1
    # the survivor owns every used block, exactly as many as its tokens need
    old = b.requests["old"]
    assert kv.stats().used == len(kv.block_table("old")) == kv.blocks_needed(old.num_computed_tokens)
    run_all(b)
    assert victim.finish_reason is FinishReason.LENGTH and victim.num_output_tokens == 12
    assert victim.num_preemptions == 1
    assert kv.stats().used == 0
    # the recompute's lookup (which hit its own blocks) is not counted: 2 prompts, 0 hits
    assert (kv.stats().prefix_query_tokens, kv.stats().prefix_hit_tokens) == (16, 0)


def test_nothing_is_admitted_in_a_step_that_preempted():
    b, kv = make(num_blocks=4, block_size=4, policy="priority")
    b.add(req("old", 4, max_tokens=8))
    b.add(req("new", 4, max_tokens=8, priority=5, first=100))
    while b.requests["old"].num_computed_tokens < 8:
        step(b)
    assert kv.num_free_blocks == 0
    b.add(req("urgent", 2, max_tokens=1, priority=-1, first=200))  # would fit after preemption
    batch = b.schedule()
    assert [r.request_id for r in batch.preempted] == ["new"]
    assert [r.request_id for r in batch.requests] == ["old"]
    assert kv.num_free_blocks == 1
    b.update(batch, {"old": 9})
    assert [r.request_id for r in b.schedule().requests] == ["old", "urgent"]


def test_preempted_request_goes_back_to_the_front():
    """Ahead of a request that was already waiting when it was preempted."""
    b, _ = make(num_blocks=4, block_size=4, max_num_seqs=2)
    b.add(req("a", 4, max_tokens=8))
    b.add(req("b", 4, max_tokens=8))
    b.add(req("c", 2, max_tokens=1))  # waits: max_num_seqs=2
    assert first_preempted(b) == ["b"]
    assert [r.request_id for _, r in sorted(b.waiting, key=lambda entry: entry[0])] == ["b", "c"]


def test_priority_policy_admits_and_preempts_by_priority():
    b, _ = make(num_blocks=4, block_size=4, policy="priority")
    b.add(req("low", 4, max_tokens=8, priority=5))
    b.add(req("high", 4, max_tokens=8, priority=0))
    batch = b.schedule()
    assert batch.requests[0].request_id == "high"
    b.update(batch, {r.request_id: 9 for i, r in enumerate(batch.requests) if batch.samples(i)})
    assert first_preempted(b) == ["low"]


def test_fcfs_ignores_priority():
    b, _ = make(num_blocks=3, block_size=4)
    b.add(req("first", 4, priority=5))
    b.add(req("second", 4, priority=0))
    assert b.schedule().requests[0].request_id == "first"


def test_a_request_queued_earlier_elsewhere_keeps_its_place():
    """A sample re-routed from a dead worker arrives after this worker's own requests but was
    queued before them: it is admitted first and preempted last."""
    b, _ = make(num_blocks=6, block_size=4, max_num_seqs=1)
    for i, rid in enumerate(("later", "latest")):
        b.add(Request(rid, [i + 1] * 8, SamplingParams(max_tokens=12, ignore_eos=True),
                      queued_at=200.0 + i))
    rerouted = Request("rerouted", [7] * 8, SamplingParams(max_tokens=12, ignore_eos=True),
                       queued_at=100.0)
    b.add(rerouted)
    assert [r.request_id for r in b.schedule().requests] == ["rerouted"]
    b, _ = make(num_blocks=6, block_size=4)
    b.add(Request("later", [1] * 8, SamplingParams(max_tokens=12, ignore_eos=True),
                  queued_at=200.0))
    step(b)
    b.add(Request("rerouted", [7] * 8, SamplingParams(max_tokens=12, ignore_eos=True),
                  queued_at=100.0))
    assert first_preempted(b) == ["later"]


def test_abort_frees_blocks_at_once():
    b, kv = make()
    b.add(req("run", 10, max_tokens=50))
    b.add(req("wait", 10))
    step(b)
    used = kv.stats().used
    assert used > 0
    b.abort("run")
    assert kv.stats().used < used
    b.abort("wait")
    assert not b.has_unfinished()
    assert step(b).requests == []
    assert kv.stats().used == 0


def test_a_request_that_can_never_fit_is_rejected_at_once():
    b, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks .* only 4 KV blocks") as raised:
        b.add(req("big", 12, max_tokens=8))
    assert isinstance(raised.value.__cause__, RequestTooLargeError)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        make(max_model_len=8)[0].add(req("long", 9))


def test_prefix_hit_skips_cached_blocks_but_never_the_last_token():
    b, kv = make(block_size=4)
    b.add(req("a", 12, max_tokens=1))
    run_all(b)
    b.add(req("b", 12, max_tokens=1))  # same 12 tokens
    batch = b.schedule()
    # blocks 0 and 1 are hits; block 2 holds the last token, which is always computed
    assert batch.requests[0].num_computed_tokens == 8
    assert batch.num_new_tokens == [4]
    b.add(req("c", 12, max_tokens=1, first=2))  # different tokens: no hit
    assert b.schedule().requests[-1].num_computed_tokens == 0


def test_a_request_that_waits_for_blocks_counts_one_prefix_query():
    """It is looked up at every step it waits, but the hit rate counts its tokens once (it
    counted them at every step: the rate then depended on how long requests waited)."""
    b, kv = make(num_blocks=8, block_size=4)
    b.add(req("big", 24, max_tokens=8))  # 6 of the 8 blocks, 8 at its end
    step(b)
    b.add(req("waiter", 12, max_tokens=1, first=100))  # 3 blocks: waits for big to finish
    waited = 0
    while "waiter" not in [r.request_id for r in step(b).requests]:
        waited += 1
    run_all(b)
    assert waited >= 5
    assert kv.stats().prefix_query_tokens == 24 + 12


def test_watermark_holds_back_admission():
    b, kv = make(num_blocks=10, block_size=4, watermark=0.2)  # 2 blocks held back
    b.add(req("a", 16, max_tokens=1))  # 4 blocks
    b.add(req("b", 16, max_tokens=1))  # 4 more would leave 2: allowed
    b.add(req("c", 4, max_tokens=1))  # 1 more would leave 1 < 2: held back
    assert [r.request_id for r in b.schedule().requests] == ["a", "b"]

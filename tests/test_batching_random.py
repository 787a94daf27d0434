"""Random add / abort / step sequences through the batcher, the cache manager and the runner's
input packing, with a stand-in model that records what each KV slot holds: every step checks
the scheduling rules, that each sequence reads its own tokens' KV (prefix hits, forks, recompute
after preemption), that cached blocks hold what their key says, and that ref counts and the free
list agree; when all is done or aborted, every block is free."""
import random
from collections import Counter

import pytest
import torch

from kvcache.manager import KVCacheManager
from scheduler.batching import BatchingConfig, ContinuousBatcher
from scheduler.request import FinishReason, Request
from scheduler.sampling_params import InvalidRequestError, SamplingParams
from worker.runner import prepare_inputs

CPU = torch.device("cpu")


def _prefix_tags(tokens) -> list[int]:
    """One tag per position that stands for the KV of that position: it depends on every token
    up to it, as a model's does."""
    tags, tag = [], 17
    for token in tokens:
        tag = hash((tag, token))
        tags.append(tag)
    return tags


class Run:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bs = rng.choice([1, 2, 3, 4, 8])
        chunked = rng.random() < 0.8
        max_model_len = rng.randint(4, 60)
        budget = rng.choice([1, 2, 3, 5, 8, 16, 64])
        self.config = BatchingConfig(
            max_num_seqs=rng.choice([1, 2, 3, 8, 64]), max_model_len=max_model_len,
            max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
            enable_chunked_prefill=chunked, enable_prefix_caching=rng.random() < 0.75,
            policy=rng.choice(["fcfs", "priority"]))
        self.kv = KVCacheManager(rng.randint(3, 40), self.bs, watermark=rng.choice([0, 0.05, 0.2]),
                                 enable_prefix_caching=self.config.enable_prefix_caching)
        self.batcher = ContinuousBatcher(self.config, self.kv)
        self.slots: dict[int, tuple] = {}  # slot -> (cache salt, tag) of what was written there
        self.jobs: dict[str, list[Request]] = {}
        self.pending_forks: dict[str, list[Request]] = {}
        self.openings = [[rng.randint(0, 3) for _ in range(rng.randint(1, 20))] for _ in range(3)]
        self.vocab = rng.choice([2, 4, 50])  # token 0 is EOS

    def add(self, job_id: str) -> None:
        rng = self.rng
        if rng.random() < 0.6:  # shared openings, so that prefixes hit
            prompt = rng.choice(self.openings)[:rng.randint(1, 20)] + \
                [rng.randint(0, 3) for _ in range(rng.randint(0, 6))]
        else:
            prompt = [rng.randint(0, self.vocab) for _ in range(rng.randint(1, 30))]
        n = rng.choice([1, 1, 1, 2, 3])
        params = SamplingParams(max_tokens=rng.randint(1, 12), n=n, ignore_eos=rng.random() < 0.5,
                                prompt_logprobs=0 if rng.random() < 0.1 else None)
        resumed = [rng.randint(0, 3) for _ in range(rng.randint(0, params.max_tokens - 1))] \
            if n == 1 and rng.random() < 0.2 else []
        priority = rng.randint(-2, 2) if self.config.policy == "priority" else 0
        salt, queued_at = rng.choice([None, None, "a"]), rng.choice([0.0, rng.random()])
        samples = [Request(f"{job_id}/{i}", prompt, params, eos_token_ids=frozenset([0]),
                           token_ids=prompt + resumed, priority=priority, cache_salt=salt,
                           queued_at=queued_at) for i in range(n)]
        try:
            self.batcher.add(samples[0])
        except InvalidRequestError:
            return
        self.jobs[job_id] = samples
        if n > 1:
            self.pending_forks[samples[0].request_id] = samples[1:]

    def abort(self) -> None:
        """As Engine.abort: every sample of a job, whatever state it is in."""
        if self.jobs:
            for req in self.jobs.pop(self.rng.choice(sorted(self.jobs))):
                self.pending_forks.pop(req.request_id, None)
                if not req.is_finished:
                    self.batcher.finish(req, FinishReason.ABORT)

    def step(self) -> None:
        """As Engine.step: schedule, run, sample, update, then start forks; plus a stop string
        now and then."""
        running_before = list(self.batcher.running)
        batch = self.batcher.schedule()
        self.check_schedule(batch, running_before)
        if not batch.requests:
            return
        self.run_model(batch)
        sampled, forks = {}, []
        for i, req in enumerate(batch.requests):
            if batch.samples(i):
                tag = _prefix_tags(req.token_ids)[-1]
                sampled[req.request_id] = tag % self.vocab
                for k, child in enumerate(self.pending_forks.pop(req.request_id, ()), 1):
                    child.append_token(hash((tag, k)) % self.vocab)
                    forks.append((req, child))
        self.batcher.update(batch, sampled)
        for parent, child in forks:
            reason = child.check_token_stop(self.config.max_model_len)
            if reason is not None:
                self.batcher.finish(child, reason)
            else:
                self.copy_blocks(self.batcher.fork(parent, child))
        for req in batch.requests:
            if not req.is_finished and self.rng.random() < 0.05:
                self.batcher.finish(req, FinishReason.STOP)
        self.check_blocks()

    def run_model(self, batch) -> None:
        """Write each token's tag into its slot, then check that every position a sequence
        attends to holds its own tokens' tag."""
        inputs = prepare_inputs(batch, self.kv, CPU)
        slots = inputs.meta.slot_mapping.tolist()
        tables = inputs.meta.block_tables.tolist()
        starts = inputs.meta.query_start_loc
        for i, req in enumerate(batch.requests):
            tags = _prefix_tags(req.token_ids)
            for row in range(starts[i], starts[i + 1]):
                pos = req.num_computed_tokens + row - starts[i]
                self.slots[slots[row]] = (req.cache_salt, tags[pos])
        for i, req in enumerate(batch.requests):
            tags = _prefix_tags(req.token_ids)
            for pos in range(inputs.meta.seq_lens[i]):
                slot = tables[i][pos // self.bs] * self.bs + pos % self.bs
                assert self.slots.get(slot) == (req.cache_salt, tags[pos]), \
                    f"{req.request_id} reads another sequence's KV at position {pos}"

    def copy_blocks(self, pairs) -> None:
        for src, dst in pairs:
            for offset in range(self.bs):
                written = self.slots.get(src * self.bs + offset)
                if written is not None:
                    self.slots[dst * self.bs + offset] = written

    def check_schedule(self, batch, running_before) -> None:
        config, rank = self.config, self.batcher._order_key
        assert batch.total_tokens <= config.max_num_batched_tokens
        assert len(self.batcher.running) <= config.max_num_seqs
        assert all(n >= 1 for n in batch.num_new_tokens)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            assert req.num_computed_tokens + n <= req.num_tokens
            assert config.enable_chunked_prefill or req.num_computed_tokens + n == req.num_tokens
        survivors = [r for r in running_before if r not in batch.preempted]
        served = sum(1 for r in batch.requests if r in running_before)
        assert batch.requests[:served] == survivors[:served], "running requests go first, in rank"
        admitted = batch.requests[served:]
        if batch.preempted:
            assert not admitted, "admitted in a step that preempted"
            assert all(rank(v) > rank(r) for v in batch.preempted for r in survivors)
        if admitted:
            assert self.kv.num_free_blocks >= self.kv.watermark_blocks
            waiting = [rank(r) for _, r in self.batcher.waiting if not r.is_finished]
            assert max(map(rank, admitted)) <= min(waiting, default=(float("inf"),))

    def check_blocks(self) -> None:
        kv, pool = self.kv, self.kv.pool
        assert set(kv._seqs) == {r.request_id for r in self.batcher.running}
        holders = Counter(b for seq in kv._seqs.values() for b in seq.block_ids)
        assert all(block.ref_count == holders[block.block_id] for block in pool.blocks)
        free = [block.block_id for block in pool.free_queue]
        assert sorted(free) == [b.block_id for b in pool.blocks if b.ref_count == 0]
        for block in pool.blocks:
            key = block.cache_key
            if key is None:
                continue
            assert pool.cached[key] is block
            chain, tokens = [], []
            while key is not None:
                chain.append(key)
                key = key.parent
            for key in reversed(chain):
                tokens.extend(key.token_ids)
            tags = _prefix_tags(tokens)[-self.bs:]
            assert [self.slots.get(block.block_id * self.bs + o) for o in range(self.bs)] == \
                [(block.cache_key.extra, tag) for tag in tags], "a cached block's KV changed"


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_keep_batching_and_cache_invariants(seed):
    rng = random.Random(seed)
    run = Run(rng)
    for i in range(150):
        choice = rng.random()
        if choice < 0.3:
            run.add(f"j{i}")
        elif choice < 0.37:
            run.abort()
        else:
            run.step()
    for _ in range(2000):  # a request that cannot run would hang here
        if not run.batcher.has_unfinished():
            break
        run.step()
    assert not run.batcher.has_unfinished() and not run.batcher.running
    assert run.kv.num_free_blocks == run.kv.num_blocks
    assert all(block.ref_count == 0 for block in run.kv.pool.blocks)

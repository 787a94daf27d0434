"""Step inputs from a scheduled batch: a decode-only step (its own fast path) packs the same
tokens, positions, slots and block tables as the cache manager reports for each sequence."""
import pytest
import torch

from kvcache.manager import KVCacheManager
from scheduler.batching import BatchingConfig, ContinuousBatcher, ScheduledBatch
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from worker.runner import prepare_inputs

BLOCK_SIZE = 4
CPU = torch.device("cpu")


def _decoding_batcher(prompt_lens) -> tuple[ContinuousBatcher, KVCacheManager]:
    """Sequences past their prefill, so the next schedule() decodes one token of each."""
    kv = KVCacheManager(64, BLOCK_SIZE)
    batcher = ContinuousBatcher(BatchingConfig(max_num_seqs=8, max_model_len=64), kv)
    for i, n in enumerate(prompt_lens):
        batcher.add(Request(f"r{i}", list(range(10 * i + 1, 10 * i + 1 + n)),
                            SamplingParams(max_tokens=20, ignore_eos=True)))
    while any(r.num_output_tokens == 0 for r in batcher.requests.values()):
        batch = batcher.schedule()
        batcher.update(batch, {r.request_id: 7 for r in batch.requests})
    return batcher, kv


def test_decode_step_inputs_match_each_sequences_slots_and_table():
    batcher, kv = _decoding_batcher([3, 4, 9])  # the 4-token prompt decodes into a new block
    batch = batcher.schedule()
    assert batch.num_new_tokens == [1, 1, 1]
    inputs = prepare_inputs(batch, kv, CPU)
    positions = [r.num_computed_tokens for r in batch.requests]
    assert inputs.positions.tolist() == positions
    assert inputs.input_ids.tolist() == [r.token_ids[p] for r, p in zip(batch.requests, positions)]
    assert inputs.meta.slot_mapping.tolist() == [
        kv.slot_mapping(r.request_id, p, p + 1)[0] for r, p in zip(batch.requests, positions)]
    for row, r in zip(inputs.meta.block_tables.tolist(), batch.requests):
        table = kv.block_table(r.request_id)
        assert row[: len(table)] == table and not any(row[len(table):])
    assert inputs.meta.seq_lens == [p + 1 for p in positions]
    assert inputs.meta.query_start_loc == [0, 1, 2, 3]
    assert inputs.logits_indices == inputs.sampling_rows == [0, 1, 2]


def test_decode_without_an_allocated_slot_is_refused():
    batcher, kv = _decoding_batcher([4])
    req = next(iter(batcher.requests.values()))
    req.num_computed_tokens += BLOCK_SIZE  # past the table the scheduler grew
    with pytest.raises(ValueError, match="no slot"):
        prepare_inputs(ScheduledBatch([req], [1]), kv, CPU)

"""Model runner: turns a scheduled step into packed model inputs, runs the model, returns the
logits of the tokens that are sampled."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvcache.layout import kv_cache_shape
from kvcache.manager import KVCacheManager
from scheduler.batching import ScheduledBatch
from worker.attention import AttentionBackend, AttentionMetadata

PROMPT_LOGITS_ROWS = 256  # scored prompt positions whose logits are held at once


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_indices: list[int]  # rows whose logits are computed: prompt_rows' first, in order
    sampling_rows: list[int]  # which batch entries the rows after the prompt rows sample for
    # (batch entry, first position, count): prompt positions whose logits give prompt logprobs
    prompt_rows: list[tuple[int, int, int]] = field(default_factory=list)


def prepare_inputs(batch: ScheduledBatch, kv: KVCacheManager, device: torch.device) -> StepInputs:
    """Pack the step's tokens of every scheduled request, with their slots and block tables."""
    if all(n == 1 for n in batch.num_new_tokens) and not any(map(_scores_prompt, batch.requests)):
        return _decode_inputs(batch, kv, device)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    sampling_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int]] = []
    prompt_indices: list[int] = []
    for i, (req, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
        start, end = req.num_computed_tokens, req.num_computed_tokens + num_new
        input_ids.extend(req.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(kv.slot_mapping(req.request_id, start, end))
        seq_lens.append(end)
        query_start_loc.append(query_start_loc[-1] + num_new)
        if end == req.num_tokens:
            logits_indices.append(query_start_loc[-1] - 1)
            sampling_rows.append(i)
        if req.params.prompt_logprobs is not None:
            # position p's logits score prompt token p + 1
            last = min(end, req.num_prompt_tokens - 1)
            if last > start:
                prompt_rows.append((i, start, last - start))
                first_row = query_start_loc[-2]
                prompt_indices.extend(range(first_row, first_row + last - start))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
        block_tables=_block_tables(batch, kv, device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
    )
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=prompt_indices + logits_indices,
        sampling_rows=sampling_rows,
        prompt_rows=prompt_rows,
    )


def _scores_prompt(req) -> bool:
    """Whether req's next token is a prompt position whose logits give a prompt logprob."""
    return req.params.prompt_logprobs is not None and \
        req.num_computed_tokens < req.num_prompt_tokens - 1


def _decode_inputs(batch: ScheduledBatch, kv: KVCacheManager, device: torch.device) -> StepInputs:
    """prepare_inputs when every request decodes one token: list comprehensions instead of the
    general per-request loop (the steady state of a busy engine)."""
    requests, bs = batch.requests, kv.block_size
    positions = [req.num_computed_tokens for req in requests]
    tables = [kv.block_table(req.request_id) for req in requests]
    if any(pos >= len(table) * bs for pos, table in zip(positions, tables)):
        raise ValueError("a decoding sequence has no slot for its token; append_slots first")
    sampled = [i for i, (req, pos) in enumerate(zip(requests, positions))
               if pos + 1 == req.num_tokens]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([table[pos // bs] * bs + pos % bs
                                   for pos, table in zip(positions, tables)],
                                  dtype=torch.int32, device=device),
        block_tables=_block_tables(batch, kv, device),
        query_start_loc=list(range(len(requests) + 1)),
        seq_lens=[pos + 1 for pos in positions],
    )
    return StepInputs(
        input_ids=torch.tensor([req.token_ids[pos] for req, pos in zip(requests, positions)],
                               dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=sampled,
        sampling_rows=sampled,
    )


def _block_tables(batch: ScheduledBatch, kv: KVCacheManager, device: torch.device) -> torch.Tensor:
    """The scheduled requests' block tables, zero-padded to the longest."""
    tables = kv.padded_block_tables([req.request_id for req in batch.requests])
    return torch.from_numpy(tables).to(device)


class ModelRunner:
    """Owns the model, the per-layer KV caches and the attention backend of one device."""

    def __init__(self, model: torch.nn.Module, config, backend: AttentionBackend,
                 num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.model = model
        self.backend = backend
        self.device = backend.device
        shape = kv_cache_shape(num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device),
             torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(config.num_hidden_layers)
        ]

    @torch.inference_mode()
    def execute(self, inputs: StepInputs,
                score_prompt: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run one step; returns the float32 logits of the sampled rows ``[len(sampling_rows),
        vocab]``. The logits of scored prompt positions (``prompt_rows``) go to
        ``score_prompt(first row, logits)`` instead, PROMPT_LOGITS_ROWS rows at a time: all at
        once they could take GiBs (2048 rows x a 128K vocabulary x 4 bytes)."""
        meta = self.backend.prepare(inputs.meta)
        rows = None  # every token's logits, in order (a decode step): no gather
        num_tokens = inputs.input_ids.shape[0]
        if len(inputs.logits_indices) < num_tokens or inputs.prompt_rows:
            rows = torch.tensor(inputs.logits_indices, dtype=torch.long, device=self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta, rows)
        scored = len(inputs.logits_indices) - len(inputs.sampling_rows)
        for start in range(0, scored, PROMPT_LOGITS_ROWS):
            end = min(scored, start + PROMPT_LOGITS_ROWS)
            score_prompt(start, self.model.compute_logits(hidden[start:end]).float())
        if not inputs.sampling_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[scored:]).float()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks src -> dst in every layer (for forked samples)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
            value_cache.index_copy_(0, dst, value_cache.index_select(0, src))

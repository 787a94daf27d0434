"""The paged self-attention op: its parameters, per-step metadata, and the backend contract."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class SelfAttentionParams:
    """Per-layer constants, named after Ascend ATB SelfAttention's parameters."""

    head_num: int
    kv_head_num: int
    head_dim: int
    qk_scale: float

    def __post_init__(self) -> None:
        if self.head_num % self.kv_head_num:
            raise ValueError(
                f"head_num ({self.head_num}) must be a multiple of kv_head_num ({self.kv_head_num})"
            )


@dataclass(slots=True)
class AttentionMetadata:
    """One step's packed ("TND") batch description, shared by every layer.

    Sequence i owns query tokens ``query_start_loc[i]:query_start_loc[i+1]``; those are the last
    tokens of its ``seq_lens[i]`` KV tokens (cached prefix + this step), so query token j of
    sequence i sits at position ``seq_lens[i] - q_len_i + j`` and attends causally to positions
    ``<=`` its own.
    """

    slot_mapping: torch.Tensor  # int32 [T]: block_id * block_size + offset, -1 = do not write
    block_tables: torch.Tensor  # int32 [B, max_blocks], zero padded
    query_start_loc: list[int]  # [B + 1] cumulative query starts
    seq_lens: list[int]  # [B] total KV length per sequence (not cumulative)
    # Filled once per step by AttentionBackend.prepare() with whatever the backend precomputes.
    backend_state: object = field(default=None)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]


class AttentionBackend:
    """What every device backend implements; see worker/backends/.

    Caches are per layer, K and V each ``[num_blocks, block_size, kv_head_num, head_dim]``.
    """

    name: str = "abstract"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def check_config(
        self, block_size: int, head_num: int, kv_head_num: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        """Raise ValueError naming the first setting this backend cannot serve (called at
        engine start-up). The base accepts everything."""

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Called once per step before the layers run; may fill ``meta.backend_state``."""
        return meta

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        params: SelfAttentionParams,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        params: SelfAttentionParams,
    ) -> torch.Tensor:
        """Write this step's K/V into the caches, then attend. Returns ``[T, head_num, head_dim]``."""
        self.write_kv(key, value, key_cache, value_cache, meta.slot_mapping)
        return self.attend(query, key_cache, value_cache, meta, params)


def written_rows(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows to write or None for all, their slots in the mapping's dtype): resolves slot -1
    ("do not write") once, for backends whose writes take valid slots only.

    One small host read per call; a step with no -1 slot passes the mapping through untouched.
    """
    skip = slot_mapping < 0
    if not bool(skip.any()):
        return None, slot_mapping
    rows = torch.nonzero(~skip).flatten()
    return rows, slot_mapping.index_select(0, rows).contiguous()


def copy_into_slots(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, rows: torch.Tensor | None,
                    slots: torch.Tensor) -> None:
    """Copy key/value rows ``rows`` (None: all) into the flattened caches at int64 ``slots``."""
    for new, cache in ((key, key_cache), (value, value_cache)):
        if rows is not None:
            new = new.index_select(0, rows)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.to(cache.dtype))

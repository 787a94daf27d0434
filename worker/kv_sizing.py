"""How many KV blocks one engine gets: a GiB budget on cpu, device memory after a profiling forward on npu/cuda."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcache.layout import bytes_per_block, describe_cache, kv_cache_shape, num_blocks_for_budget
from worker.attention import AttentionBackend, AttentionMetadata
from worker.device import Device, host_memory_info, kv_budget_bytes

if TYPE_CHECKING:
    from worker.engine import EngineConfig
    from worker.models.config import ModelConfig

log = logging.getLogger("pagedserve.engine")


@dataclass(slots=True)
class KVCacheSize:
    """The sizing decision and the figures behind it."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int
    # Peak bytes of the profiling forward, without its temporary cache; None on cpu (no profiling).
    peak_bytes: int | None = None

    def describe(self) -> str:
        line = describe_cache(self.num_blocks, self.block_size, self.bytes_per_block)
        if self.peak_bytes is None:
            return f"{line}; budget kv_cache_gib={self.budget_bytes / 2**30:.2f}"
        return f"{line}; profiled peak {self.peak_bytes / 2**30:.2f} GiB"


def check_backend_limits(backend: AttentionBackend, model_config: ModelConfig, block_size: int,
                         dtype: torch.dtype) -> None:
    """The backend's start-up check for this model (ValueError naming the setting), run before
    any weight is loaded."""
    mc = model_config
    backend.check_config(block_size, mc.num_attention_heads, mc.num_key_value_heads,
                         mc.head_dim, dtype)


def size_kv_cache(config: EngineConfig, model: torch.nn.Module, model_config: ModelConfig,
                  backend: AttentionBackend, max_model_len: int) -> KVCacheSize:
    """cpu: ``kv_cache_gib``. npu/cuda: ``total * memory_utilization - peak`` where peak is
    measured over one forward at the largest step the batcher can schedule."""
    mc = model_config
    per_block = bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                mc.head_dim, model.dtype)
    if config.device == "cpu":
        budget, peak = int(config.kv_cache_gib * 2**30), None
        _check_host_memory(budget)
    else:
        device = Device.create(config.device, config.device_index)
        lens = profile_seq_lens(config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
        peak = profile_peak_bytes(device, model, backend, lens, config.block_size,
                                  max_sampled=min(config.max_num_seqs, sum(lens)))
        budget = kv_budget_bytes(device, config.memory_utilization, peak)
    size = KVCacheSize(num_blocks_for_budget(budget, per_block), config.block_size, per_block,
                       budget, peak)
    log.info("%s", size.describe())
    return size


# One lock per host, for every pagedserve engine whatever its user (hence /tmp, not TMPDIR).
HOST_KV_LOCK = "/tmp/pagedserve-kv-cache.lock"


@contextlib.contextmanager
def host_kv_claim(device: str) -> Iterator[None]:
    """On cpu, hold this host's KV lock from the memory check to the cache's allocation, so
    that engines starting together (the workers of one host) check one after another and each
    sees the memory the ones before it took; without it, each would see the whole host free."""
    fd = _open_lock(HOST_KV_LOCK) if device == "cpu" else None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another engine on this host to allocate its KV cache")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(path: str) -> int | None:
    """The lock file, created readable by every user (flock needs no write access; opening an
    existing file without O_CREAT works in a sticky /tmp whoever made it); None, with a
    warning, when it cannot be opened: the check then runs unserialised."""
    try:
        while True:
            try:
                return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
            except FileExistsError:  # another engine made it meanwhile
                continue
            os.fchmod(fd, 0o444)  # whatever the umask
            return fd
    except OSError as exc:
        log.warning("cannot open %s (%s); the KV memory check is not serialised", path, exc)
        return None


def _check_host_memory(budget: int) -> None:
    """A cpu KV budget must fit the memory the host has left after the weights: past it, the
    zero-filled cache would fail to allocate or push the host into swap or the OOM killer."""
    available, _ = host_memory_info()
    if budget > available:
        raise ValueError(f"kv_cache_gib={budget / 2**30:g} is more than the {available / 2**30:.1f} "
                         "GiB of memory this host has available: lower kv_cache_gib")


def profile_seq_lens(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """The largest step as prefills: ``max_num_batched_tokens`` tokens in as few sequences as
    ``max_model_len`` allows (capped at what ``max_num_seqs`` sequences can hold)."""
    tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    full, rest = divmod(tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def profile_peak_bytes(device: Device, model: torch.nn.Module, backend: AttentionBackend,
                       seq_lens: list[int], block_size: int, max_sampled: int) -> int:
    """Peak bytes allocated on ``device`` by one prefill forward of ``seq_lens`` plus logits for
    ``max_sampled`` rows, minus its temporary KV cache (the real cache replaces it)."""
    device.synchronize()
    device.empty_cache()
    device.reset_peak_memory_stats()
    temporary_cache_bytes = run_profile_step(model, backend, seq_lens, block_size, max_sampled)
    device.synchronize()
    peak = device.max_memory_allocated()
    device.empty_cache()
    return max(0, peak - temporary_cache_bytes)


@torch.inference_mode()
def run_profile_step(model: torch.nn.Module, backend: AttentionBackend, seq_lens: list[int],
                     block_size: int, max_sampled: int) -> int:
    """One forward of ``seq_lens`` as prefills over a temporary cache just big enough; returns
    that cache's size in bytes. Token ids are arbitrary: only shapes matter here."""
    c, dev = model.config, backend.device
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    shape = kv_cache_shape(sum(blocks_per_seq), block_size, c.num_key_value_heads, c.head_dim)
    caches = [(torch.zeros(shape, dtype=model.dtype, device=dev),
               torch.zeros(shape, dtype=model.dtype, device=dev))
              for _ in range(c.num_hidden_layers)]
    hidden = model(*_profile_inputs(seq_lens, c.vocab_size, dev),
                   caches, backend.prepare(_profile_meta(seq_lens, blocks_per_seq, block_size, dev)))
    model.compute_logits(hidden[-max_sampled:]).float()
    return sum(k.numel() * k.element_size() * 2 for k, _ in caches)


def _profile_inputs(seq_lens: list[int], vocab_size: int, device: torch.device):
    total = sum(seq_lens)
    ids = torch.arange(total, device=device) % vocab_size
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
    return ids, positions


def _profile_meta(seq_lens: list[int], blocks_per_seq: list[int], block_size: int,
                  device: torch.device) -> AttentionMetadata:
    """Sequence i owns a consecutive run of blocks; every token is written."""
    first_block = [sum(blocks_per_seq[:i]) for i in range(len(seq_lens))]
    slots = torch.cat([torch.arange(n) + b * block_size for n, b in zip(seq_lens, first_block)])
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for row, (b, count) in enumerate(zip(first_block, blocks_per_seq)):
        tables[row, :count] = torch.arange(b, b + count, dtype=torch.int32)
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(slot_mapping=slots.to(device=device, dtype=torch.int32),
                             block_tables=tables.to(device), query_start_loc=starts,
                             seq_lens=list(seq_lens))

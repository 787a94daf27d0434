"""Ascend NPU attention backend: torch_npu's paged K/V write (ATB) and fused infer-attention ops.

Written to the documented op contracts (torch_npu / op-plugin docs, see docs/ascend.md) and
checked only against the strict CPU fake in tests/fake_torch_npu: that proves how we call the
ops, not how the hardware runs them. No NPU was available when this was written.

This is the only module that imports torch_npu, and only when an npu device is asked for.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType

import torch

from worker.attention import (
    AttentionBackend,
    AttentionMetadata,
    SelfAttentionParams,
    written_rows,
)
from worker.device import DeviceUnavailableError

# Fused-op limits (npu_fused_infer_attention_score, paged KV, TND layout).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_SIZE_ALIGN = 128  # prefill/mixed steps need a multiple of 128 ...
BLOCK_SIZE_MAX = 512  # ... from 128 to 512
DEFAULT_BLOCK_SIZE = 128
# The TND layout takes only these head sizes (the op documentation says 128 or 192; CANN's
# error message for a paged TND call also names 64, the head size of the small Qwen2.5 models).
TND_HEAD_DIMS = (64, 128, 192)
MAX_HEADS = 256
MAX_TND_BATCH = 4096  # requests per call: the TND limit on actual_seq_lengths(_kv)
MAX_HEADS_PER_KV_HEAD = 64
# sparse_mode=3 ("rightDownCausal") takes this compressed mask: 1 above the diagonal = masked.
CAUSAL_MASK_SIZE = 2048
SPARSE_MODE_NO_MASK = 0
SPARSE_MODE_RIGHT_DOWN_CAUSAL = 3
# The paged TND attention call needs CANN 8.3 or newer (vLLM-Ascend takes another path below it).
MIN_CANN = (8, 3)

_CANN_LIBRARY_HINTS = ("libhccl", "libascend", "libacl", "libruntime", "libge", "libatb", ".so")
_CANN_ENV_SCRIPT = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
_NNAL_ENV_SCRIPT = "/usr/local/Ascend/nnal/atb/set_env.sh"


def import_torch_npu() -> ModuleType:
    """Import torch_npu, turning a missing package or missing CANN into a one-line instruction."""
    try:
        import torch_npu
    except (ImportError, OSError) as exc:
        raise DeviceUnavailableError(_import_failure_message(exc)) from exc
    return torch_npu


def _import_failure_message(exc: BaseException) -> str:
    wanted = torch.__version__.split("+")[0]
    if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_npu":
        return (
            f"torch_npu is not installed: pip install torch_npu=={wanted} "
            "(its version must equal torch's), with a matching CANN toolkit"
        )
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    if any(hint in first_line for hint in _CANN_LIBRARY_HINTS):
        return (
            f"torch_npu cannot load the CANN libraries ({first_line}): "
            f"run 'source {_CANN_ENV_SCRIPT}' in this shell first"
        )
    return (
        f"torch_npu failed to import ({first_line}): check that CANN is sourced "
        f"({_CANN_ENV_SCRIPT}) and that torch_npu=={wanted} matches torch"
    )


def npu_torch_device(torch_npu: ModuleType, index: int) -> torch.device:
    """``npu:<index>``; a simulator (the test fake) names the torch device its "npu" lives on."""
    simulated = getattr(torch_npu, "simulated_device", None)
    if simulated is not None:
        return torch.device(simulated)
    return torch.device("npu", index)


def check_npu_config(
    block_size: int, head_num: int, kv_head_num: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Raise ValueError naming the first setting the fused ops cannot serve."""
    if block_size % BLOCK_SIZE_ALIGN or not BLOCK_SIZE_ALIGN <= block_size <= BLOCK_SIZE_MAX:
        raise ValueError(
            f"block_size={block_size} is not served on npu: use a multiple of {BLOCK_SIZE_ALIGN} "
            f"from {BLOCK_SIZE_ALIGN} to {BLOCK_SIZE_MAX} (default {DEFAULT_BLOCK_SIZE})"
        )
    if head_dim not in TND_HEAD_DIMS:
        raise ValueError(
            f"head_dim={head_dim} is not served on npu: the fused attention op takes "
            f"{', '.join(map(str, TND_HEAD_DIMS))}"
        )
    if not 1 <= head_num <= MAX_HEADS:
        raise ValueError(f"head_num={head_num} is not served on npu: at most {MAX_HEADS} heads")
    if kv_head_num < 1 or head_num % kv_head_num:
        raise ValueError(f"kv_head_num={kv_head_num} must divide head_num={head_num}")
    if head_num // kv_head_num > MAX_HEADS_PER_KV_HEAD:
        raise ValueError(
            f"head_num/kv_head_num={head_num // kv_head_num} is not served on npu: "
            f"at most {MAX_HEADS_PER_KV_HEAD} query heads per kv head"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype} is not served on npu: use float16 or bfloat16")


@dataclass(slots=True)
class NpuStepState:
    """One step's metadata in the form the ops take, built once by ``prepare``."""

    cum_query_ends: list[int]  # actual_seq_lengths: cumulative query ends, last == num_tokens
    kv_lens: list[int]  # actual_seq_lengths_kv: total KV length per request, not cumulative
    num_tokens: int
    decode_only: bool
    # Rows of this step's key/value that have a slot, and those slots (int32, on the device);
    # rows is None when every token is written (no slot is -1).
    write_rows: torch.Tensor | None
    write_slots: torch.Tensor


class NpuBackend(AttentionBackend):
    """Paged self-attention on one NPU through torch_npu's fused ops (see the module docstring)."""

    name = "npu"

    def __init__(self, device_index: int = 0, torch_npu: ModuleType | None = None) -> None:
        npu = torch_npu if torch_npu is not None else import_torch_npu()
        _require_cann(getattr(torch.version, "cann", None))
        _require_visible_npu(npu, device_index)
        npu.npu.set_device(device_index)
        super().__init__(npu_torch_device(npu, device_index))
        self._npu = npu
        # The ATB op, as vLLM-Ascend writes K/V on A2/A3 cards (it needs NNAL's libatb.so); the
        # plain CANN op only where torch_npu has no ATB op: its cache_mode defaults to the NZ
        # layout, and the bindings of some releases cannot be told otherwise.
        self._scatter = (None if hasattr(npu, "_npu_reshape_and_cache")
                         else getattr(npu, "npu_scatter_pa_kv_cache", None))
        self._causal_mask = torch.triu(
            torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=self.device),
            diagonal=1,
        )
        self._checked_configs: set[tuple] = set()

    def check_config(
        self, block_size: int, head_num: int, kv_head_num: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        check_npu_config(block_size, head_num, kv_head_num, head_dim, dtype)

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        slot_mapping = meta.slot_mapping.to(device=self.device, dtype=torch.int32).contiguous()
        block_tables = meta.block_tables.to(device=self.device, dtype=torch.int32).contiguous()
        write_rows, write_slots = written_rows(slot_mapping)
        state = NpuStepState(
            cum_query_ends=[int(end) for end in meta.query_start_loc[1:]],
            kv_lens=[int(n) for n in meta.seq_lens],
            num_tokens=meta.num_tokens,
            decode_only=all(n == 1 for n in meta.query_lens),
            write_rows=write_rows,
            write_slots=write_slots,
        )
        return dataclasses.replace(
            meta, slot_mapping=slot_mapping, block_tables=block_tables, backend_state=state
        )

    def forward(self, query, key, value, key_cache, value_cache, meta, params):
        state = self._state(meta)
        self._check_once(key_cache, params, query.dtype)
        self._write(key, value, key_cache, value_cache, state.write_rows, state.write_slots)
        return self._attend(query, key_cache, value_cache, meta.block_tables, state, params)

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        slots = slot_mapping.to(device=self.device, dtype=torch.int32).contiguous()
        self._write(key, value, key_cache, value_cache, *written_rows(slots))

    def attend(self, query, key_cache, value_cache, meta, params) -> torch.Tensor:
        state = self._state(meta)
        self._check_once(key_cache, params, query.dtype)
        return self._attend(query, key_cache, value_cache, meta.block_tables, state, params)

    def _state(self, meta: AttentionMetadata) -> NpuStepState:
        if not isinstance(meta.backend_state, NpuStepState):
            raise ValueError("NpuBackend needs its prepare(meta) result; call prepare once per step")
        return meta.backend_state

    def _check_once(self, key_cache: torch.Tensor, params: SelfAttentionParams, dtype) -> None:
        config = (key_cache.shape[1], params.head_num, params.kv_head_num, params.head_dim, dtype)
        if config not in self._checked_configs:
            self.check_config(*config)
            self._checked_configs.add(config)

    def _write(self, key, value, key_cache, value_cache, write_rows, write_slots) -> None:
        if write_rows is not None:
            key, value = key.index_select(0, write_rows), value.index_select(0, write_rows)
        key, value = key.contiguous(), value.contiguous()
        if self._scatter is not None:
            self._scatter(key, value, key_cache, value_cache, write_slots, cache_mode="Norm")
            return
        try:
            self._npu._npu_reshape_and_cache(key, value, key_cache, value_cache, write_slots)
        except (OSError, RuntimeError) as exc:
            if "atb" not in str(exc).lower():
                raise
            raise DeviceUnavailableError(
                f"torch_npu's ATB ops cannot load ({str(exc).splitlines()[0]}): install NNAL "
                f"and run 'source {_NNAL_ENV_SCRIPT}' in this shell first") from exc

    def _attend(self, query, key_cache, value_cache, block_tables, state, params) -> torch.Tensor:
        packed = query[: state.num_tokens].contiguous()
        groups = request_groups(state.kv_lens, key_cache.shape[1], key_cache.shape[0])
        same_for_all = (key_cache, value_cache, params)
        if len(groups) == 1:
            out = self._fused_attention(packed, block_tables, state, *same_for_all)
        else:  # rare: one call per run of requests, outputs back in the packed order
            out = torch.cat([self._fused_attention(*_group_inputs(packed, block_tables, state, group),
                                                   *same_for_all) for group in groups])
        if query.shape[0] == state.num_tokens:
            return out
        padded = query.new_zeros(query.shape)  # rows past the packed tokens stay zero
        padded[: state.num_tokens] = out
        return padded

    def _fused_attention(self, packed, block_tables, state, key_cache, value_cache, params):
        num_blocks, block_size = key_cache.shape[:2]
        kv_hidden = params.kv_head_num * params.head_dim
        if state.decode_only:
            mask_args = {"sparse_mode": SPARSE_MODE_NO_MASK}
        else:
            mask_args = {"atten_mask": self._causal_mask, "sparse_mode": SPARSE_MODE_RIGHT_DOWN_CAUSAL}
        out, _ = self._npu.npu_fused_infer_attention_score(
            packed,
            key_cache.view(num_blocks, block_size, kv_hidden),
            value_cache.view(num_blocks, block_size, kv_hidden),
            block_table=block_tables,
            input_layout="TND",
            block_size=block_size,
            actual_seq_lengths=state.cum_query_ends,
            actual_seq_lengths_kv=state.kv_lens,
            num_heads=params.head_num,
            num_key_value_heads=params.kv_head_num,
            scale=float(params.qk_scale),
            **mask_args,
        )
        return out


def request_groups(kv_lens: list[int], block_size: int, num_blocks: int) -> list[range]:
    """Consecutive runs of requests whose blocks add up to at most ``num_blocks``: the fused op
    wants the cache to hold the sum of every request's blocks, which requests sharing blocks
    (``n > 1`` forks, prefix hits) can exceed in a nearly full pool; and at most
    MAX_TND_BATCH requests. Usually one run."""
    groups, start, used = [], 0, 0
    for i, kv_len in enumerate(kv_lens):
        blocks = -(-kv_len // block_size)
        if (used + blocks > num_blocks and i > start) or i - start == MAX_TND_BATCH:
            groups.append(range(start, i))
            start, used = i, 0
        used += blocks
    groups.append(range(start, len(kv_lens)))
    return groups


def _group_inputs(packed: torch.Tensor, block_tables: torch.Tensor, state: NpuStepState,
                  group: range) -> tuple[torch.Tensor, torch.Tensor, NpuStepState]:
    """The query tokens, block-table rows and lengths of one run of requests, as a whole step."""
    ends = [0] + state.cum_query_ends
    first, last = ends[group.start], ends[group.stop]
    sub_state = dataclasses.replace(
        state,
        cum_query_ends=[end - first for end in state.cum_query_ends[group.start:group.stop]],
        kv_lens=state.kv_lens[group.start:group.stop],
        num_tokens=last - first,
    )
    return packed[first:last], block_tables[group.start:group.stop].contiguous(), sub_state


def _require_cann(version: str | None) -> None:
    """Refuse a CANN release older than MIN_CANN; an unknown or unreadable version passes
    (the selftest is the check on a new host)."""
    numbers = [int(part) for part in (version or "").split(".")[:2] if part.isdigit()]
    if len(numbers) == 2 and tuple(numbers) < MIN_CANN:
        raise DeviceUnavailableError(
            f"CANN {version} is too old for the npu backend: its paged attention call "
            f"(npu_fused_infer_attention_score, TND layout) needs CANN {'.'.join(map(str, MIN_CANN))} "
            "or newer")


def _require_visible_npu(torch_npu: ModuleType, index: int) -> None:
    runtime = torch_npu.npu
    if not runtime.is_available() or index >= runtime.device_count():
        raise DeviceUnavailableError(
            f"npu:{index} is not visible (devices seen: {runtime.device_count()}): check "
            "'npu-smi info', the driver, and ASCEND_RT_VISIBLE_DEVICES"
        )

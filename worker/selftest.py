"""``pagedserve selftest``: a device's attention backend and the tiny model against the cpu reference.

Each check runs on the device and again in float32 on the CPU with the cpu backend, from the same
(dtype-rounded) inputs, and reports the largest error against a per-dtype tolerance.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from worker.attention import AttentionBackend, AttentionMetadata, SelfAttentionParams
from worker.backends import get_backend

# Attention outputs are O(1): absolute error. Logits: error relative to the largest |logit|.
ATTENTION_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
LOGITS_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEVICE_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "npu": (torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}
DEVICE_BLOCK_SIZES = {"cpu": (16, 128), "npu": (128, 256), "cuda": (16, 128)}
# (head_num, kv_head_num, head_dim): MHA, GQA 4:1, MQA.
HEAD_SHAPES = ((8, 8, 64), (8, 2, 128), (16, 1, 64))
BATCH_KINDS = ("prefill", "decode", "chunked", "mixed")


@dataclass(slots=True)
class SelftestResult:
    name: str
    dtype: str
    max_error: float
    tolerance: float
    passed: bool
    detail: str = ""


@dataclass(slots=True)
class PagedCase:
    """A random paged batch in float32 on the CPU: the step's q/k/v, caches holding the cached
    prefixes, and the metadata (int32 slots and block tables)."""

    query: torch.Tensor  # [T, head_num, head_dim]
    key: torch.Tensor  # [T, kv_head_num, head_dim]
    value: torch.Tensor
    key_cache: torch.Tensor  # [num_blocks, block_size, kv_head_num, head_dim]
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor  # int32 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    query_start_loc: list[int]
    seq_lens: list[int]
    params: SelfAttentionParams

    def meta(self, device: torch.device | str = "cpu") -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            query_start_loc=list(self.query_start_loc),
            seq_lens=list(self.seq_lens),
        )

    def rounded(self, dtype: torch.dtype) -> PagedCase:
        """The same case with every float tensor rounded through ``dtype`` (kept in float32)."""
        floats = ("query", "key", "value", "key_cache", "value_cache")
        changes = {name: getattr(self, name).to(dtype).float() for name in floats}
        return dataclasses.replace(self, **changes)


def batch_shape(kind: str, block_size: int, rng: random.Random) -> list[tuple[int, int]]:
    """(cached tokens, new tokens) per sequence for a batch kind, with a little seeded jitter."""
    bs = block_size

    def j() -> int:
        return rng.randint(0, 3)

    shapes = {
        "prefill": [(0, 1), (0, bs + 3 + j()), (0, 2 * bs - 1), (0, 5 + j())],
        "decode": [(bs - 1, 1), (1 + j(), 1), (2 * bs + 4 + j(), 1), (bs, 1)],
        "chunked": [(bs, bs // 2 + 3 + j()), (7 + j(), 20), (2 * bs + 1, bs)],
        "mixed": [(bs + 2 + j(), 1), (0, 40 + j()), (3 * bs - 5, 1), (bs // 2, bs + 1)],
    }
    if kind not in shapes:
        raise ValueError(f"unknown batch kind {kind!r}; choose one of {', '.join(shapes)}")
    return shapes[kind]


def random_paged_case(
    kind: str, block_size: int, head_num: int, kv_head_num: int, head_dim: int, seed: int = 0
) -> PagedCase:
    """A batch of ``kind`` (prefill / decode / chunked / mixed) over shuffled, scattered blocks."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = batch_shape(kind, block_size, rng)
    blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_per_seq]

    cache_shape = (num_blocks, block_size, kv_head_num, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen)
    value_cache = torch.randn(cache_shape, generator=gen)
    slots: list[int] = []
    for table, (cached, new) in zip(tables, seqs):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    total = sum(new for _, new in seqs)
    width = max(blocks_per_seq)
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for row, table in enumerate(tables):
        block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    return PagedCase(
        query=torch.randn(total, head_num, head_dim, generator=gen),
        key=torch.randn(total, kv_head_num, head_dim, generator=gen),
        value=torch.randn(total, kv_head_num, head_dim, generator=gen),
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=torch.tensor(slots, dtype=torch.int32),
        block_tables=block_tables,
        query_start_loc=starts,
        seq_lens=[cached + new for cached, new in seqs],
        params=SelfAttentionParams(head_num, kv_head_num, head_dim, qk_scale=head_dim**-0.5),
    )


def run_case(backend: AttentionBackend, case: PagedCase, dtype: torch.dtype):
    """Run ``case`` through ``backend`` at ``dtype``; returns (output, key_cache, value_cache) in
    float32 on the CPU."""
    device = backend.device
    q, k, v, key_cache, value_cache = (
        t.to(device=device, dtype=dtype)
        for t in (case.query, case.key, case.value, case.key_cache, case.value_cache)
    )
    meta = backend.prepare(case.meta(device))
    out = backend.forward(q, k, v, key_cache, value_cache, meta, case.params)
    return out.float().cpu(), key_cache.float().cpu(), value_cache.float().cpu()


def check_attention(backend: AttentionBackend, reference: AttentionBackend, case: PagedCase,
                    dtype: torch.dtype, name: str) -> SelftestResult:
    rounded = case.rounded(dtype)
    out, key_cache, value_cache = run_case(backend, rounded, dtype)
    want, want_k, want_v = run_case(reference, rounded, torch.float32)
    error = (out - want).abs().max().item()
    tolerance = ATTENTION_TOLERANCE[dtype]
    caches_ok = torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)
    detail = "" if caches_ok else "KV cache write differs from the reference"
    return SelftestResult(name, _dtype_name(dtype), error, tolerance, caches_ok and error <= tolerance, detail)


def attention_checks(device: str, seed: int = 0) -> list[SelftestResult]:
    backend, reference = get_backend(device), get_backend("cpu")
    results = []
    for dtype in DEVICE_DTYPES[device]:
        for block_size in DEVICE_BLOCK_SIZES[device]:
            for kind in BATCH_KINDS:
                for heads, kv_heads, head_dim in HEAD_SHAPES:
                    case = random_paged_case(kind, block_size, heads, kv_heads, head_dim, seed)
                    name = f"attention {kind} block={block_size} heads={heads}/{kv_heads} d={head_dim}"
                    results.append(check_attention(backend, reference, case, dtype, name))
                    seed += 1
    return results


def run_selftest(device: str, seed: int = 0) -> list[SelftestResult]:
    """Every check for ``device`` ("cpu", "npu" or "cuda"): attention cases, then the tiny model."""
    if device not in DEVICE_DTYPES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_DTYPES)}")
    return attention_checks(device, seed) + model_checks(device, DEVICE_DTYPES[device], seed)


def model_checks(device: str, dtypes: tuple[torch.dtype, ...], seed: int = 0) -> list[SelftestResult]:
    """The tiny model at each dtype on ``device`` against itself in float32 on the cpu backend."""
    from worker.loader import load_model

    reference, _ = load_model("tiny", dtype=torch.float32, backend=get_backend("cpu"))
    backend = get_backend(device)
    block_size = DEVICE_BLOCK_SIZES[device][0]
    results = []
    for dtype in dtypes:
        model, _ = load_model("tiny", dtype=dtype, backend=backend)
        results.append(compare_models(model, reference, block_size, seed))
    return results


# New tokens per sequence per step: a prefill beside a first chunk, a decode beside the second
# chunk (mixed), then decodes. Sequence lengths: the prompts, plus one token per later step.
MODEL_PROMPT_LENS = (37, 150)
MODEL_STEP_PLAN = ((37, 100), (1, 50), (1, 1), (1, 1), (1, 1))


def compare_models(model, reference, block_size: int, seed: int = 0) -> SelftestResult:
    """Run both models over MODEL_STEP_PLAN, feeding both the reference's greedy tokens; compare
    the logits of every sampled position."""
    rng = random.Random(seed)
    tokens = [[rng.randrange(0x20, 0x7F) for _ in range(n)] for n in MODEL_PROMPT_LENS]
    max_len = max(MODEL_PROMPT_LENS) + len(MODEL_STEP_PLAN)
    runs = [_ModelRun(m, block_size, len(tokens), max_len) for m in (model, reference)]
    computed = [0] * len(tokens)
    worst, agree, sampled = 0.0, 0, 0
    for step in MODEL_STEP_PLAN:
        spans = [(computed[i], computed[i] + new) for i, new in enumerate(step)]
        got, want = (run.step(tokens, spans) for run in runs)
        assert want.numel(), "every planned step samples at least one sequence"
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        sampled += want.shape[0]
        finished = [i for i, (_, end) in enumerate(spans) if end == len(tokens[i])]
        for i, token in zip(finished, want.argmax(-1).tolist()):
            tokens[i].append(token)
        computed = [end for _, end in spans]
    dtype = model.dtype
    passed = worst <= LOGITS_TOLERANCE[dtype]
    name = "tiny model prefill, chunked, mixed, decode (logits, relative)"
    return SelftestResult(name, _dtype_name(dtype), worst, LOGITS_TOLERANCE[dtype], passed,
                          f"top-1 agrees {agree}/{sampled}")


class _ModelRun:
    """One model with its own paged caches; sequence i owns a fixed run of blocks."""

    def __init__(self, model, block_size: int, num_seqs: int, max_len: int) -> None:
        self.model, self.block_size = model, block_size
        device, c = model.backend.device, model.config
        per_seq = -(-max_len // block_size)
        shape = (per_seq * num_seqs, block_size, c.num_key_value_heads, c.head_dim)
        self.caches = [
            (torch.zeros(shape, dtype=model.dtype, device=device),
             torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(c.num_hidden_layers)
        ]
        self.tables = torch.arange(per_seq * num_seqs, dtype=torch.int32).view(num_seqs, per_seq)

    @torch.inference_mode()
    def step(self, tokens: list[list[int]], spans: list[tuple[int, int]]) -> torch.Tensor:
        """Float32 CPU logits of each sequence whose span reaches its last token."""
        device, bs = self.model.backend.device, self.block_size
        ids, positions, slots, starts, rows = [], [], [], [0], []
        for i, (start, end) in enumerate(spans):
            ids += tokens[i][start:end]
            positions += range(start, end)
            slots += [int(self.tables[i, p // bs]) * bs + p % bs for p in range(start, end)]
            starts.append(starts[-1] + end - start)
            if end == len(tokens[i]):
                rows.append(starts[-1] - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
            block_tables=self.tables.to(device),
            query_start_loc=starts,
            seq_lens=[end for _, end in spans],
        )
        meta = self.model.backend.prepare(meta)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        hidden = self.model(longs(ids), longs(positions), self.caches, meta)
        return self.model.compute_logits(hidden[longs(rows)]).float().cpu()


def format_table(results: list[SelftestResult]) -> str:
    header = ("check", "dtype", "max error", "tolerance", "result")
    rows = [
        (r.name, r.dtype, f"{r.max_error:.2e}", f"{r.tolerance:.0e}",
         ("ok" if r.passed else "FAIL") + (f" ({r.detail})" if r.detail else ""))
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    failed = sum(not r.passed for r in results)
    return "\n".join([*text, f"{len(results) - failed}/{len(results)} checks passed"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

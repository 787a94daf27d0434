"""Shared benchmark helpers: progress on stderr, timing, summary statistics, seeded token
workloads, and a random Hugging Face Llama checkpoint written to disk."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.bench import percentile
from worker.models.gemm_choice import PACKERS, PackedProjection


def progress(message: str) -> None:
    """Progress goes to stderr so that stdout stays one JSON document."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit_json(document: dict) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start


def stream_relay_latency(client, job_id: str, relay: list[float]) -> None:
    """Stream a daemon job; each chunk's relay latency = arrival here - when the engine
    emitted it."""
    for delta in client.stream(job_id):
        if delta.emitted_at is not None and delta.new_token_ids:
            relay.append(time.time() - delta.emitted_at)


def summary_ms(seconds: list[float]) -> dict:
    """Mean / p50 / p99 / max of a list of durations, in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {"mean_ms": round(statistics.fmean(ms), 4), "p50_ms": round(percentile(ms, 50), 4),
            "p99_ms": round(percentile(ms, 99), 4), "max_ms": round(max(ms), 4), "count": len(ms)}


THREADING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "processor": platform.processor() or platform.machine(),
        "threading_env": {name: os.environ.get(name) for name in THREADING_ENV},
        "git": git_revision(),
    }


def git_revision() -> str | None:
    """HEAD of the checkout the benchmark ran from, with '+dirty' when tracked files differ."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def numba_threading_layer() -> str | None:
    """The layer numba's parallel kernels ran on, or None if none has run in this process."""
    try:
        import numba

        return numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel kernel has run yet
        return None


def random_token_ids(generator: torch.Generator, length: int, vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def uniform_ints(generator: torch.Generator, count: int, low: int, high: int) -> list[int]:
    """``count`` integers uniform in the closed range [low, high]."""
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


@dataclass(slots=True, frozen=True)
class LlamaShape:
    """The architecture of a random Llama benchmark model."""

    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 1376
    vocab_size: int = 2048
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def build_random_llama(shape: LlamaShape, directory: Path, tokenizer_dir: Path, seed: int = 0):
    """Save a random float32 transformers Llama of ``shape`` to ``directory`` together with the
    tokenizer files of ``tokenizer_dir``; returns the in-memory model (eval mode, same weights)."""
    import transformers  # only benchmarks that compare against HF need it

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return model


@dataclass(slots=True, frozen=True)
class StepShape:
    """One executed engine step: packed tokens through the decoder, rows through the lm_head."""

    num_tokens: int
    num_sampled: int
    kv_positions: int = 0  # K/V positions its attention reads: the sum of its sequence lengths


def step_kv_read_bytes(shape: LlamaShape, step: StepShape, dtype_bytes: int = 4) -> int:
    """Bytes of cached K and V one step's attention reads, every layer, each position once."""
    return 2 * step.kv_positions * shape.kv_size * shape.num_hidden_layers * dtype_bytes


def stream_read_gb_per_s(megabytes: int = 512, repeats: int = 5) -> float:
    """The host's streaming read rate from DRAM at torch's thread count: the best of a few
    sums over a buffer far larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        with stopwatch() as elapsed:
            buffer.sum()
        best = min(best, elapsed[0])
    return buffer.numel() * 4 / best / 1e9


def step_matmul_flops(shape: LlamaShape, step: StepShape) -> int:
    """Multiply-add FLOPs (2 per MAC) of one step's linear layers."""
    h, inter = shape.hidden_size, shape.intermediate_size
    qkv = h * (shape.q_size + 2 * shape.kv_size)
    after_attention = shape.q_size * h + 3 * h * inter  # o, gate/up, down
    decoder = step.num_tokens * (qkv + after_attention) * (shape.num_hidden_layers - 1)
    last_layer = step.num_tokens * qkv + step.num_sampled * after_attention
    head = step.num_sampled * h * shape.vocab_size
    return 2 * (decoder + last_layer + head)


def _packed_matmul(x: torch.Tensor, weight: PackedProjection) -> torch.Tensor:
    return weight.matmul(x)


class MatmulReplay:
    """Times just the linear layers of a Llama at the given step shapes: per layer the fused
    q/k/v, o, fused gate/up and down projections (the engine's fused layout), then the lm_head
    on the sampled rows, on random float32 tensors. As in the engine, the last layer runs o,
    gate/up and down on the sampled rows only. Every layer has its own weights, so weight
    traffic matches the real model. Each step is timed with ``F.linear`` on ``[out, in]``
    weights, as ``x @ w`` on ``[in, out]`` weights, and through MKL's and oneDNN's packed
    weights (the engine's paths, where this torch has them), and the fastest counts: the bound
    holds whichever of them an engine picks."""

    def __init__(self, shape: LlamaShape, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        h, inter, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_size, shape.kv_size

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, generator=g) * cols**-0.5

        self.shape = shape
        self.layers = [(weight(q + 2 * kv, h), weight(h, q), weight(2 * inter, h), weight(h, inter))
                       for _ in range(shape.num_hidden_layers)]
        self.layers_in_out = [tuple(w.t().contiguous() for w in layer) for layer in self.layers]
        self.lm_head = weight(shape.vocab_size, h)
        self.lm_head_in_out = self.lm_head.t().contiguous()
        self.packed = []  # per packer this torch has: the layers' and the lm_head's copies
        for pack in PACKERS.values():
            packed_head = pack(self.lm_head.t())  # as the engine packs it
            if packed_head is not None:
                self.packed.append(([tuple(map(pack, layer)) for layer in self.layers_in_out], packed_head))
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _activations(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rows not in self._inputs:
            s = self.shape
            self._inputs[rows] = (torch.randn(rows, s.hidden_size), torch.randn(rows, s.q_size),
                                  torch.randn(rows, s.intermediate_size))
        return self._inputs[rows]

    @torch.inference_mode()
    def step_seconds(self, step: StepShape) -> float:
        """The fastest of the weight layouts for this step's matmuls."""
        hidden, attn_out, mlp_mid = self._activations(step.num_tokens)
        sampled_rows = [x[: step.num_sampled] for x in self._activations(max(step.num_sampled, 1))]
        sampled = sampled_rows[0]
        variants = [(self.layers, self.lm_head, torch.nn.functional.linear),
                    (self.layers_in_out, self.lm_head_in_out, torch.mm)]
        variants += [(*packed, _packed_matmul) for packed in self.packed]
        times = []
        for layers, lm_head, multiply in variants:
            start = time.perf_counter()
            for i, (qkv, o, gate_up, down) in enumerate(layers):
                multiply(hidden, qkv)
                last = i == len(layers) - 1
                h, attended, mid = sampled_rows if last else (hidden, attn_out, mlp_mid)
                multiply(attended, o)
                multiply(h, gate_up)
                multiply(mid, down)
            if step.num_sampled:
                multiply(sampled, lm_head)
            times.append(time.perf_counter() - start)
        return min(times)

    def replay_seconds(self, steps: list[StepShape]) -> list[float]:
        """Matmul seconds of each step, in order."""
        return [self.step_seconds(step) for step in steps]

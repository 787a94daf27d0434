"""Command-line flags shared by every verb that starts an engine, and their mapping to EngineConfig."""
from __future__ import annotations

import argparse


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="tiny",
                   help="a Hugging Face checkpoint directory or repo id, or 'tiny' (built in; "
                        "default)")
    g.add_argument("--device", default="cpu", choices=["cpu", "npu", "cuda"],
                   help="default: cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="auto: the checkpoint's declared dtype (default: float32)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache budget on cpu (default: 1.0)")
    g.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of the device's memory for weights, activations and the KV cache "
                        "on npu/cuda (default: 0.9)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step: prefill chunks + decodes (default: 2048)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute prompts that share a cached prefix")
    g.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"],
                   help="order of waiting jobs: first come first served (default), or by the "
                        "JSONL lines' \"priority\", lowest first")


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from parsed flags."""
    return dict(
        device=args.device, dtype=args.dtype, block_size=args.block_size,
        kv_cache_gib=args.kv_cache_gib, memory_utilization=args.memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, policy=args.policy)

"""The whole engine on the npu backend, run on the strict fake torch_npu (tests/fake_torch_npu):
KV sizing from device memory, start-up limits, prefill, chunked prefill, decode, preemption and
prefix hits, with greedy tokens compared to the cpu backend in the same dtype and schedule.

This proves our calls against the documented op contracts, not the hardware: the fake runs the
ops' documented semantics in float32 on the CPU, so numerics, speed and memory of real NPUs are
untested here (see docs/ascend.md).

How tokens are compared, and why not plainly for equality: both runs use bfloat16, block size
128 and the same KV pool, so they schedule identically and differ only in the attention op's
float32 summation order before its bfloat16 output rounding. That moves logits by a rounding
step or two, which changes the greedy token only where two logits are that close: the tiny
model's logits are bfloat16 (top logits ~16, one step = 0.125), so exact ties are common, and
which of two tied tokens wins is decided by rounding noise. float16 does not remove this (measured over 12 prompts x 60 tokens:
bfloat16 runs parted at a tie in 3 sequences, float16 in 2, each time at one rounding step). So
each sequence must match token for token, each chosen token's logprob within NEAR_TIE of the
cpu run's, until the first position where the tokens differ; that position must be a near tie
(either run's top two logprobs within NEAR_TIE) with each run's choice among the other's top
two, and the comparison of that sequence stops there (the continuations legitimately differ).
Most tokens must have been compared, so the rule cannot pass vacuously. Measured here: 120 of
140 tokens compared, logprobs within 0.12 (an attention scale off by 10% moves them by 0.27;
one off by 2% goes unnoticed: the tiny model's greedy tokens are robust to small errors, which
tests/test_npu_backend.py and the selftest check on logits instead).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cluster.llm import LLM
from kvcache.layout import bytes_per_block
from scheduler.sampling_params import SamplingParams
from worker.models.tiny import TINY_CONFIG
from worker.output import EngineStats, JobOutput

FAKE_ROOT = Path(__file__).parent / "fake_torch_npu"
BLOCK_SIZE = 128
STEP_TOKENS = 64  # max_num_batched_tokens: every prompt below is longer, so prefills are chunked
POOL_BLOCKS = 5  # too few for four sequences that each grow to two blocks: preemption
UTILIZATION = 0.25
# Two bfloat16 rounding steps for logits in [16, 32), where the tiny model's top logits lie.
NEAR_TIE = torch.finfo(torch.bfloat16).eps * 32
FIA = "npu_fused_infer_attention_score"

SHARED = ("Paged KV caches split every sequence into fixed blocks; a block table maps "
          "positions to blocks, and full blocks are hashed for reuse. ")[:130]
GROWING = [  # 110-125 tokens each: one block at admission, two after 30 more tokens
    "Scale out by adding nodes, then more nodes, and the scheduler routes new jobs to them at once. "
    "And so on, step by step.",
    "A dead worker loses no job because the scheduler re-routes every unfinished job elsewhere. "
    "And so on, step by step.",
    "Continuous batching lets sequences join and leave the running batch at every single step. "
    "And so on, step by step.",
    "Ascend NPUs take paged attention through one fused op per layer in the packed TND layout. "
    "And so on, step by step.",
]
SHARING = [SHARED + " first tail", SHARED + " second, different tail"]


def tiny_block_bytes() -> int:
    c = TINY_CONFIG
    return bytes_per_block(c["num_hidden_layers"], BLOCK_SIZE, c["num_key_value_heads"],
                           c["head_dim"], torch.bfloat16)


def forget_torch_npu() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "torch_npu"]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def fake_npu():
    """The fake torch_npu on sys.path for this module only, with a device whose memory makes a
    POOL_BLOCKS-block cache at UTILIZATION; one torch thread (the 2-core CI box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    forget_torch_npu()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(FAKE_ROOT))
        total = int((POOL_BLOCKS + 0.5) * tiny_block_bytes() / UTILIZATION)
        mp.setenv("FAKE_NPU_TOTAL_BYTES", str(total))
        import torch_npu

        yield torch_npu
    forget_torch_npu()
    torch.set_num_threads(threads)


@dataclass
class Run:
    llm: LLM
    outputs: list[JobOutput]
    after_growing: EngineStats
    after_sharing: EngineStats


def run_workload(llm: LLM) -> Run:
    """Four distinct prompts that outgrow the pool, then two that share a full first block."""
    growing = llm.generate(GROWING, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                   logprobs=2))
    after_growing = llm.engine.stats()
    sharing = llm.generate(SHARING, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   logprobs=2))
    return Run(llm, growing + sharing, after_growing, llm.engine.stats())


@pytest.fixture(scope="module")
def npu_run(fake_npu):
    llm = LLM("tiny", device="npu", dtype="bfloat16", block_size=BLOCK_SIZE,
              max_num_batched_tokens=STEP_TOKENS, memory_utilization=UTILIZATION)
    profile_calls = [args for op, args in fake_npu.CALL_LOG if op == FIA]
    run = run_workload(llm)
    return run, profile_calls


@pytest.fixture(scope="module")
def cpu_run(npu_run):
    """The cpu backend with exactly the npu run's pool, so both schedule identically."""
    size = npu_run[0].llm.engine.kv_size
    llm = LLM("tiny", device="cpu", dtype="bfloat16", block_size=BLOCK_SIZE,
              max_num_batched_tokens=STEP_TOKENS,
              kv_cache_gib=size.num_blocks * size.bytes_per_block / 2**30)
    return run_workload(llm)


def test_kv_cache_is_sized_from_device_memory_after_a_profiling_forward(npu_run):
    run, profile_calls = npu_run
    size = run.llm.engine.kv_size
    total = int((POOL_BLOCKS + 0.5) * tiny_block_bytes() / UTILIZATION)
    assert size.bytes_per_block == tiny_block_bytes()
    assert size.budget_bytes == int(total * UTILIZATION) - size.peak_bytes
    assert size.num_blocks == size.budget_bytes // size.bytes_per_block == POOL_BLOCKS
    assert run.after_growing.kv_blocks_total == POOL_BLOCKS
    # One profiling prefill of the largest step, through every layer, before any request.
    layers = TINY_CONFIG["num_hidden_layers"]
    assert len(profile_calls) == layers
    assert all(call["actual_seq_lengths"][-1] == STEP_TOKENS for call in profile_calls)
    assert "KV cache: 5 blocks x 128 tokens" in size.describe()


def test_engine_prefills_in_chunks_decodes_preempts_and_hits_the_prefix_cache(npu_run, cpu_run):
    run, _ = npu_run
    prompt_lens = [job.num_prompt_tokens for job in run.outputs]
    assert min(prompt_lens) > STEP_TOKENS  # every prefill needed several steps
    assert all(n <= BLOCK_SIZE < n + 30 for n in prompt_lens[:len(GROWING)])
    assert all(len(job.outputs[0].token_ids) == n
               for job, n in zip(run.outputs, [30] * len(GROWING) + [10] * len(SHARING)))
    assert run.after_growing.num_preemptions > 0
    assert run.after_sharing.prefix_hit_rate > 0
    sharing_prompt = sum(prompt_lens[len(GROWING):])
    computed = run.after_sharing.prompt_tokens - run.after_growing.prompt_tokens
    assert computed <= sharing_prompt - BLOCK_SIZE  # the second prompt reused the first's block
    assert run.after_sharing.kv_blocks_used == 0
    # Same schedule on both backends, so their token comparison below is like for like.
    for npu, cpu in ((run.after_growing, cpu_run.after_growing),
                     (run.after_sharing, cpu_run.after_sharing)):
        assert (npu.num_preemptions, npu.prompt_tokens) == (cpu.num_preemptions, cpu.prompt_tokens)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_greedy_tokens_match_the_cpu_backend_up_to_rounding_ties(npu_run, cpu_run):
    run, _ = npu_run
    compared = total = 0
    for npu_job, cpu_job in zip(run.outputs, cpu_run.outputs):
        npu, cpu = npu_job.outputs[0], cpu_job.outputs[0]
        total += len(cpu.token_ids)
        for i, (npu_lp, cpu_lp) in enumerate(zip(npu.logprobs, cpu.logprobs)):
            npu_top, cpu_top = [t for t, _ in npu_lp.top], [t for t, _ in cpu_lp.top]
            near_tie = min(_margin(npu_lp), _margin(cpu_lp)) <= NEAR_TIE
            if near_tie and npu.token_ids[i] != cpu.token_ids[i]:
                assert npu.token_ids[i] in cpu_top and cpu.token_ids[i] in npu_top
                break
            assert npu.token_ids[i] == cpu.token_ids[i], (
                f"{npu_job.request_id}: token {i} differs without a near tie: "
                f"npu {npu_lp.top}, cpu {cpu_lp.top}")
            assert abs(npu_lp.logprob - cpu_lp.logprob) <= NEAR_TIE, (npu_lp, cpu_lp)
            compared += 1
    assert compared >= 0.6 * total, f"only {compared}/{total} tokens compared"


def _margin(lp) -> float:
    return lp.top[0][1] - lp.top[1][1]


@pytest.mark.parametrize(("option", "named"), [({"block_size": 16}, "block_size=16"),
                                               ({"dtype": "float32"}, "dtype=torch.float32")])
def test_unservable_settings_fail_at_start_up(fake_npu, option, named):
    settings = {"dtype": "bfloat16", "block_size": BLOCK_SIZE, **option}
    fake_npu.CALL_LOG.clear()
    with pytest.raises(ValueError, match=named):
        LLM("tiny", device="npu", **settings)
    assert not fake_npu.CALL_LOG  # rejected before any op ran (no profiling forward)


def test_a_device_too_small_for_one_block_says_so(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_TOTAL_BYTES", str(tiny_block_bytes()))
    with pytest.raises(ValueError, match="holds no block"):
        LLM("tiny", device="npu", dtype="bfloat16", block_size=BLOCK_SIZE,
            max_num_batched_tokens=STEP_TOKENS, memory_utilization=0.5)


def test_forks_sharing_blocks_in_a_nearly_full_pool(fake_npu):
    """Three samples of a two-block prompt share its first block: 4 blocks held, but the fused
    op counts 6 per step, over the 5-block pool. The backend splits such a step into runs of
    requests that fit; each sample ends as it does in a roomy pool (seeded sampling)."""
    tight = LLM("tiny", device="npu", dtype="bfloat16", block_size=BLOCK_SIZE,
                max_num_batched_tokens=STEP_TOKENS, memory_utilization=UTILIZATION)
    prompt = (SHARED * 2)[:200]  # two blocks, the first shared by all three samples
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=1, n=3, ignore_eos=True)
    fake_npu.CALL_LOG.clear()
    forks = tight.generate([prompt], params)[0].outputs
    batches = [len(args["actual_seq_lengths_kv"]) for op, args in fake_npu.CALL_LOG if op == FIA]
    assert tight.engine.kv_size.num_blocks == POOL_BLOCKS
    assert 2 in batches and 3 not in batches  # the three decodes went as a run of 2, then 1

    roomy = LLM("tiny", device="npu", dtype="bfloat16", block_size=BLOCK_SIZE,
                max_num_batched_tokens=STEP_TOKENS, memory_utilization=4 * UTILIZATION)
    assert roomy.engine.kv_size.num_blocks > 3 * 2
    alone = roomy.generate([prompt], params)[0].outputs
    assert [f.token_ids for f in forks] == [a.token_ids for a in alone]
    assert len({tuple(f.token_ids) for f in forks}) > 1  # the samples differ: three real forks


@pytest.mark.parametrize(("kv_lens", "pool", "runs"), [
    ([100, 200, 300], 10, [[0, 1, 2]]),  # 1 + 2 + 3 blocks fit in 10
    ([256, 256, 129], 5, [[0, 1], [2]]),
    ([128, 512, 1, 1], 4, [[0], [1], [2, 3]]),
])
def test_request_groups_keep_each_run_within_the_pool(kv_lens, pool, runs):
    from worker.backends.npu import request_groups

    assert [list(g) for g in request_groups(kv_lens, BLOCK_SIZE, pool)] == runs


def test_request_groups_hold_at_most_the_tnd_batch_limit():
    from worker.backends.npu import MAX_TND_BATCH, request_groups

    groups = request_groups([1] * (2 * MAX_TND_BATCH + 3), BLOCK_SIZE, 10**6)
    assert [len(g) for g in groups] == [MAX_TND_BATCH, MAX_TND_BATCH, 3]

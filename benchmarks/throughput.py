"""Engine throughput figures on CPU: pagedserve vs Hugging Face transformers (static and
continuous batching) vs a matmul roofline, plus variable output lengths, a shared prefix with
prefix caching on/off, and the scheduler's own cost per step.

Run by hand: ``python -m benchmarks.throughput [--quick] [--skip-hf] [--rounds N] [--section NAME]``.
Prints one JSON document on stdout; progress goes to stderr. Not a test.
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import (LlamaShape, MatmulReplay, StepShape, build_random_llama,
                               emit_json, machine_info, numba_threading_layer, progress,
                               random_token_ids, step_kv_read_bytes, step_matmul_flops,
                               stopwatch, stream_read_gb_per_s, summary_ms, uniform_ints)
from cluster.llm import LLM
from kvcache.manager import KVCacheManager
from scheduler.batching import BatchingConfig, ContinuousBatcher
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from worker.models.packed_gemm import PACKED_MAX_ROWS
from worker.models.tiny import tiny_model_dir
from worker.runner import prepare_inputs

SECTIONS = ("pagedserve", "roofline", "hf_static", "hf_continuous", "variable_output",
            "shared_prefix", "scheduler_step")
HF_SECTIONS = ("hf_static", "hf_continuous")
GOAL_SPEEDUP_VS_HF_STATIC = 3.0
GOAL_ROOFLINE_FRACTION = 0.70
GOAL_SCHEDULER_STEP_MS = 2.0
THREADS = 2
BLOCK_SIZE = 16
PAD_TOKEN_ID = 0
# HF's default dynamic cache concatenates every layer's K/V onto the cache at each decode step;
# its preallocated one (eager, no torch.compile) ran HF's decode steps 10-17% faster here.
HF_CACHE = "static"
ROOFLINE_METHOD = (
    "Replay of the exact step shapes pagedserve executed in the 'pagedserve' section: for each "
    "engine step with T packed tokens and S sampled rows, time the fused q/k/v, o, fused "
    "gate/up and down projections of every layer at M=T (the last layer's o, gate/up and "
    "down at M=S: the engine carries only sampled rows past its attention), plus the lm_head "
    "at M=S, on random "
    "float32 tensors of the model's shapes (distinct weights per layer), same thread count, "
    "as torch.nn.functional.linear on [out, in] weights, as torch.mm on [in, out] weights, "
    f"through MKL's packed weights (the engine's path for batches of up to {PACKED_MAX_ROWS} "
    "rows where it picks MKL) and through oneDNN's (its path where it picks oneDNN), keeping "
    "the fastest. Roofline time = sum over steps of each step's best matmul time across the "
    "replays; upper-bound tokens/s = the section's output tokens / roofline "
    "time. "
    "It leaves out attention, norms, rope, embedding, sampling, scheduling and Python "
    "overhead, so no engine running these matmuls can beat it.")


@dataclass(slots=True, frozen=True)
class Workload:
    """Sizes of every section; ``QUICK`` is a smoke run of the same code paths."""

    num_requests: int = 48
    prompt_len: tuple[int, int] = (16, 256)
    output_len: int = 64
    variable_output_len: tuple[int, int] = (16, 256)
    prefix_len: int = 512
    suffix_len: tuple[int, int] = (16, 64)
    hf_batch_size: int = 16
    scheduler_seqs: int = 256
    scheduler_prompt_len: tuple[int, int] = (480, 544)
    scheduler_steps: int = 200
    roofline_repeats: int = 3
    seed: int = 0


QUICK = Workload(num_requests=8, prompt_len=(16, 64), output_len=16, variable_output_len=(8, 32),
                 prefix_len=128, hf_batch_size=4, scheduler_seqs=32, scheduler_steps=20,
                 roofline_repeats=1)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# -- workloads --------------------------------------------------------------------------------


def uniform_prompts(w: Workload, vocab: int, salt: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(w.seed * 1000 + salt)
    return [random_token_ids(g, n, vocab) for n in uniform_ints(g, w.num_requests, *w.prompt_len)]


def variable_output_lengths(w: Workload) -> list[int]:
    g = torch.Generator().manual_seed(w.seed * 1000 + 7)
    return uniform_ints(g, w.num_requests, *w.variable_output_len)


def shared_prefix_prompts(w: Workload, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(w.seed * 1000 + 11)
    prefix = random_token_ids(g, w.prefix_len, vocab)
    suffixes = uniform_ints(g, w.num_requests, *w.suffix_len)
    return [prefix + random_token_ids(g, n, vocab) for n in suffixes]


# -- pagedserve -------------------------------------------------------------------------------


class StepRecorder:
    """Wraps a ModelRunner's ``execute`` to record each step's shape and its execute time."""

    def __init__(self, runner) -> None:
        self.steps: list[StepShape] = []
        self.execute_seconds: list[float] = []
        self._execute = runner.execute
        runner.execute = self

    def __call__(self, inputs, *args):
        self.steps.append(StepShape(int(inputs.input_ids.shape[0]), len(inputs.logits_indices),
                                    sum(inputs.meta.seq_lens)))
        with stopwatch() as elapsed:
            logits = self._execute(inputs, *args)
        self.execute_seconds.append(elapsed[0])
        return logits

    def detach(self, runner) -> None:
        runner.execute = self._execute


def warmed_llm(model_dir: Path, shape: LlamaShape, **options) -> LLM:
    """An engine on the benchmark model that has already run prefill, chunked prefill and
    decode once, so numba compilation and first-touch allocations are not timed."""
    llm = LLM(str(model_dir), block_size=BLOCK_SIZE, **options)
    g = torch.Generator().manual_seed(999)
    warm = [random_token_ids(g, n, shape.vocab_size) for n in (5, 40, 300, 1900)]
    llm.generate(warm, greedy(8))
    return llm


@dataclass(slots=True)
class EngineRun:
    """One timed ``generate``: the reported figures, the jobs, and the steps it executed."""

    figures: dict
    jobs: list
    recorder: StepRecorder


def run_engine(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> EngineRun:
    """Generate everything at once (all jobs arrive at t=0)."""
    kv_before, stats_before = llm.engine.kv.stats(), llm.engine.stats()
    recorder = StepRecorder(llm.engine.runner)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        with stopwatch() as elapsed:
            jobs = llm.generate(prompts, [greedy(n) for n in output_lens])
    finally:
        recorder.detach(llm.engine.runner)
    page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    kv_after, stats_after = llm.engine.kv.stats(), llm.engine.stats()
    output_tokens = sum(len(job.outputs[0].token_ids) for job in jobs)
    assert output_tokens == sum(output_lens), "ignore_eos jobs must produce max_tokens each"
    queried = kv_after.prefix_query_tokens - kv_before.prefix_query_tokens
    hits = kv_after.prefix_hit_tokens - kv_before.prefix_hit_tokens
    ttfts = [job.ttft for job in jobs]
    figures = {
        "requests": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": output_tokens,
        "wall_s": round(elapsed[0], 3),
        "output_tokens_per_s": round(output_tokens / elapsed[0], 2),
        "total_tokens_per_s": round((output_tokens + sum(map(len, prompts))) / elapsed[0], 2),
        "steps": len(recorder.steps),
        "mean_step_ms": round(elapsed[0] / max(len(recorder.steps), 1) * 1e3, 3),
        "model_execute_s": round(sum(recorder.execute_seconds), 3),
        "outside_execute_s": round(elapsed[0] - sum(recorder.execute_seconds), 3),
        "max_tokens_in_a_step": max((s.num_tokens for s in recorder.steps), default=0),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "latency_mean_s": round(statistics.fmean(j.finish_time - j.arrival_time for j in jobs), 4),
        "preemptions": stats_after.num_preemptions - stats_before.num_preemptions,
        "prompt_tokens_computed": stats_after.prompt_tokens - stats_before.prompt_tokens,
        "prefix_hit_rate": round(hits / queried, 4) if queried else 0.0,
        "minor_page_faults": page_faults,
        "cpu_gemm": llm.engine.model.gemm_kind,
    }
    return EngineRun(figures, jobs, recorder)


def section_pagedserve(ctx: "Context") -> dict:
    progress("pagedserve: warm-up")
    llm = warmed_llm(ctx.model_dir, ctx.shape)
    prompts = uniform_prompts(ctx.workload, ctx.shape.vocab_size, salt=1)
    progress(f"pagedserve: {len(prompts)} requests x {ctx.workload.output_len} output tokens")
    ctx.pagedserve_run = run = run_engine(llm, prompts, [ctx.workload.output_len] * len(prompts))
    ctx.llm = llm
    progress(f"pagedserve: {run.figures['output_tokens_per_s']} output tok/s")
    return run.figures


def section_roofline(ctx: "Context") -> dict:
    pagedserve, recorder = ctx.pagedserve_run.figures, ctx.pagedserve_run.recorder
    steps = recorder.steps
    progress(f"roofline: replaying the matmuls of {len(steps)} engine steps")
    replay = MatmulReplay(ctx.shape, seed=ctx.workload.seed)
    replay.replay_seconds(steps[:4])  # warm the allocator and the BLAS dispatch
    runs = [replay.replay_seconds(steps) for _ in range(ctx.workload.roofline_repeats)]
    best = _best_per_step(runs)
    flops = sum(step_matmul_flops(ctx.shape, s) for s in steps)
    bound = pagedserve["output_tokens"] / sum(best)
    figures = {
        "roofline_method": ROOFLINE_METHOD,
        "replayed_steps": len(steps),
        "matmul_seconds": round(sum(best), 4),
        "matmul_seconds_per_replay": [round(sum(run), 4) for run in runs],
        "matmul_gflop": round(flops / 1e9, 3),
        "matmul_gflops_per_s": round(flops / sum(best) / 1e9, 2),
        "pagedserve_effective_gflops_per_s": round(flops / pagedserve["wall_s"] / 1e9, 2),
        "upper_bound_output_tokens_per_s": round(bound, 2),
        "pagedserve_fraction_of_roofline": round(pagedserve["output_tokens_per_s"] / bound, 4),
        "kv_reads": kv_read_figures(ctx, steps, sum(best), pagedserve),
        "by_step_kind": {
            "decode_only": _step_group(ctx.shape, steps, recorder.execute_seconds, best, True),
            "with_prefill": _step_group(ctx.shape, steps, recorder.execute_seconds, best, False),
            "note": "engine execute time (model forward + lm_head) vs matmul time of the same "
                    "steps; the gap is attention, norms, rope, activations and KV writes",
        },
    }
    if ctx.rounds > 1:
        figures["paired_rounds"] = roofline_rounds(ctx, replay)
    return figures


def kv_read_figures(ctx: "Context", steps: list[StepShape], matmul_s: float,
                    pagedserve: dict) -> dict:
    """What the roofline leaves out, sized: the cached K/V that attention must read, at the
    host's streaming rate from DRAM. ``reachable_fraction_of_roofline`` is the fraction an
    engine would reach if those reads, between its matmuls, were its only other cost. An
    estimate, not a strict bound: some K/V may still sit in the L3 cache."""
    kv_bytes = sum(step_kv_read_bytes(ctx.shape, s) for s in steps)
    rate = stream_read_gb_per_s()
    floor_s = kv_bytes / rate / 1e9
    return {
        "kv_read_gb": round(kv_bytes / 1e9, 3),
        "stream_read_gb_per_s": round(rate, 2),
        "kv_read_seconds_at_that_rate": round(floor_s, 4),
        "reachable_fraction_of_roofline": round(matmul_s / (matmul_s + floor_s), 4),
        "pagedserve_fraction_of_matmul_plus_kv_reads": round(
            (matmul_s + floor_s) / pagedserve["wall_s"], 4),
    }


def roofline_rounds(ctx: "Context", replay: MatmulReplay) -> dict:
    """As for the HF speedup, the fraction is also taken from rounds that each run the engine on
    fresh prompts and at once replay that run's matmuls (best of two replays per step), so both
    see the same host speed; the goal is checked on the median per-round fraction."""
    w = ctx.workload
    fractions = []
    for r in range(ctx.rounds):
        prompts = uniform_prompts(w, ctx.shape.vocab_size, salt=200 + r)
        run = run_engine(ctx.llm, prompts, [w.output_len] * len(prompts))
        steps = run.recorder.steps
        matmul_s = sum(_best_per_step([replay.replay_seconds(steps) for _ in range(2)]))
        fractions.append(round(matmul_s / run.figures["wall_s"], 4))
    progress(f"roofline: paired fractions {fractions}")
    return {"fractions": fractions, "median_fraction": statistics.median(fractions)}


def _best_per_step(runs: list[list[float]]) -> list[float]:
    """Each step's fastest time over several replays of the same steps."""
    return [min(per_step) for per_step in zip(*runs)]


def _step_group(shape, steps, execute_s, matmul_s, decode_only: bool) -> dict:
    chosen = [i for i, s in enumerate(steps) if (s.num_tokens == s.num_sampled) == decode_only]
    engine = sum(execute_s[i] for i in chosen)
    matmul = sum(matmul_s[i] for i in chosen)
    flops = sum(step_matmul_flops(shape, steps[i]) for i in chosen)
    return {
        "steps": len(chosen),
        "tokens": sum(steps[i].num_tokens for i in chosen),
        "engine_execute_s": round(engine, 4),
        "matmul_s": round(matmul, 4),
        "matmul_fraction_of_execute": round(matmul / engine, 4) if engine else None,
        "matmul_gflops_per_s": round(flops / matmul / 1e9, 2) if matmul else None,
    }


# -- Hugging Face baselines -------------------------------------------------------------------


def left_padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = [[PAD_TOKEN_ID] * (width - len(p)) + p for p in batch]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in batch]
    return torch.tensor(ids), torch.tensor(mask)


@torch.inference_mode()
def hf_static_generate(model, prompts: list[list[int]], output_lens: list[int],
                       batch_size: int) -> tuple[float, list[list[int]]]:
    """Batches of ``batch_size`` in arrival order, left-padded; each batch runs until its
    longest request is done (the static-batching cost). Returns wall time and each request's
    first ``output_lens[i]`` tokens."""
    from transformers import GenerationConfig

    outputs: list[list[int]] = []
    with stopwatch() as elapsed:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            lens = output_lens[start:start + batch_size]
            ids, mask = left_padded(batch)
            config = GenerationConfig(max_new_tokens=max(lens), min_new_tokens=max(lens),
                                      do_sample=False, pad_token_id=PAD_TOKEN_ID,
                                      cache_implementation=HF_CACHE)
            out = model.generate(ids, attention_mask=mask, generation_config=config)
            outputs += [row[ids.shape[1]:ids.shape[1] + n].tolist() for row, n in zip(out, lens)]
    return elapsed[0], outputs


def hf_static_figures(ctx: "Context", prompts, output_lens, reference=None) -> dict:
    hf_static_generate(ctx.hf_model, prompts[:2], [4, 4], 2)  # warm-up
    seconds, outputs = hf_static_generate(ctx.hf_model, prompts, output_lens,
                                          ctx.workload.hf_batch_size)
    useful = sum(output_lens)
    figures = {
        "batch_size": ctx.workload.hf_batch_size,
        "order": "arrival order, left padding, each batch runs to its longest request",
        "kv_cache": HF_CACHE,
        "output_tokens": useful,
        "wall_s": round(seconds, 3),
        "output_tokens_per_s": round(useful / seconds, 2),
    }
    if reference is not None:
        same = sum(a == b for a, b in zip(outputs, reference))
        figures["requests_identical_to_pagedserve"] = f"{same}/{len(outputs)}"
    return figures


def section_hf_static(ctx: "Context") -> dict:
    prompts = uniform_prompts(ctx.workload, ctx.shape.vocab_size, salt=1)
    lens = [ctx.workload.output_len] * len(prompts)
    progress(f"hf_static: generate, batch {ctx.workload.hf_batch_size}")
    figures = hf_static_figures(ctx, prompts, lens, ctx.pagedserve_tokens)
    progress(f"hf_static: {figures['output_tokens_per_s']} output tok/s")
    if ctx.llm is not None and ctx.rounds > 1:
        figures["paired_rounds"] = paired_rounds(ctx)
    return figures


def paired_rounds(ctx: "Context") -> dict:
    """This host's speed drifts by tens of percent within a minute, so the speedup is also
    taken from rounds that each run HF and then pagedserve back to back, on the same fresh
    prompts (new ones each round: the engine's prefix cache must not remember them); the
    median of the per-round ratios is the figure the goal is checked on."""
    w = ctx.workload
    hf, paged = [], []
    for r in range(ctx.rounds):
        prompts = uniform_prompts(w, ctx.shape.vocab_size, salt=100 + r)
        lens = [w.output_len] * len(prompts)
        hf.append(hf_static_figures(ctx, prompts, lens)["output_tokens_per_s"])
        paged.append(run_engine(ctx.llm, prompts, lens).figures)
    ratios = [round(p["output_tokens_per_s"] / h, 3) for p, h in zip(paged, hf)]
    progress(f"hf_static: paired speedups {ratios}")
    return {"hf_output_tokens_per_s": hf,
            "pagedserve_output_tokens_per_s": [p["output_tokens_per_s"] for p in paged],
            "pagedserve_minor_page_faults": [p["minor_page_faults"] for p in paged],
            "speedups": ratios, "median_speedup": statistics.median(ratios)}


def section_hf_continuous(ctx: "Context") -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    w = ctx.workload
    prompts = uniform_prompts(w, ctx.shape.vocab_size, salt=1)
    longest = w.prompt_len[1] + w.output_len
    cb_config = ContinuousBatchingConfig(
        page_size=BLOCK_SIZE, num_blocks=len(prompts) * -(-longest // BLOCK_SIZE) + 64,
        max_batch_tokens=2048)
    gen_config = GenerationConfig(max_new_tokens=w.output_len, do_sample=False,
                                  eos_token_id=-1, pad_token_id=PAD_TOKEN_ID)
    progress("hf_continuous: generate_batch")
    try:
        with torch.inference_mode():
            ctx.hf_model.generate_batch(inputs=prompts[:2], generation_config=gen_config,
                                        continuous_batching_config=cb_config)
            with stopwatch() as elapsed:
                results = ctx.hf_model.generate_batch(inputs=prompts, generation_config=gen_config,
                                                      continuous_batching_config=cb_config)
    except Exception as exc:  # report, do not abort the other sections
        return {"error": f"{type(exc).__name__}: {exc}"}
    return hf_continuous_figures(list(results.values()), elapsed[0], ctx.pagedserve_tokens)


def hf_continuous_figures(results, wall_s: float, reference) -> dict:
    errors = [r.error for r in results if r.error]
    if errors:
        return {"error": f"{len(errors)} requests failed; first: {errors[0]}"}
    tokens = sum(len(r.generated_tokens) for r in results)
    span = max(r.lifespan[1] for r in results) - min(r.lifespan[0] for r in results)
    figures = {
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 2),
        "serving_span_s": round(span, 3),
        "output_tokens_per_s_over_serving_span": round(tokens / span, 2) if span > 0 else None,
        "note": "wall includes generate_batch's manager set-up and teardown; the serving span "
                "runs from the first request leaving the queue to the last one finishing",
    }
    if reference is not None:
        ordered = sorted(results, key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))
        same = sum(r.generated_tokens == ref for r, ref in zip(ordered, reference))
        figures["requests_identical_to_pagedserve"] = f"{same}/{len(results)}"
    return figures


# -- other workloads --------------------------------------------------------------------------


def section_variable_output(ctx: "Context") -> dict:
    prompts = uniform_prompts(ctx.workload, ctx.shape.vocab_size, salt=2)
    lens = variable_output_lengths(ctx.workload)
    progress(f"variable_output: pagedserve, {sum(lens)} output tokens")
    llm = warmed_llm(ctx.model_dir, ctx.shape)
    figures = run_engine(llm, prompts, lens).figures
    result = {"output_len_range": list(ctx.workload.variable_output_len), "pagedserve": figures}
    if ctx.hf_model is not None:
        progress("variable_output: hf static generate")
        result["hf_static"] = hf_static_figures(ctx, prompts, lens)
        result["speedup_vs_hf_static"] = round(
            figures["output_tokens_per_s"] / result["hf_static"]["output_tokens_per_s"], 3)
    return result


def section_shared_prefix(ctx: "Context") -> dict:
    prompts = shared_prefix_prompts(ctx.workload, ctx.shape.vocab_size)
    lens = [ctx.workload.output_len] * len(prompts)
    result = {"prefix_len": ctx.workload.prefix_len,
              "suffix_len_range": list(ctx.workload.suffix_len),
              "ttft_note": "all jobs arrive at t=0, so TTFT includes queueing behind earlier jobs"}
    for caching in (True, False):
        label = "prefix_caching_on" if caching else "prefix_caching_off"
        progress(f"shared_prefix: {label}")
        llm = warmed_llm(ctx.model_dir, ctx.shape, enable_prefix_caching=caching)
        result[label] = run_engine(llm, prompts, lens).figures
    on, off = result["prefix_caching_on"], result["prefix_caching_off"]
    result["throughput_ratio_on_vs_off"] = round(
        on["output_tokens_per_s"] / off["output_tokens_per_s"], 3)
    result["ttft_mean_ratio_on_vs_off"] = round(on["ttft_mean_s"] / off["ttft_mean_s"], 3)
    return result


def section_scheduler_step(ctx: "Context") -> dict:
    """schedule() + prepare_inputs() + update() with every sequence decoding, no model."""
    w = ctx.workload
    g = torch.Generator().manual_seed(w.seed * 1000 + 13)
    max_tokens = w.scheduler_steps + 1024  # early admits decode while the rest prefill
    longest = w.scheduler_prompt_len[1] + max_tokens
    kv = KVCacheManager(w.scheduler_seqs * -(-longest // BLOCK_SIZE) + 64, BLOCK_SIZE)
    batcher = ContinuousBatcher(BatchingConfig(max_num_seqs=w.scheduler_seqs,
                                               max_model_len=longest), kv)
    for i, n in enumerate(uniform_ints(g, w.scheduler_seqs, *w.scheduler_prompt_len)):
        batcher.add(Request(f"seq{i}", random_token_ids(g, n, ctx.shape.vocab_size),
                            greedy(max_tokens)))
    progress(f"scheduler_step: prefilling {w.scheduler_seqs} sequences (untimed)")
    while any(r.num_output_tokens == 0 for r in batcher.requests.values()):
        scheduler_step(batcher, kv, g, ctx.shape.vocab_size)
    progress(f"scheduler_step: timing {w.scheduler_steps} decode steps")
    parts = [scheduler_step(batcher, kv, g, ctx.shape.vocab_size) for _ in range(w.scheduler_steps)]
    assert all(n == w.scheduler_seqs for n, *_ in parts), "every sequence decodes in every step"
    return {
        "running_sequences": w.scheduler_seqs,
        "context_tokens_at_start": list(w.scheduler_prompt_len),
        "prefix_caching": kv.enable_prefix_caching,
        "schedule_plus_prepare": summary_ms([s + p for _, s, p, _ in parts]),
        "per_step_total": summary_ms([s + p + u for _, s, p, u in parts]),
        "schedule": summary_ms([s for _, s, _, _ in parts]),
        "prepare_inputs": summary_ms([p for _, _, p, _ in parts]),
        "update": summary_ms([u for *_, u in parts]),
    }


def scheduler_step(batcher, kv, g, vocab: int) -> tuple[int, float, float, float]:
    """One step without the model; returns (sequences, schedule s, prepare s, update s). The
    sampled tokens are drawn before the update is timed (that is the sampler's work)."""
    cpu = torch.device("cpu")
    with stopwatch() as t_schedule:
        batch = batcher.schedule()
    with stopwatch() as t_prepare:
        inputs = prepare_inputs(batch, kv, cpu)
    tokens = torch.randint(0, vocab, (len(inputs.sampling_rows),), generator=g).tolist()
    sampled = {batch.requests[i].request_id: t for i, t in zip(inputs.sampling_rows, tokens)}
    with stopwatch() as t_update:
        batcher.update(batch, sampled)
    return len(batch), t_schedule[0], t_prepare[0], t_update[0]


# -- driver -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Context:
    workload: Workload
    shape: LlamaShape
    model_dir: Path
    hf_model: object = None
    pagedserve_run: EngineRun | None = None
    llm: LLM | None = None  # the headline run's engine, reused for paired rounds
    rounds: int = 3

    @property
    def pagedserve_tokens(self) -> list[list[int]] | None:
        """The headline run's output tokens, to check the baselines produced the same text."""
        if self.pagedserve_run is None:
            return None
        return [job.outputs[0].token_ids for job in self.pagedserve_run.jobs]


def goals(report: dict) -> dict:
    out = {}
    paged, hf = report.get("pagedserve"), report.get("hf_static")
    if paged and hf:
        speedup = (hf["paired_rounds"]["median_speedup"] if "paired_rounds" in hf
                   else paged["output_tokens_per_s"] / hf["output_tokens_per_s"])
        out["speedup_vs_hf_static"] = _goal(speedup, GOAL_SPEEDUP_VS_HF_STATIC, at_least=True)
    if "roofline" in report:
        roofline = report["roofline"]
        frac = (roofline["paired_rounds"]["median_fraction"] if "paired_rounds" in roofline
                else roofline["pagedserve_fraction_of_roofline"])
        out["fraction_of_roofline"] = _goal(frac, GOAL_ROOFLINE_FRACTION, at_least=True)
    if "scheduler_step" in report:  # the measure: schedule + input preparation
        mean = report["scheduler_step"]["schedule_plus_prepare"]["mean_ms"]
        out["scheduler_step_mean_ms"] = _goal(mean, GOAL_SCHEDULER_STEP_MS, at_least=False)
    return out


def _goal(measured: float, target: float, *, at_least: bool) -> dict:
    met = measured >= target if at_least else measured <= target
    return {"measured": round(measured, 4), "target": (">= " if at_least else "<= ") + str(target),
            "met": met}


def run_sections(ctx: Context, wanted: list[str]) -> dict:
    report: dict = {}
    if {"pagedserve", "roofline"} & set(wanted):
        report["pagedserve"] = section_pagedserve(ctx)
    if "roofline" in wanted:
        report["roofline"] = section_roofline(ctx)
    simple = {"hf_static": section_hf_static, "hf_continuous": section_hf_continuous,
              "variable_output": section_variable_output, "shared_prefix": section_shared_prefix,
              "scheduler_step": section_scheduler_step}
    for name in wanted:
        if name in simple:
            report[name] = simple[name](ctx)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few small requests: a smoke run")
    parser.add_argument("--skip-hf", action="store_true",
                        help="skip the Hugging Face transformers baselines")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch intra-op threads (default {THREADS}, the reference setting)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of HF static + pagedserve, and of pagedserve + matmul "
                             "replay, run back to back for the speedup and the roofline "
                             "fraction (default 3; 1 = the single headline comparison)")
    parser.add_argument("--section", choices=SECTIONS, default=None,
                        help="run one section ('roofline' also runs 'pagedserve', whose steps "
                             "it replays)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = QUICK if args.quick else Workload()
    wanted = [args.section] if args.section else list(SECTIONS)
    if args.skip_hf:
        wanted = [s for s in wanted if s not in HF_SECTIONS]
    shape = LlamaShape()
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        progress("building a random Llama checkpoint")
        hf_model = build_random_llama(shape, Path(tmp), tiny_model_dir(), seed=workload.seed)
        use_hf = not args.skip_hf and (set(wanted) & {*HF_SECTIONS, "variable_output"})
        ctx = Context(workload, shape, Path(tmp), hf_model if use_hf else None,
                      rounds=max(1, args.rounds))
        report = {
            "benchmark": "throughput",
            "quick": args.quick,
            "machine": machine_info(),
            "model": asdict(shape) | {"parameters": sum(p.numel() for p in hf_model.parameters()),
                                      "dtype": "float32", "block_size": BLOCK_SIZE},
            "workload": asdict(workload),
            "sections": wanted,
        }
        report |= run_sections(ctx, wanted)
    report["machine"]["numba_threading_layer"] = numba_threading_layer()
    report["goals"] = goals(report)
    emit_json(report)


if __name__ == "__main__":
    main()

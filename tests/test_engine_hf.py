"""Greedy output of the engine equals Hugging Face transformers' generate, token for token
(float32), for random Llama and Qwen2 checkpoints, under every scheduling regime.

On the CPU by default; ``PAGEDSERVE_TEST_DEVICE=cuda`` runs the same tests with both the engine
and transformers on a GPU (the cuda backend, its device placement and KV sizing from device
memory), which CI cannot do: it has no GPU.
"""
import gc
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cluster.llm import LLM  # noqa: E402
from worker import runner  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402
from worker.models.tiny import tiny_model_dir  # noqa: E402
from worker.backends import get_backend  # noqa: E402
from worker.loader import load_model  # noqa: E402

DEVICE = os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu")
VOCAB = 262  # the tiny model's byte-level tokenizer, reused so the engine can detokenize
MAX_NEW = 24


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=257, **extra)


def _save(model, path):
    # Random models have flat logits and greedy ties; scale the head so the argmax is sharp and
    # a real bug cannot hide behind float noise. Their attention is nearly uniform, too, so
    # positions (rope and its llama3 scaling) hardly change the output: sharpen q and k.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.save_pretrained(path, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir() / name, path / name)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        cfg = transformers.LlamaConfig(**_common(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, rope_theta=10000.0))
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**_common(tie_word_embeddings=True))
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model = _save(model.float().eval(), path)
    return path, model.to(DEVICE)


def prompts():
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    out = []
    for i, length in enumerate([5, 70, 17, 33, 48, 9]):
        body = torch.randint(0, 256, (length,), generator=g).tolist()
        out.append(shared + body if i % 2 else body)
    return out


@pytest.fixture(scope="module")
def expected(checkpoint):
    _, model = checkpoint
    result = []
    for ids in prompts():
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=MAX_NEW,
                                 do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                           device=DEVICE))
        result.append(gen[0, len(ids):].tolist())
    return result


REGIMES = {
    "prefix-caching": dict(block_size=8, max_num_seqs=2),
    "no-prefix-caching": dict(block_size=8, enable_prefix_caching=False),
    "chunked-16": dict(block_size=16, max_num_batched_tokens=16),
    # 30 blocks of 4 KiB (2 layers x K,V x 8 tokens x 2 heads x 16 dims x fp32)
    "preempting": dict(block_size=8, kv_cache_gib=30 * 4096 / 2**30),
}
PREEMPTING_BLOCKS = 30


def engine_options(path, regime, **options):
    """The regime's options for DEVICE. A GPU sizes its KV cache from device memory, not
    kv_cache_gib: a small share of it, or, to preempt, the share that leaves 30 blocks after
    the profiled peak (measured by a first engine of the same shape)."""
    options = dict(REGIMES.get(regime, {}), device=DEVICE, **options)
    if DEVICE == "cpu":
        return options
    options.pop("kv_cache_gib", None)
    options["memory_utilization"] = 0.05
    if regime == "preempting":
        probe = LLM(str(path), **options).engine.kv_size
        gc.collect()
        total = torch.cuda.mem_get_info()[1]
        needed = probe.peak_bytes + (PREEMPTING_BLOCKS + 0.5) * probe.bytes_per_block
        options["memory_utilization"] = needed / total
    return options


@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_transformers(checkpoint, expected, regime):
    path, _ = checkpoint
    llm = LLM(str(path), **engine_options(path, regime))
    outs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0))
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    stats = llm.engine.stats()
    if regime == "preempting":
        assert stats.num_preemptions > 0
    if regime == "prefix-caching":
        assert stats.prefix_hit_rate > 0
    assert stats.kv_blocks_used == 0  # every block came back


@pytest.mark.parametrize("regime", ["prefix-caching", "chunked-16", "preempting", "sliced"])
def test_prompt_logprobs_match_transformers(checkpoint, regime, monkeypatch):
    """Each prompt token's logprob (and top-2) equals HF's log-softmax of the teacher-forced
    logits, although the prompts share a cached prefix, are cut in 16-token chunks, are
    preempted and recomputed, or have their logits computed 7 rows at a time."""
    path, model = checkpoint
    if regime == "sliced":
        monkeypatch.setattr(runner, "PROMPT_LOGITS_ROWS", 7)
    llm = LLM(str(path), **engine_options(path, regime))
    outs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                  prompt_logprobs=2))
    for ids, out in zip(prompts(), outs):
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=DEVICE)).logits[0, :-1].float().log_softmax(-1).cpu()
        assert out.prompt_logprobs[0] is None  # as vLLM: nothing scores the first token
        got = out.prompt_logprobs[1:]
        assert [lp.token_id for lp in got] == ids[1:]
        chosen_ref = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor([lp.logprob for lp in got]), chosen_ref, atol=1e-4)
        top_ref = ref.topk(2, dim=-1)
        assert [[t for t, _ in lp.top] for lp in got] == top_ref.indices.tolist()
        # vLLM's view of a position: token id -> Logprob, with the chosen token's vocab rank
        assert [lp[token].rank for lp, token in zip(got, ids[1:])] == \
            (ref >= chosen_ref[:, None]).sum(-1).tolist()
    if regime == "preempting":
        assert llm.engine.stats().num_preemptions > 0


def test_min_tokens_matches_transformers_min_new_tokens(checkpoint, expected):
    """Each prompt's 3rd greedy token is made a stop token: without min_tokens the output ends
    there; with min_tokens=8 the stop (and EOS) are masked for 8 tokens, as HF's
    min_new_tokens masks its eos ids, and the outputs agree token for token."""
    path, model = checkpoint
    llm = LLM(str(path), **engine_options(path, None, block_size=8))
    for ids, greedy in zip(prompts(), expected):
        stop = greedy[2]
        short = llm.generate([ids], SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                   stop_token_ids=[stop]))
        assert short[0].outputs[0].token_ids == greedy[:greedy.index(stop) + 1]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=MAX_NEW,
                                 do_sample=False, min_new_tokens=8, eos_token_id=[stop, 257],
                                 pad_token_id=0, attention_mask=torch.ones(
                                     1, len(ids), dtype=torch.long, device=DEVICE))
        out = llm.generate([ids], SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                 stop_token_ids=[stop], min_tokens=8))
        got = out[0].outputs[0].token_ids
        assert got == ref[0, len(ids):].tolist()
        assert len(got) >= 8 and stop not in got[:8] and 257 not in got[:8]


@pytest.mark.skipif(DEVICE == "cpu", reason="tests/test_engine.py checks this on the CPU")
def test_seeded_sampling_is_identical_with_and_without_preemption(checkpoint):
    """Sampling on DEVICE (temperature, top-k/p, penalties, logprobs) is repeatable across a
    preemption: the uniforms come from the seed and position, not the device."""
    path, _ = checkpoint
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_p=0.9, top_k=40,
                             repetition_penalty=1.2, presence_penalty=0.5, seed=7 + i,
                             ignore_eos=True, logprobs=3) for i in range(len(prompts()))]
    calm = LLM(str(path), **engine_options(path, "no-prefix-caching")).generate(prompts(), params)
    tight = LLM(str(path), **engine_options(path, "preempting"))
    squeezed = tight.generate(prompts(), params)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in calm]


def test_a_transformers_checkpoint_has_no_tensor_the_model_leaves_unused(checkpoint, caplog):
    """The loader warns of tensors no weight takes (a config that does not describe its
    checkpoint); what transformers itself saves must not set it off."""
    path, _ = checkpoint
    with caplog.at_level("WARNING", logger="worker.loader"):
        load_model(path, backend=get_backend(DEVICE))
    assert "does not use" not in caplog.text

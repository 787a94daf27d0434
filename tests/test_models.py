"""The Llama-family model against Hugging Face transformers: same logits for Llama and Qwen2 checkpoints."""
from __future__ import annotations

import pytest
import torch
import transformers

from worker.attention import AttentionMetadata
from worker.backends import get_backend
from worker.loader import load_model
from worker.models import gemm_choice, packed_gemm
from worker.models.config import ModelConfig, UnsupportedModelError

BLOCK_SIZE = 4
FIRST_BLOCK = 3  # tables start past block 0 so an off-by-block bug cannot hide
VOCAB = 300


# ---- helpers: one sequence's KV cache and step metadata over contiguous block ids -------------


def make_kv_caches(config: ModelConfig, max_len: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    blocks = FIRST_BLOCK + -(-max_len // BLOCK_SIZE)
    shape = (blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(config.num_hidden_layers)]


def step_metadata(model, chunks: list[tuple[int, int]], max_len: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and prepared metadata for a batch of (already_cached, new_tokens) sequences.

    Sequence i owns blocks FIRST_BLOCK + i * blocks_per_seq onward, contiguously.
    """
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    positions, slots, starts, seq_lens, tables = [], [], [0], [], []
    for i, (cached, new) in enumerate(chunks):
        first_block = FIRST_BLOCK + i * blocks_per_seq
        pos = torch.arange(cached, cached + new)
        positions.append(pos)
        slots.append(first_block * BLOCK_SIZE + pos)
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
        tables.append(torch.arange(first_block, first_block + blocks_per_seq))
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(torch.int32),
        block_tables=torch.stack(tables).to(torch.int32),
        query_start_loc=starts,
        seq_lens=seq_lens,
    )
    return torch.cat(positions), model.backend.prepare(meta)


def run_chunks(model, config, tokens: list[int], chunk_lens: list[int], dtype=torch.float32) -> torch.Tensor:
    """Feed ``tokens`` in consecutive chunks through the paged cache; logits for every token."""
    assert sum(chunk_lens) == len(tokens)
    caches = make_kv_caches(config, len(tokens), dtype)
    logits, done = [], 0
    with torch.inference_mode():
        for n in chunk_lens:
            positions, meta = step_metadata(model, [(done, n)], len(tokens))
            hidden = model(torch.tensor(tokens[done : done + n]), positions, caches, meta)
            logits.append(model.compute_logits(hidden))
            done += n
    return torch.cat(logits)


# ---- reference checkpoints --------------------------------------------------------------------


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default random weights (norm gains and biases too) so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        bos_token_id=1,
        eos_token_id=[2, 3],
    )


def qwen2_config() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )


def mistral_config() -> transformers.MistralConfig:
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=128,
    )


def save_reference(hf_cls, config, directory, seed: int, **save_kwargs):
    model = hf_cls(config).eval()
    randomise(model, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return save_reference(transformers.LlamaForCausalLM, llama_config(), directory, seed=1), directory


@pytest.fixture(scope="module")
def qwen2_ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    return save_reference(transformers.Qwen2ForCausalLM, qwen2_config(), directory, seed=2), directory


@pytest.fixture(scope="module")
def mistral_ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mistral")
    return save_reference(transformers.MistralForCausalLM, mistral_config(), directory, seed=9), directory


def prompts(seed: int, lengths=(1, 7, 23)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    assert ref.std() > 0.5, "reference logits too flat for the comparison to mean anything"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4)


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt"])
def test_prefill_logits_match_hf(ckpt, request):
    hf_model, directory = request.getfixturevalue(ckpt)
    model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
    for tokens in prompts(seed=3):
        assert_logits_close(run_chunks(model, config, tokens, [len(tokens)]), hf_logits(hf_model, tokens))


@pytest.mark.parametrize("ckpt", ["llama_ckpt", "qwen2_ckpt"])
def test_chunked_prefill_then_decode_matches_hf(ckpt, request):
    hf_model, directory = request.getfixturevalue(ckpt)
    model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
    tokens = prompts(seed=4, lengths=(30,))[0]
    # two prefill chunks (the second not block aligned), then one token per decode step
    chunk_lens = [9, 14] + [1] * 7
    assert_logits_close(run_chunks(model, config, tokens, chunk_lens), hf_logits(hf_model, tokens))


def test_mixed_batch_matches_separate_sequences(llama_ckpt):
    """A decode token and a prefill chunk of another sequence in one step give each its own logits."""
    hf_model, directory = llama_ckpt
    model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
    first, second = prompts(seed=5, lengths=(11, 6))
    max_len = 16
    caches = make_kv_caches(config, 2 * max_len, torch.float32)
    with torch.inference_mode():
        positions, meta = step_metadata(model, [(0, 10)], max_len)
        model(torch.tensor(first[:10]), positions, caches, meta)
        positions, meta = step_metadata(model, [(10, 1), (0, 6)], max_len)
        logits = model.compute_logits(model(torch.tensor(first[10:] + second), positions, caches, meta))
    assert_logits_close(logits[0], hf_logits(hf_model, first)[-1])
    assert_logits_close(logits[1:], hf_logits(hf_model, second))


def test_output_rows_skip_the_last_mlp_but_not_the_kv_writes(llama_ckpt, monkeypatch):
    """A step that samples only some rows returns just those, equal to HF's; every token's
    K/V still lands in every layer's cache, and the last layer's MLP sees only those rows."""
    hf_model, directory = llama_ckpt
    model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
    first, second = prompts(seed=6, lengths=(13, 9))
    max_len = 16
    mlp_rows = []
    last = model.layers[-1]
    run_mlp = last._mlp
    monkeypatch.setattr(last, "_mlp", lambda x: mlp_rows.append(x.shape[0]) or run_mlp(x))

    def run(rows):
        caches = make_kv_caches(config, 2 * max_len, torch.float32)
        positions, meta = step_metadata(model, [(0, 13), (0, 9)], max_len)
        with torch.inference_mode():
            hidden = model(torch.tensor(first + second), positions, caches, meta, rows)
            return model.compute_logits(hidden), caches

    pruned, pruned_caches = run(torch.tensor([12, 21]))
    full, full_caches = run(None)
    assert mlp_rows == [2, 22]
    assert pruned.shape[0] == 2
    assert_logits_close(pruned[0], hf_logits(hf_model, first)[-1])
    assert_logits_close(pruned[1], hf_logits(hf_model, second)[-1])
    for (k, v), (full_k, full_v) in zip(pruned_caches, full_caches):
        assert torch.equal(k, full_k) and torch.equal(v, full_v)
    none, _ = run(torch.tensor([], dtype=torch.long))
    assert none.shape[0] == 0


@pytest.mark.parametrize("kind", ["auto", "mkl", "onednn"])
def test_float32_cpu_models_pack_their_projections(kind, llama_ckpt, qwen2_ckpt, monkeypatch):
    """The HF comparisons above run through the packed GEMM this host picks (``auto``); each
    library's copies give the unpacked model's logits; bf16 never packs."""
    wanted = gemm_choice.AVAILABLE if kind == "auto" else {kind: gemm_choice.AVAILABLE[kind]}
    if not any(available() for available in wanted.values()):
        pytest.skip(f"this torch build cannot run the packed GEMM ({kind})")
    monkeypatch.setenv(gemm_choice.ENV_VAR, kind)
    tokens = prompts(seed=9, lengths=(13,))[0]
    for _, directory in (llama_ckpt, qwen2_ckpt):  # Qwen2: q/k/v bias through the packed path
        model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
        assert all(set(layer.packed) == {"qkv", "o", "gate_up", "down"} for layer in model.layers)
        assert model.gemm_kind in ({"mkl", "onednn"} if kind == "auto" else {kind})
        assert {p.kind for layer in model.layers for p in layer.packed.values()} == {model.gemm_kind}
        packed_logits = run_chunks(model, config, tokens, [5, 8])
        for layer in model.layers:
            layer.packed = {}
        model.packed_lm_head = None
        torch.testing.assert_close(packed_logits, run_chunks(model, config, tokens, [5, 8]),
                                   rtol=1e-4, atol=1e-4)
    model, _ = load_model(llama_ckpt[1], dtype=torch.bfloat16, backend=get_backend("cpu"))
    assert not model.layers[0].packed and model.packed_lm_head is None


def test_packed_copies_are_skipped_when_memory_is_short(llama_ckpt, monkeypatch, caplog):
    monkeypatch.setattr(packed_gemm, "host_memory_info", lambda: (1 << 20, 1 << 30))  # 1 MiB free
    model, _ = load_model(llama_ckpt[1], dtype=torch.float32, backend=get_backend("cpu"))
    assert not model.layers[0].packed and model.packed_lm_head is None
    assert "not packing the projections" in caplog.text


def test_weights_changed_after_loading_are_not_served_from_stale_packed_copies(llama_ckpt):
    _, directory = llama_ckpt
    model, config = load_model(directory, dtype=torch.float32, backend=get_backend("cpu"))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.5)
    tokens = prompts(seed=8, lengths=(9,))[0]
    after_change = run_chunks(model, config, tokens, [9])
    for layer in model.layers:  # the same model with no packed copies at all
        layer.packed = {}
    model.packed_lm_head = None
    torch.testing.assert_close(after_change, run_chunks(model, config, tokens, [9]))


def test_sharded_checkpoint_loads_to_same_logits(llama_ckpt, tmp_path):
    hf_model, _ = llama_ckpt
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, config = load_model(tmp_path, dtype=None, backend=get_backend("cpu"))
    tokens = prompts(seed=6, lengths=(12,))[0]
    assert_logits_close(run_chunks(model, config, tokens, [12]), hf_logits(hf_model, tokens))


def test_bfloat16_load_is_close_to_float32_reference(llama_ckpt):
    hf_model, directory = llama_ckpt
    model, config = load_model(directory, dtype=torch.bfloat16, backend=get_backend("cpu"))
    assert model.embed_tokens.dtype == torch.bfloat16
    tokens = prompts(seed=7, lengths=(16,))[0]
    ours = run_chunks(model, config, tokens, [10, 6], dtype=torch.bfloat16)
    ref = hf_logits(hf_model, tokens)
    assert ours.dtype == torch.float32
    error = (ours - ref).abs().max() / ref.abs().max()
    assert error < 0.05, f"bf16 logits deviate by {error:.3f} of the logit range"
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_config_reads_llama3_rope_and_qwen2_biases(llama_ckpt, qwen2_ckpt):
    _, llama_dir = llama_ckpt
    _, qwen_dir = qwen2_ckpt
    from worker.loader import load_config

    llama, qwen = load_config(llama_dir), load_config(qwen_dir)
    assert llama.rope_scaling is not None and llama.rope_scaling.rope_type == "llama3"
    assert llama.rope_theta == 500000.0 and llama.eos_token_ids == (2, 3)
    assert (llama.attention_bias, llama.o_proj_bias, llama.tie_word_embeddings) == (False, False, False)
    assert (qwen.attention_bias, qwen.o_proj_bias, qwen.tie_word_embeddings) == (True, False, True)
    assert qwen.head_dim == 16 and qwen.num_key_value_heads == 2


def test_config_accepts_transformers4_rope_keys():
    raw = llama_config().to_dict()
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    raw["architectures"] = ["LlamaForCausalLM"]
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.factor == 8.0


def test_mistral_sliding_window_caps_max_model_len():
    raw = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=512).to_dict()
    raw["architectures"] = ["MistralForCausalLM"]
    config = ModelConfig.from_dict(raw)
    assert config.max_position_embeddings > 512 and config.max_model_len == 512
    # a longer context asked for says why the limit is the window, not the positions
    with pytest.raises(ValueError, match=r"limit of 512 tokens \(its sliding_window: "
                                         r"sliding-window attention is not implemented"):
        config.context_length(1024)


def test_a_sliding_window_caps_max_model_len_without_max_position_embeddings():
    """A config.json that leaves max_position_embeddings out keeps its window, which
    transformers slides, instead of serving 2048 tokens with full attention."""
    raw = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, sliding_window=512).to_dict()
    raw["architectures"] = ["MistralForCausalLM"]
    del raw["max_position_embeddings"]
    config = ModelConfig.from_dict(raw)
    assert config.sliding_window == 512 and config.max_model_len == 512


def test_a_sliding_window_caps_only_where_transformers_slides():
    """transformers' Llama ignores a sliding_window in its config, and a Qwen2 with
    use_sliding_window slides only in layers from max_window_layers on: capping those at the
    window served less context than the model has."""
    stray = {**llama_config().to_dict(), "architectures": ["LlamaForCausalLM"],
             "sliding_window": 64}
    assert ModelConfig.from_dict(stray).sliding_window is None

    def qwen2(**fields):
        raw = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=4,
                                       use_sliding_window=True, sliding_window=64,
                                       **fields).to_dict()
        return {**raw, "architectures": ["Qwen2ForCausalLM"]}

    assert ModelConfig.from_dict(qwen2()).sliding_window is None  # max_window_layers 28 > 4
    assert ModelConfig.from_dict(qwen2(max_window_layers=2)).sliding_window == 64
    older = qwen2(max_window_layers=2)
    del older["layer_types"]  # a config.json from transformers before layer_types
    assert ModelConfig.from_dict(older).sliding_window == 64
    del older["max_window_layers"]
    assert ModelConfig.from_dict(older).sliding_window is None
    # layer_types that slide, but use_sliding_window off: transformers drops the window
    assert ModelConfig.from_dict({**qwen2(max_window_layers=2),
                                  "use_sliding_window": False}).sliding_window is None


def test_swish_is_silu():
    raw = {**llama_config().to_dict(), "architectures": ["LlamaForCausalLM"],
           "hidden_act": "swish"}
    assert ModelConfig.from_dict(raw).num_hidden_layers > 0


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, ["yarn", "llama3"]),
        ({"hidden_act": "gelu"}, ["gelu"]),
    ],
)
def test_unsupported_models_are_named(change, words):
    raw = {**llama_config().to_dict(), "architectures": ["LlamaForCausalLM"], **change}
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_dict(raw)
    for word in words:
        assert word in str(err.value)


def test_kv_cache_count_is_checked(llama_ckpt):
    _, directory = llama_ckpt
    model, config = load_model(directory, backend=get_backend("cpu"))
    positions, meta = step_metadata(model, [(0, 3)], 4)
    with pytest.raises(ValueError, match="KV caches"):
        model(torch.tensor([1, 2, 3]), positions, make_kv_caches(config, 4, torch.float32)[:1], meta)


def test_tiny_checkpoint_is_a_real_hf_checkpoint(tmp_path):
    """transformers loads the built-in tiny model and computes the same logits as we do."""
    from worker.models import tiny

    tiny.write_tiny_checkpoint(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model, config = load_model(tmp_path, backend=get_backend("cpu"))
    tokens = list(b"Hello, tiny model!")
    ref = hf_logits(hf_model, tokens)
    torch.testing.assert_close(run_chunks(model, config, tokens, [10, 8]), ref, atol=1e-3, rtol=1e-4)
    # peaky enough that the greedy choice depends on the context
    assert len(set(ref.argmax(-1).tolist())) > len(tokens) // 2

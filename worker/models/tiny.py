"""The built-in tiny model: a deterministic random Llama checkpoint in HF format, written once to a cache dir."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from worker.tokenizer import byte_level_chars

TINY_VERSION = "tiny-v1"
CACHE_ENV = "PAGEDSERVE_CACHE"
SEED = 20240611

BOS, EOS = "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, *ROLE_TOKENS)
NUM_BYTES = 256  # byte-level vocabulary: token id == byte value

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": NUM_BYTES + len(SPECIAL_TOKENS),
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": NUM_BYTES,
    "eos_token_id": NUM_BYTES + 1,
    "dtype": "float32",
}

# Init scales. Random weights at the usual 0.02 give flat logits and greedy loops on one token;
# a larger lm_head makes the argmax depend sharply on the hidden state, so text varies by prompt.
EMBED_STD = 1.0
PROJ_GAIN = 1.0  # std = gain / sqrt(fan_in)
LM_HEAD_STD = 0.5
PRINTABLE = range(0x20, 0x7F)


def tiny_model_dir() -> Path:
    """The tiny checkpoint directory, written on first use; safe against concurrent writers."""
    target = cache_root() / TINY_VERSION
    if not (target / "config.json").is_file():
        write_tiny_checkpoint_atomically(target)
    return target


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedserve"


def write_tiny_checkpoint_atomically(target: Path) -> None:
    """Write into a temp dir beside ``target`` and rename it into place; a losing racer discards its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out
        write_tiny_checkpoint(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_tiny_checkpoint(directory: Path) -> None:
    """config.json, model.safetensors, tokenizer files and generation_config.json into ``directory``."""
    _write_json(directory / "config.json", TINY_CONFIG)
    _write_json(directory / "generation_config.json", {"bos_token_id": NUM_BYTES, "eos_token_id": NUM_BYTES + 1})
    save_file(tiny_weights(), str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_tokenizer(directory)


def write_tiny_tokenizer(directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json (BOS/EOS, chat template) into ``directory``."""
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def byte_level_tokenizer() -> Tokenizer:
    """BPE over the 256 byte symbols with no merges, plus the special tokens after them."""
    byte_chars = byte_level_chars()
    vocab = {byte_chars[b]: b for b in range(NUM_BYTES)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, NUM_BYTES)]
    )
    return tokenizer


def tiny_weights() -> dict[str, torch.Tensor]:
    """Deterministic HF-named float32 tensors for TINY_CONFIG."""
    c = TINY_CONFIG
    gen = torch.Generator().manual_seed(SEED)
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]

    def proj(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * (PROJ_GAIN / in_features**0.5)

    weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen) * EMBED_STD}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": torch.ones(hidden),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{p}.self_attn.q_proj.weight": proj(q, hidden),
            f"{p}.self_attn.k_proj.weight": proj(kv, hidden),
            f"{p}.self_attn.v_proj.weight": proj(kv, hidden),
            f"{p}.self_attn.o_proj.weight": proj(hidden, q),
            f"{p}.mlp.gate_proj.weight": proj(inter, hidden),
            f"{p}.mlp.up_proj.weight": proj(inter, hidden),
            f"{p}.mlp.down_proj.weight": proj(hidden, inter),
        }
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = _lm_head(vocab, hidden, gen)
    return {name: t.contiguous() for name, t in weights.items()}


def _lm_head(vocab: int, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows for printable ASCII; zero rows elsewhere so greedy text stays readable gibberish.

    EOS gets a small row so that sampled runs end now and then but greedy ones rarely stop early.
    """
    head = torch.zeros(vocab, hidden)
    rows = torch.randn(vocab, hidden, generator=gen) * LM_HEAD_STD
    printable = torch.tensor(list(PRINTABLE) + [ord("\n")])
    head[printable] = rows[printable]
    eos = NUM_BYTES + 1
    head[eos] = rows[eos] * 0.5
    return head

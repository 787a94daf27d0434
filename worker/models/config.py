"""ModelConfig: the architecture facts pagedserve needs, parsed from a Hugging Face config.json."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from worker.tokenizer import token_ids_of

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")

# Used only when a config.json lacks "architectures" (e.g. one written by PretrainedConfig alone).
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this package cannot run."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """A rotary-embedding frequency rescaling: "linear" or Llama-3's "llama3"."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype | None  # the checkpoint's declared dtype, if any
    sliding_window: int | None = None

    @property
    def max_model_len(self) -> int:
        """Longest sequence we serve correctly.

        Sliding-window attention is not implemented: full attention equals it only while the
        sequence fits in the window, so a smaller window caps the length.
        """
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dict (transformers 4 or 5 key names)."""
        try:
            config = cls._parse(raw)
        except UnsupportedModelError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a value of another type
            raise UnsupportedModelError(f"config.json holds a malformed value: {exc}") from None
        config._validate()
        return config

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(raw)
        _check_not_quantized(raw)
        _check_activation_and_mlp(raw)
        heads = _positive_int(raw, "num_attention_heads")
        hidden = _positive_int(raw, "hidden_size")
        rope_theta, rope_scaling = _rope(raw)
        max_positions = _positive_int(raw, "max_position_embeddings", 2048)
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        llama_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=_positive_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(raw, "intermediate_size"),
            num_hidden_layers=_positive_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_positive_int(raw, "num_key_value_heads", heads),
            head_dim=_positive_int(raw, "head_dim", hidden // heads),
            rms_norm_eps=_number(raw, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen2 else llama_bias,
            o_proj_bias=False if is_qwen2 else llama_bias,
            bos_token_id=_token_id_or_none(raw, "bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
            dtype=_dtype(raw),
            sliding_window=_sliding_window(raw, architecture, max_positions),
        )

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def context_length(self, requested: int | None) -> int:
        """The context length to serve: the model's own unless a shorter one is asked for. A
        longer one is refused: positions past what the model was built for give garbage."""
        if requested is None:
            return self.max_model_len
        if requested > self.max_model_len:
            raise ValueError(f"max_model_len={requested} exceeds this model's limit of "
                             f"{self.max_model_len} tokens{self.window_note}; leave it unset "
                             "or lower it")
        return requested

    @property
    def window_note(self) -> str:
        """Why the limit is below the model's positions, if it is: its sliding window."""
        if self.max_model_len < self.max_position_embeddings:
            return (f" (its sliding_window: sliding-window attention is not implemented, and "
                    f"full attention equals it only up to {self.sliding_window} tokens)")
        return ""


def _positive_int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """``raw[key]``, which must be an integer >= 1; ``default`` when absent, null or 0 (as
    transformers reads an unset head_dim), required when there is no default."""
    value = raw.get(key)
    if value in (None, 0) and default is not None:
        return default
    if value is None:
        raise UnsupportedModelError(f"config.json has no {key!r}")
    if isinstance(value, float) and value.is_integer():  # 8192.0: written so by some configs
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"config.json {key}={value!r}: must be an integer >= 1")
    return value


def _token_id_or_none(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UnsupportedModelError(f"config.json {key}={value!r}: must be a token id")
    return value


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise UnsupportedModelError(f"config.json architectures={names!r}: must be a list of "
                                    "class names")
    if not names and raw.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        names = [_ARCHITECTURE_BY_MODEL_TYPE[raw["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    shown = ", ".join(names) or f"model_type={raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported model architecture {shown}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_not_quantized(raw: dict[str, Any]) -> None:
    """Quantized weights would load as garbage (FP8 tensors cast as if they were values, their
    scales dropped), or fail naming tensors that are merely stored under other names."""
    quant = raw.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise UnsupportedModelError(f"config.json has a quantization_config (quant_method "
                                    f"{method!r}): quantized checkpoints are not supported")


def _check_activation_and_mlp(raw: dict[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # one function: transformers maps both names to SiLU
        raise UnsupportedModelError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
    if raw.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported; MLP projections must be bias-free")


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from transformers 5 `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise UnsupportedModelError(f"config.json {key}={value!r}: must be an object")
        params.update(value)
    theta = _number(params, "rope_theta", None) if "rope_theta" in params else \
        _number(raw, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise UnsupportedModelError(f"rope scaling {rope_type!r} needs a 'factor'")
    scaling = RopeScaling(rope_type=rope_type, factor=_number(params, "factor", where="rope "))
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in params]
        if missing:
            raise UnsupportedModelError(f"llama3 rope scaling is missing {', '.join(missing)}")
        scaling = RopeScaling(
            rope_type="llama3",
            factor=_number(params, "factor", where="rope "),
            low_freq_factor=_number(params, "low_freq_factor", where="rope "),
            high_freq_factor=_number(params, "high_freq_factor", where="rope "),
            original_max_position_embeddings=_positive_int(params,
                                                           "original_max_position_embeddings"),
        )
        if scaling.high_freq_factor <= scaling.low_freq_factor:
            raise UnsupportedModelError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


def _number(params: dict[str, Any], key: str, default: float | None = None, *,
            where: str = "") -> float:
    """``params[key]``, a number > 0 (``default`` when absent or null); ``where`` names its
    section in the error ("rope ")."""
    value = params.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UnsupportedModelError(f"config.json {where}{key}={value!r}: must be a number > 0")
    return float(value)


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    ids = token_ids_of(value)
    if ids is None:
        raise UnsupportedModelError(f"config.json eos_token_id={value!r}: must be a token id "
                                    "or a list of them")
    return ids


def _dtype(raw: dict[str, Any]) -> torch.dtype | None:
    """The dtype the checkpoint declares, the default to run in; one pagedserve does not run in
    (float64, say) leaves the choice to the caller, who may name a dtype anyway."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except UnsupportedModelError:
        log.warning("config.json dtype %r is not one pagedserve runs in (%s): float32 unless "
                    "a dtype is given", name, ", ".join(_DTYPES))
        return None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A supported model dtype from its name ("bfloat16") or a torch.dtype."""
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        name = str(name)
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise UnsupportedModelError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _sliding_window(raw: dict[str, Any], architecture: str, max_positions: int) -> int | None:
    """The attention window, where it is shorter than the positions served (``max_positions``,
    the parsed max_position_embeddings: a config.json without one still has its window)."""
    if architecture == "LlamaForCausalLM" or raw.get("sliding_window") is None:
        return None  # transformers' Llama ignores a sliding_window in its config
    if architecture == "Qwen2ForCausalLM" and not _qwen2_slides(raw):
        return None
    window = _positive_int(raw, "sliding_window")
    return None if window >= max_positions else window


def _qwen2_slides(raw: dict[str, Any]) -> bool:
    """Whether any Qwen2 layer slides, as transformers reads it: only with
    ``use_sliding_window`` (else it drops the window), the layers its ``layer_types`` name
    so, or without those the layers from ``max_window_layers`` on."""
    if not raw.get("use_sliding_window", False):
        return False
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list):
        return "sliding_attention" in layer_types
    first_sliding = raw.get("max_window_layers", 28)
    if not isinstance(first_sliding, int) or isinstance(first_sliding, bool):
        raise UnsupportedModelError(f"config.json max_window_layers={first_sliding!r}: must "
                                    "be an integer")
    return first_sliding < _positive_int(raw, "num_hidden_layers")

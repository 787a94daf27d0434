"""Rotary position embeddings (rotate-half layout) with linear and Llama-3 frequency scaling."""
from __future__ import annotations

import math

import torch

from worker.models.config import ModelConfig, RopeScaling


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for i < head_dim / 2, in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaling: long wavelengths slowed by ``factor``, short kept, a smooth ramp between."""
    old_len = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = old_len / s.low_freq_factor
    short_wavelen = old_len / s.high_freq_factor
    slowed = torch.where(wavelen > long_wavelen, inv_freq / s.factor, inv_freq)
    ramp = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - ramp) * slowed / s.factor + ramp * slowed
    in_between = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_between, blended, slowed)


def scaled_inv_freq(config: ModelConfig) -> torch.Tensor:
    inv_freq = base_inv_freq(config.head_dim, config.rope_theta)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    assert s.rope_type == "llama3", s.rope_type
    return llama3_inv_freq(inv_freq, s)


class RotaryEmbedding:
    """Holds the inverse-frequency table; yields per-step cos/sin for the packed positions."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = scaled_inv_freq(config)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and sign-folded ``sin``, each ``[T, 1, head_dim]``, for :func:`apply_rotary`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        cos_full = torch.cat((cos, cos), dim=-1).to(dtype)
        sin_signed = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos_full.unsqueeze(1), sin_signed.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``[T, heads, head_dim]``.

    rotate_half(x) * sin == roll(x, d/2) * [-sin, sin], so the whole rotation is one roll and one
    fused multiply-add.
    """
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, rolled, sin_signed)

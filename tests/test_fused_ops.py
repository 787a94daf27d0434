"""Fused decoder ops (residual add + RMSNorm, SiLU-and-multiply, rotary embedding) against the
plain torch ops."""
import pytest
import torch
import torch.nn.functional as F

from worker.models.fused_ops import PARALLEL_MIN_ROWS, add_rms_norm, rotate_qk, silu_mul
from worker.models.rope import apply_rotary, base_inv_freq

ROWS = (1, 7, PARALLEL_MIN_ROWS + 3)  # single-threaded and parallel kernels


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_matches_add_then_rms_norm(rows):
    g = torch.Generator().manual_seed(rows)
    residual = torch.randn(rows, 96, generator=g) * 3
    delta = torch.randn(rows, 96, generator=g)
    weight = torch.rand(96, generator=g) + 0.5
    expected_sum = residual + delta
    expected = F.rms_norm(expected_sum, (96,), weight, 1e-6)
    out = add_rms_norm(residual, delta, weight, 1e-6)
    assert torch.equal(residual, expected_sum)  # the residual stream is updated in place
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_matches_silu_of_gate_times_up(rows):
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 80, generator=g) * 6
    gate_up[0, :4] = torch.tensor([0.0, -0.0, 100.0, -100.0])  # sigmoid's saturated ends
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", ROWS)
def test_rotate_qk_matches_apply_rotary_of_the_fused_qkv(rows):
    """q and k as they sit in the fused qkv output, each rotated into its own tensor."""
    g = torch.Generator().manual_seed(rows)
    heads, kv_heads, head_dim = 4, 2, 32
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, -1, head_dim)
    angles = torch.arange(rows).float()[:, None] * base_inv_freq(head_dim, 10000.0)[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).unsqueeze(1)
    sin_signed = torch.cat((-angles.sin(), angles.sin()), dim=-1).unsqueeze(1)
    q, k = rotate_qk(qkv, cos, sin_signed, heads, kv_heads)
    assert q.is_contiguous() and k.is_contiguous()
    expected = apply_rotary(qk, cos, sin_signed)
    torch.testing.assert_close(q, expected[:, :heads], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, expected[:, heads:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_take_the_torch_ops_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    residual, delta = torch.randn(5, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    weight = torch.rand(64, generator=g).to(dtype)
    expected_sum = residual + delta
    expected = (F.rms_norm(expected_sum.float(), (64,), eps=1e-5).to(dtype) * weight)
    assert torch.equal(add_rms_norm(residual, delta, weight, 1e-5), expected)
    gate, up = expected_sum.chunk(2, dim=-1)
    assert torch.equal(silu_mul(expected_sum), F.silu(gate) * up)

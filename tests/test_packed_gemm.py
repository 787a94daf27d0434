"""MKL packed-weight GEMM against torch's matmul: both weight layouts, bias, the row limit, and a
weight changed after packing."""
import pytest
import torch

from worker.models.packed_gemm import PACKED_MAX_ROWS, available, pack

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no MKL packed GEMM")

ROWS = (1, 7, 48, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1)  # the last one takes torch's path


def _weights(transposed: bool) -> torch.Tensor:
    """A [in=96, out=40] weight: contiguous, or the transpose of a contiguous [out, in] one."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 96, generator=g).t() if transposed else torch.randn(96, 40, generator=g)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_packed_matmul_matches_torch(rows, transposed):
    weight = _weights(transposed)
    packed = pack(weight)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(40)
    bias_before = bias.clone()
    torch.testing.assert_close(packed.matmul(x), x @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.matmul(x, bias), torch.addmm(bias, x, weight),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(bias, bias_before)  # the bias seeds the output; it is never written


def test_weight_changed_after_packing_is_used_as_it_is_now():
    weight = _weights(False)
    packed = pack(weight)
    x = torch.randn(5, 96)
    weight.mul_(2)
    torch.testing.assert_close(packed.matmul(x), x @ weight, rtol=1e-5, atol=1e-5)


def test_only_float32_cpu_weights_in_a_readable_layout_are_packed():
    assert pack(_weights(False).to(torch.bfloat16)) is None
    assert pack(torch.randn(96, 80)[:, ::2]) is None  # strided columns: MKL cannot read it

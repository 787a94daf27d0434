"""MKL's and oneDNN's packed-weight GEMM against torch's matmul: both weight layouts, bias, MKL's
row limit, and a weight changed after packing."""
import pytest
import torch

from worker.models import onednn_gemm, packed_gemm
from worker.models.packed_gemm import PACKED_MAX_ROWS

ROWS = (1, 7, 48, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1)  # past the limit MKL takes torch's path
PACKERS = [
    pytest.param(packed_gemm, marks=pytest.mark.skipif(
        not packed_gemm.available(), reason="this torch build has no MKL packed GEMM"), id="mkl"),
    pytest.param(onednn_gemm, marks=pytest.mark.skipif(
        not onednn_gemm.available(), reason="this torch build has no oneDNN linear"), id="onednn"),
]


def _weights(transposed: bool) -> torch.Tensor:
    """A [in=96, out=40] weight: contiguous, or the transpose of a contiguous [out, in] one."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 96, generator=g).t() if transposed else torch.randn(96, 40, generator=g)


@pytest.mark.parametrize("library", PACKERS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_packed_matmul_matches_torch(library, rows, transposed):
    weight = _weights(transposed)
    packed = library.pack(weight)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(40)
    bias_before = bias.clone()
    torch.testing.assert_close(packed.matmul(x), x @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.matmul(x, bias), torch.addmm(bias, x, weight),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(bias, bias_before)  # the bias seeds MKL's output; it is never written


@pytest.mark.parametrize("library", PACKERS)
def test_weight_changed_after_packing_is_used_as_it_is_now(library):
    weight = _weights(False)
    packed = library.pack(weight)
    x = torch.randn(5, 96)
    weight.mul_(2)
    torch.testing.assert_close(packed.matmul(x), x @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", PACKERS)
def test_inputs_the_packed_path_does_not_take_fall_back_to_torch(library):
    weight = _weights(False)
    packed = library.pack(weight)
    strided = torch.randn(5, 192)[:, ::2]
    torch.testing.assert_close(packed.matmul(strided), strided @ weight, rtol=1e-5, atol=1e-5)
    assert packed.matmul(torch.randn(0, 96)).shape == (0, 40)


def test_only_float32_cpu_weights_are_packed():
    for library in (packed_gemm, onednn_gemm):
        assert library.pack(_weights(False).to(torch.bfloat16)) is None
    if packed_gemm.available():
        assert packed_gemm.pack(torch.randn(96, 80)[:, ::2]) is None  # strided columns: MKL cannot read it

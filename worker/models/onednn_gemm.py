"""Float32 projections through oneDNN's packed weights on the CPU: each weight is reordered once
into oneDNN's blocked layout (torch's mkldnn ops) and every batch multiplies against that copy."""
from __future__ import annotations

import functools
import logging

import torch

from worker.models.packed_gemm import first_disagreement, plain_matmul

log = logging.getLogger("pagedserve.onednn_gemm")

# The row count oneDNN is told when reordering; the packed copy serves every row count. On an
# AMD EPYC host, 8 layers of the benchmark model took about the same time packed for 16, 128
# or 2048 rows, at 8 to 2048 rows.
PACKED_FOR_ROWS = 128
# A single row goes through torch's plain matmul on the source weight (MKL's matrix-vector
# path) instead: 8 layers of the benchmark model at 1 row, 1 thread, took 13.1 ms through
# oneDNN against 8.7 ms; at 2 rows they were even, from 4 rows oneDNN was 1.5x faster.
PLAIN_MAX_ROWS = 1


class OneDnnWeight:
    """One ``[in, out]`` float32 weight reordered for oneDNN's ``x @ weight``.

    The source weight is kept: a single row, an input oneDNN's path does not take, or a weight
    changed in place after packing (its version counter moved), uses it directly.
    """

    kind = "onednn"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.in_features, self.out_features = weight.shape
        # oneDNN reorders a contiguous [out, in] weight, torch.nn.Linear's layout
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), PACKED_FOR_ROWS)
        self._version = weight._version

    def accepts(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.shape[0] > PLAIN_MAX_ROWS and x.shape[1] == self.in_features
                and x.dtype == torch.float32 and x.is_contiguous()
                and self.weight._version == self._version)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight (+ bias)``; through torch for inputs the packed path does not take."""
        if not self.accepts(x):
            return plain_matmul(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack(weight: torch.Tensor) -> OneDnnWeight | None:
    """Reorder a float32 CPU ``[in, out]`` weight for oneDNN; None where this torch lacks it."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not available():
        return None
    return OneDnnWeight(weight)


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN's linear ops and they give torch's results here:
    checked once per process on a small case, with and without a bias."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 40, generator=gen), torch.randn(40, generator=gen)
    try:
        packed = OneDnnWeight(weight)
        rows = first_disagreement(packed, weight) or first_disagreement(packed, weight, bias)
    except RuntimeError as error:  # a build whose mkldnn ops reject these arguments
        log.warning("oneDNN's packed linear is unusable here (%s); not using it", error)
        return False
    if rows is not None:
        log.warning("oneDNN's packed linear disagrees with torch at %d rows; not using it", rows)
        return False
    return True

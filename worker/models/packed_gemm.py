"""Float32 projections through MKL's packed-weight GEMM on the CPU: each weight is packed into
MKL's internal layout once, instead of inside every matmul call."""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from worker.device import host_memory_info

log = logging.getLogger("pagedserve.packed_gemm")

# Batches up to this many rows use the packed weights. A plain matmul re-packs the weight on
# every call, a large share of the work at decode sizes. 8 layers of this repository's benchmark
# model (hidden 512), packed / plain time: 0.83 at 8 rows, 0.84 at 48, 0.84 at 128, 0.88 at 256;
# at 512 rows and more it was 0.9-1.05, within this host's noise.
PACKED_MAX_ROWS = 256
# The row count MKL is told when packing: it picks the packed blocking for it. Packing for 128
# was as fast as packing for the exact count from 8 to 256 rows; for 16 it was 13% slower at
# 128 rows, and for a huge count 1.4-1.7x slower than no packing at all.
PACKED_FOR_ROWS = 128
# A model's packed copies are resident memory the size of its weights; they are skipped when
# they would take more than this share of the host's available memory.
PACKED_MEMORY_SHARE = 0.25

# cblas enum values (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162


class PackedWeight:
    """One ``[in, out]`` float32 weight (any strides MKL can read) packed for ``x @ weight``.

    MKL's packed buffer must never move, so it lives in a tensor this object alone owns. The
    source weight is kept: a batch too large for the packed path, or a weight changed in place
    after packing (its version counter moved), uses it directly.
    """

    kind = "mkl"

    def __init__(self, weight: torch.Tensor, buffer: torch.Tensor) -> None:
        self.weight = weight
        self.buffer = buffer
        self.in_features, self.out_features = weight.shape
        self._version = weight._version

    def accepts(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS and x.dtype == torch.float32
                and x.is_contiguous() and x.shape[1] == self.in_features
                and self.weight._version == self._version)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight (+ bias)``; falls back to torch for inputs the packed path does not take."""
        if not self.accepts(x):
            return plain_matmul(x, self.weight, bias)
        rows, n = x.shape[0], self.out_features
        out = torch.empty(rows, n)
        if bias is not None:
            out.copy_(bias)  # MKL adds the product to it (beta 1)
        _mkl().cblas_sgemm_compute(
            _ROW_MAJOR, _NO_TRANS, _PACKED, rows, n, self.in_features,
            x.data_ptr(), self.in_features, self.buffer.data_ptr(), n,
            0.0 if bias is None else 1.0, out.data_ptr(), n,
        )
        return out


def plain_matmul(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight (+ bias)`` through torch, for an ``[in, out]`` weight."""
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def pack(weight: torch.Tensor) -> PackedWeight | None:
    """Pack a float32 CPU ``[in, out]`` weight (contiguous, or the transpose of a contiguous
    ``[out, in]`` one); None where MKL's packed GEMM is unavailable or cannot read that layout."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not available():
        return None
    return _pack(weight)


def affordable(nbytes: int) -> bool:
    """Whether packed copies of ``nbytes`` of weights fit the memory share; warns if not."""
    free, _ = host_memory_info()
    if nbytes <= PACKED_MEMORY_SHARE * free:
        return True
    log.warning("not packing the projections: the copies would take %.2f GiB of the "
                "%.2f GiB available; matmuls re-pack each call (slower decode)",
                nbytes / 2**30, free / 2**30)
    return False


@functools.cache
def available() -> bool:
    """Whether torch's MKL exports the packed GEMM and it gives torch's results here: checked
    once per process on a small case, at row counts other than the one packed for (MKL's packed
    layout of a weight does not depend on the row count; this confirms it)."""
    if _mkl() is None:
        return False
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    rows = first_disagreement(_pack(weight), weight)
    if rows is not None:
        log.warning("MKL packed GEMM disagrees with torch at %d rows; not using it", rows)
        return False
    return True


def first_disagreement(packed, weight: torch.Tensor, bias: torch.Tensor | None = None) -> int | None:
    """The first of a few row counts at which ``packed.matmul`` does not give torch's
    ``x @ weight (+ bias)`` on random inputs; None when it agrees at all of them."""
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 5, 37):
        x = torch.randn(rows, weight.shape[0], generator=gen)
        if not torch.allclose(packed.matmul(x, bias), plain_matmul(x, weight, bias),
                              rtol=1e-5, atol=1e-5):
            return rows
    return None


def _pack(weight: torch.Tensor) -> PackedWeight | None:
    k, n = weight.shape
    if weight.stride() == (n, 1):
        trans, ld = _NO_TRANS, n
    elif weight.stride() == (1, k):
        trans, ld = _TRANS, k
    else:
        return None
    lib = _mkl()
    size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, PACKED_FOR_ROWS, n, k)
    buffer = torch.empty(-(-size // 4), dtype=torch.float32)
    lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, trans, PACKED_FOR_ROWS, n, k, 1.0,
                         weight.data_ptr(), ld, buffer.data_ptr())
    return PackedWeight(weight, buffer)


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """torch's own MKL (linked into libtorch_cpu), or None where this torch build has none."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(library))
        get_size, do_pack, compute = (lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack,
                                      lib.cblas_sgemm_compute)
    except (OSError, AttributeError):
        return None
    c_int, c_float, c_ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype = ctypes.c_size_t
    get_size.argtypes = [c_int] * 4
    do_pack.restype = None
    do_pack.argtypes = [c_int] * 6 + [c_float, c_ptr, c_int, c_ptr]
    compute.restype = None
    compute.argtypes = [c_int] * 6 + [c_ptr, c_int, c_ptr, c_int, c_float, c_ptr, c_int]
    return lib

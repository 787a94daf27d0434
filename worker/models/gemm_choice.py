"""Which packed-weight GEMM a CPU float32 model uses: MKL's or oneDNN's, whichever multiplies a
sample of the model's own projections faster on this host, or the one ``PAGEDSERVE_CPU_GEMM``
names."""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Callable, Protocol

import torch

from worker.models import onednn_gemm, packed_gemm

log = logging.getLogger("pagedserve.gemm_choice")

ENV_VAR = "PAGEDSERVE_CPU_GEMM"
SETTINGS = ("auto", "mkl", "onednn", "none")
# Neither library wins everywhere: at decode sizes, oneDNN's packed weights took 0.48-0.77x
# MKL's time on an AMD EPYC host (8 layers of the benchmark model, 8-128 rows, 2 threads),
# while on an earlier development host MKL's packed GEMM ran 48-row batches 1.85x faster than
# oneDNN's linear. So the choice is timed at load.
SAMPLE_BYTES = 32 * 2**20  # about a last-level cache: weights stream much as in a real step
SAMPLE_MAX_BYTES_EACH = 8 * 2**20
SAMPLE_ROWS = 32  # a decode batch: the steps an engine runs most, and where the two differ most
TIMING_ROUNDS = 7
# oneDNN replaces MKL only when faster by a margin, so processes on hosts where the two are
# close tend to keep one choice rather than flip with the host's noise. On the AMD host the
# ratio in 5 choices was 0.58-0.64 at 2 threads and 0.77-0.87 at 1.
ONEDNN_MAX_TIME_RATIO = 0.95


class PackedProjection(Protocol):
    kind: str
    in_features: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


Packer = Callable[[torch.Tensor], "PackedProjection | None"]
PACKERS: dict[str, Packer] = {"mkl": packed_gemm.pack, "onednn": onednn_gemm.pack}
AVAILABLE = {"mkl": packed_gemm.available, "onednn": onednn_gemm.available}


def setting() -> str:
    """``PAGEDSERVE_CPU_GEMM``, checked: ``auto`` when unset."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(SETTINGS)}")
    return value


def choose_packer(projections: list[torch.Tensor]) -> Packer | None:
    """The packer for a model whose ``[in, out]`` float32 CPU projections are given (in layer
    order); None means plain torch matmuls."""
    wanted = setting()
    if wanted == "none":
        return None
    if wanted != "auto":
        if not AVAILABLE[wanted]():
            log.warning("%s=%s, but this torch build cannot run it; using torch's matmul", ENV_VAR, wanted)
            return None
        return PACKERS[wanted]
    usable = [kind for kind in PACKERS if AVAILABLE[kind]()]
    if len(usable) < 2:
        return PACKERS[usable[0]] if usable else None
    ratio = onednn_time_ratio(_sample(projections))
    kind = "onednn" if ratio <= ONEDNN_MAX_TIME_RATIO else "mkl"
    log.info("CPU GEMM: %s packed weights (oneDNN took %.2fx MKL's time on a sample of this "
             "model's projections)", kind, ratio)
    return PACKERS[kind]


@torch.inference_mode()
def onednn_time_ratio(sample: list[torch.Tensor]) -> float:
    """oneDNN's time over MKL's to multiply every sampled weight at ``SAMPLE_ROWS`` rows: the
    median of a few rounds, in each of which both run back to back, so drift in the host's
    speed hits both alike."""
    packed = {kind: [PACKERS[kind](w) for w in sample] for kind in PACKERS}
    inputs = {w.shape[0]: torch.randn(SAMPLE_ROWS, w.shape[0]) for w in sample}
    ratios = []
    for round_ in range(TIMING_ROUNDS + 1):  # the first round only warms up
        seconds = {}
        for kind in (list(PACKERS) if round_ % 2 else list(reversed(PACKERS))):
            start = time.perf_counter()
            for weight in packed[kind]:
                weight.matmul(inputs[weight.in_features])
            seconds[kind] = time.perf_counter() - start
        if round_:
            ratios.append(seconds["onednn"] / seconds["mkl"])
    return statistics.median(ratios)


def _sample(projections: list[torch.Tensor]) -> list[torch.Tensor]:
    """Projections in order until ``SAMPLE_BYTES``, each cut to its first columns so that no
    one weight takes more than ``SAMPLE_MAX_BYTES_EACH``."""
    sample, total = [], 0
    for weight in projections:
        row_bytes = weight.shape[0] * weight.element_size()
        columns = max(1, min(weight.shape[1], SAMPLE_MAX_BYTES_EACH // row_bytes))
        sample.append(weight[:, :columns].contiguous())
        total += sample[-1].nbytes
        if total >= SAMPLE_BYTES:
            break
    return sample

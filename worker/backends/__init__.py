"""Attention backends: one per device kind, all implementing worker.attention.AttentionBackend."""
from __future__ import annotations

from worker.attention import AttentionBackend

BACKEND_NAMES = ("cpu", "npu", "cuda")


def get_backend(name: str, device_index: int = 0) -> AttentionBackend:
    """The backend for a device kind; imports device libraries only when asked for."""
    if name == "cpu":
        from worker.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "npu":
        from worker.backends.npu import NpuBackend

        return NpuBackend(device_index)
    if name == "cuda":
        from worker.backends.cuda import CudaBackend

        return CudaBackend(f"cuda:{device_index}")
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(BACKEND_NAMES)}")

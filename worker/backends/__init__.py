"""Attention backends: one per device kind, all implementing worker.attention.AttentionBackend."""
from __future__ import annotations

from worker.attention import AttentionBackend

BACKEND_NAMES = ("cpu", "npu", "cuda")


def get_backend(name: str, device_index: int = 0) -> AttentionBackend:
    """The backend for a device kind; imports device libraries only when asked for."""
    if name == "cpu":
        from worker.backends.cpu import CpuBackend

        return CpuBackend()
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(BACKEND_NAMES)}")

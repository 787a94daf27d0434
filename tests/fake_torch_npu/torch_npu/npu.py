"""The fake ``torch_npu.npu`` runtime namespace: devices map to the CPU. Tests only.

Memory figures are simulated: ``mem_get_info`` reports FAKE_NPU_TOTAL_BYTES (default 1 GiB) free
and total, and ``max_memory_allocated`` reports 0, because CPU tensors are not tracked per device.
"""
from __future__ import annotations

import os


def device_count() -> int:
    return int(os.environ.get("FAKE_NPU_DEVICE_COUNT", "8"))


def is_available() -> bool:
    return device_count() > 0


_current = 0


def set_device(device) -> None:
    global _current
    index = device if isinstance(device, int) else int(str(device).rpartition(":")[2] or 0)
    if not 0 <= index < device_count():
        raise RuntimeError(f"npu:{index} does not exist ({device_count()} fake devices)")
    _current = index


def current_device() -> int:
    return _current


def synchronize(device=None) -> None:
    """Work on the fake runs eagerly on the CPU, so there is nothing to wait for."""


def _total_bytes() -> int:
    return int(os.environ.get("FAKE_NPU_TOTAL_BYTES", str(1 << 30)))


def mem_get_info(device=None) -> tuple[int, int]:
    return _total_bytes(), _total_bytes()


def empty_cache() -> None:
    pass


def reset_peak_memory_stats(device=None) -> None:
    pass


def max_memory_allocated(device=None) -> int:
    return 0


def memory_stats(device=None) -> dict:
    return {}

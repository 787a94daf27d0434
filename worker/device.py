"""Device handling for cpu, npu and cuda: memory figures, synchronisation, step timing, KV sizing.

The npu branch talks to ``torch_npu.npu`` through worker/backends/npu.py, the one module that
imports torch_npu; no Ascend hardware was available when this was written, so that branch is
checked only against the fake in tests/fake_torch_npu.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

DEVICE_KINDS = ("cpu", "npu", "cuda")
# Ray exports the NPU ids it grants an actor in this variable, unless told not to by the second.
ASCEND_VISIBLE_ENV = "ASCEND_RT_VISIBLE_DEVICES"
RAY_NOSET_ASCEND_ENV = "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"


class DeviceUnavailableError(RuntimeError):
    """The requested device kind cannot be used on this host; the message says what to install."""


@dataclass(slots=True)
class Device:
    """One accelerator (or the host CPU) as the engine sees it."""

    kind: str
    index: int
    torch_device: torch.device
    # torch.cuda or torch_npu.npu: the per-kind runtime namespace; None on cpu.
    runtime: ModuleType | None = None

    @classmethod
    def create(cls, kind: str, index: int = 0) -> Device:
        if kind == "cpu":
            return cls("cpu", index, torch.device("cpu"))
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise DeviceUnavailableError(
                    "no CUDA device is visible: install a CUDA build of torch and check nvidia-smi"
                )
            return cls("cuda", index, torch.device("cuda", index), torch.cuda)
        if kind == "npu":
            from worker.backends.npu import import_torch_npu, npu_torch_device

            torch_npu = import_torch_npu()
            torch_npu.npu.set_device(index)
            return cls("npu", index, npu_torch_device(torch_npu, index), torch_npu.npu)
        raise ValueError(f"unknown device kind {kind!r}; choose one of {', '.join(DEVICE_KINDS)}")

    def synchronize(self) -> None:
        if self.runtime is not None:
            self.runtime.synchronize()

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes: device memory, or the host's available and total RAM on cpu."""
        if self.runtime is not None:
            free, total = self.runtime.mem_get_info()
            return int(free), int(total)
        return host_memory_info()

    def empty_cache(self) -> None:
        if self.runtime is not None:
            self.runtime.empty_cache()

    def reset_peak_memory_stats(self) -> None:
        """Start a new peak measurement (cpu: a no-op, the process peak RSS cannot be reset)."""
        if self.runtime is not None:
            self.runtime.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated by torch on the device; on cpu the process's peak resident set."""
        if self.runtime is not None:
            return int(self.runtime.max_memory_allocated())
        return peak_rss_bytes()


def host_memory_info() -> tuple[int, int]:
    """(available, total) bytes of host RAM, from /proc/meminfo or, failing that, sysconf."""
    try:
        with open("/proc/meminfo") as f:
            kib = {name: value.split()[0] for name, value in (line.split(":", 1) for line in f)}
        return int(kib["MemAvailable"]) * 1024, int(kib["MemTotal"]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_index_from_ray_ids(ids: list[str], environ: Mapping[str, str] | None = None) -> int:
    """The local device index an actor should use, given ``ray.get_runtime_context().get_accelerator_ids()["NPU"]``.

    Rule: Ray exports the granted ids in ASCEND_RT_VISIBLE_DEVICES, so the runtime renumbers them
    from 0 and the actor's first granted NPU is ``npu:<its position in that list>`` (normally 0).
    With RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1 (or true) Ray leaves the variable
    alone: the position in a list the user set, else the physical id itself, is the index. In
    CPU simulation the ids are logical and the answer is 0.
    """
    env = os.environ if environ is None else environ
    if not ids:
        raise DeviceUnavailableError(
            'this actor was granted no NPU; create it with resources={"NPU": 1}'
        )
    first = str(ids[0]).strip()
    visible = [v.strip() for v in env.get(ASCEND_VISIBLE_ENV, "").split(",") if v.strip()]
    if first in visible:  # whoever set the list, the runtime numbers its entries from 0
        return visible.index(first)
    if env.get(RAY_NOSET_ASCEND_ENV, "").lower() in ("1", "true"):  # as Ray reads it
        return int(first)
    return 0


def kv_budget_bytes(device: Device, memory_utilization: float, peak_bytes: int) -> int:
    """Bytes left for the KV cache: ``total * memory_utilization - peak_bytes``.

    ``peak_bytes`` is the peak measured over a profiling forward pass at the largest batch
    (weights and activations included).
    """
    if not 0.0 < memory_utilization <= 1.0:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    _, total = device.mem_get_info()
    budget = int(total * memory_utilization) - int(peak_bytes)
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache on {device.torch_device}: "
            f"{memory_utilization:.2f} x {total / 2**30:.2f} GiB total minus a peak of "
            f"{peak_bytes / 2**30:.2f} GiB is {budget / 2**30:.2f} GiB; raise memory_utilization, "
            "lower max_num_batched_tokens, or use a smaller model or dtype"
        )
    return budget

"""Device helpers (cpu, and npu on the fake torch_npu), the cuda backend's math run on the CPU,
and the selftest's verdicts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from worker.backends import get_backend
from worker.backends import cuda as cuda_backend
from worker.backends.cuda import CudaBackend
from worker.device import Device, DeviceUnavailableError, device_index_from_ray_ids, kv_budget_bytes
from worker.selftest import BATCH_KINDS, check_attention, format_table, random_paged_case, run_selftest

FAKE_ROOT = Path(__file__).parent / "fake_torch_npu"
GIB = 1 << 30


@pytest.fixture
def fake_npu(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "torch_npu"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    import torch_npu

    yield torch_npu
    for name in [m for m in sys.modules if m.split(".")[0] == "torch_npu"]:
        del sys.modules[name]


# ---- Device ---------------------------------------------------------------------------------


def test_cpu_memory_figures_are_plausible():
    device = Device.create("cpu")
    free, total = device.mem_get_info()
    assert 0 < free <= total
    assert device.max_memory_allocated() > 0  # this process's peak resident set
    assert device.torch_device == torch.device("cpu")


def test_npu_device_on_the_fake(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_TOTAL_BYTES", str(2 * GIB))
    device = Device.create("npu", 3)
    assert device.torch_device == torch.device("cpu")  # the fake's simulated npu
    assert fake_npu.npu.current_device() == 3
    assert device.mem_get_info() == (2 * GIB, 2 * GIB)
    device.synchronize()
    device.empty_cache()
    device.reset_peak_memory_stats()
    assert device.max_memory_allocated() == 0


def test_unknown_device_kind():
    with pytest.raises(ValueError, match="cpu, npu, cuda"):
        Device.create("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_a_gpu_is_unavailable():
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        Device.create("cuda")
    with pytest.raises(DeviceUnavailableError):
        get_backend("cuda")


@pytest.mark.parametrize("ids, env, index", [
    (["5"], {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}, 1),
    (["4"], {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}, 0),
    (["6"], {"ASCEND_RT_VISIBLE_DEVICES": "6"}, 0),
    (["3"], {"RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1"}, 3),
    (["3"], {"RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "true"}, 3),  # as Ray reads it
    # the user's own list, which Ray left alone: the runtime numbers its entries from 0
    (["5"], {"RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1",
             "ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}, 1),
    (["7"], {}, 0),
])
def test_device_index_from_ray_ids(ids, env, index):
    assert device_index_from_ray_ids(ids, env) == index


def test_actor_without_an_npu():
    with pytest.raises(DeviceUnavailableError, match='"NPU": 1'):
        device_index_from_ray_ids([], {})


def test_kv_budget_is_total_times_utilisation_minus_peak(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_TOTAL_BYTES", str(4 * GIB))
    device = Device.create("npu")
    assert kv_budget_bytes(device, 0.5, GIB // 4) == 2 * GIB - GIB // 4
    with pytest.raises(ValueError, match="memory_utilization"):
        kv_budget_bytes(device, 0.5, 3 * GIB)
    with pytest.raises(ValueError, match="memory_utilization"):
        kv_budget_bytes(device, 1.5, 0)


# ---- the cuda backend's math, run on the CPU ------------------------------------------------


@pytest.mark.parametrize("kind", BATCH_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_math_matches_cpu_reference(kind, dtype):
    case = random_paged_case(kind, 16, 8, 2, 64, seed=21)
    result = check_attention(CudaBackend("cpu"), get_backend("cpu"), case, dtype, kind)
    assert result.passed, result


def test_cuda_backend_skips_minus_one_slots():
    case = random_paged_case("decode", 16, 4, 2, 64)
    before = case.key_cache.clone()
    slots = case.slot_mapping.clone()
    slots[0] = -1
    CudaBackend("cpu").write_kv(case.key, case.value, case.key_cache, case.value_cache, slots)
    flat = case.key_cache.view(-1, 2, 64)
    assert torch.equal(flat[slots[1:].long()], case.key[1:])
    assert torch.equal(flat[case.slot_mapping[0].long()], before.view(-1, 2, 64)[case.slot_mapping[0].long()])


# ---- the selftest ---------------------------------------------------------------------------


def test_selftest_catches_a_wrong_backend(monkeypatch):
    case = random_paged_case("prefill", 16, 4, 2, 64)
    good = check_attention(CudaBackend("cpu"), get_backend("cpu"), case, torch.float32, "good")
    monkeypatch.setattr(cuda_backend, "_causal_bias", lambda q_len, kv_len: None)  # non-causal
    bad = check_attention(CudaBackend("cpu"), get_backend("cpu"), case, torch.float32, "bad")
    assert good.passed and not bad.passed
    assert bad.max_error > 10 * bad.tolerance
    table = format_table([good, bad])
    assert "FAIL" in table and table.endswith("1/2 checks passed")


def test_selftest_rejects_an_unknown_device():
    with pytest.raises(ValueError, match="cpu, npu, cuda"):
        run_selftest("tpu")

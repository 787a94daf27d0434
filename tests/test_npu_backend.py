"""The npu backend against the strict fake torch_npu (tests/fake_torch_npu): the fake's contract
checks, the backend's results against the cpu reference, import failures, and start-up limits.

These prove how we call the documented ops, not how NPU hardware runs them.
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import pytest
import torch

from worker.backends import get_backend
from worker.backends.npu import NpuBackend, check_npu_config
from worker.device import Device, DeviceUnavailableError
from worker.selftest import BATCH_KINDS, check_attention, compare_models, random_paged_case

FAKE_ROOT = Path(__file__).parent / "fake_torch_npu"
TORCH_VERSION = torch.__version__.split("+")[0]


def _forget_torch_npu() -> None:
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]


@pytest.fixture
def fake_npu(monkeypatch):
    """The fake torch_npu, imported fresh and forgotten afterwards."""
    _forget_torch_npu()
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    import torch_npu

    torch_npu.CALL_LOG.clear()
    yield torch_npu
    _forget_torch_npu()


@pytest.fixture
def reference():
    return get_backend("cpu")


# ---- (1) the fake rejects each contract mistake ---------------------------------------------


def _valid_fia_call(kind: str = "mixed", block_size: int = 128):
    """Arguments of a correct paged TND call, built by hand from a random bf16 case."""
    case = random_paged_case(kind, block_size, head_num=8, kv_head_num=2, head_dim=64, seed=3)
    case = case.rounded(torch.bfloat16)
    num_blocks = case.key_cache.shape[0]
    args = [case.query.bfloat16(), case.key_cache.bfloat16().view(num_blocks, block_size, -1),
            case.value_cache.bfloat16().view(num_blocks, block_size, -1)]
    kwargs = dict(
        atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1),
        block_table=case.block_tables, input_layout="TND", block_size=block_size,
        actual_seq_lengths=case.query_start_loc[1:], actual_seq_lengths_kv=case.seq_lens,
        num_heads=8, num_key_value_heads=2, scale=0.125, sparse_mode=3,
    )
    return args, kwargs


def _mutate(args, kwargs, **changes):
    kwargs = {**kwargs, **changes}
    return args, kwargs


FIA_MISTAKES = {
    "float32 query": lambda a, k: ([a[0].float(), a[1], a[2]], k),
    "int64 block table": lambda a, k: _mutate(a, k, block_table=k["block_table"].long()),
    "non-contiguous query": lambda a, k: ([a[0].transpose(0, 1).contiguous().transpose(0, 1), a[1], a[2]], k),
    "4-D caches instead of the [blocks, block_size, hidden] view": lambda a, k: (
        [a[0], a[1].view(*a[1].shape[:2], 2, 64), a[2].view(*a[2].shape[:2], 2, 64)], k),
    "block_size argument differs from the caches": lambda a, k: _mutate(a, k, block_size=256),
    "per-request query lengths instead of cumulative ends": lambda a, k: _mutate(
        a, k, actual_seq_lengths=[e - s for s, e in zip([0] + k["actual_seq_lengths"][:-1], k["actual_seq_lengths"])]),
    "query starts (B+1 entries) instead of ends": lambda a, k: _mutate(
        a, k, actual_seq_lengths=[0] + k["actual_seq_lengths"]),
    "lengths as a tensor": lambda a, k: _mutate(a, k, actual_seq_lengths=torch.tensor(k["actual_seq_lengths"])),
    "query not trimmed to the packed tokens": lambda a, k: (
        [torch.cat([a[0], a[0][:3]]), a[1], a[2]], k),
    "cumulative kv lengths": lambda a, k: _mutate(
        a, k, actual_seq_lengths_kv=torch.tensor(k["actual_seq_lengths_kv"]).cumsum(0).tolist()),
    "mask of the wrong shape": lambda a, k: _mutate(a, k, atten_mask=k["atten_mask"][:1024, :1024].contiguous()),
    "float mask": lambda a, k: _mutate(a, k, atten_mask=k["atten_mask"].float()),
    "lower-triangular mask": lambda a, k: _mutate(a, k, atten_mask=k["atten_mask"].t().contiguous()),
    "sparse_mode=3 without a mask": lambda a, k: _mutate(a, k, atten_mask=None),
    "sparse_mode=0 with a mask": lambda a, k: _mutate(a, k, sparse_mode=0),
    "sparse_mode=2": lambda a, k: _mutate(a, k, sparse_mode=2),
    "num_heads differs from the query": lambda a, k: _mutate(a, k, num_heads=4, num_key_value_heads=1),
    "num_key_value_heads differs from the caches": lambda a, k: _mutate(a, k, num_key_value_heads=4),
    "integer scale": lambda a, k: _mutate(a, k, scale=1),
}


def _writer(fake_npu, op):
    if op == "npu_scatter_pa_kv_cache":  # its documented default cache_mode is the NZ layout
        return functools.partial(fake_npu.npu_scatter_pa_kv_cache, cache_mode="Norm")
    return getattr(fake_npu, op)


def test_fake_accepts_the_valid_calls_the_mistakes_start_from(fake_npu):
    fake_npu.npu_fused_infer_attention_score(*_valid_fia_call()[0], **_valid_fia_call()[1])
    for op in ("npu_scatter_pa_kv_cache", "_npu_reshape_and_cache"):
        _writer(fake_npu, op)(*_valid_write())


def test_fake_scatter_without_cache_mode_is_the_nz_layout(fake_npu):
    with pytest.raises(fake_npu.ContractError, match="got 'PA_NZ'"):
        fake_npu.npu_scatter_pa_kv_cache(*_valid_write())


@pytest.mark.parametrize("mistake", list(FIA_MISTAKES))
def test_fake_attention_rejects(fake_npu, mistake):
    args, kwargs = FIA_MISTAKES[mistake](*_valid_fia_call())
    with pytest.raises(fake_npu.ContractError, match=re.escape(REJECTION_REASON[mistake])):
        fake_npu.npu_fused_infer_attention_score(*args, **kwargs)


def test_fake_attention_rejects_block_size_64_for_prefill(fake_npu):
    args, kwargs = _valid_fia_call("prefill", block_size=64)
    with pytest.raises(fake_npu.ContractError, match="multiple of 128"):
        fake_npu.npu_fused_infer_attention_score(*args, **kwargs)


def test_fake_attention_accepts_block_size_64_for_pure_decode(fake_npu):
    args, kwargs = _valid_fia_call("decode", block_size=64)
    fake_npu.npu_fused_infer_attention_score(*args, **_mutate(args, kwargs, atten_mask=None, sparse_mode=0)[1])


def _valid_write(case_kind: str = "mixed"):
    case = random_paged_case(case_kind, 128, head_num=4, kv_head_num=2, head_dim=64, seed=5)
    halves = [t.bfloat16() for t in (case.key, case.value, case.key_cache, case.value_cache)]
    return [*halves, case.slot_mapping.clone()]


def _with_slot(args, index, slot):
    slots = args[4].clone()
    slots[index] = slot
    return [*args[:4], slots]


WRITE_MISTAKES = {
    "int64 slot mapping": lambda a: [*a[:4], a[4].long()],
    "slot -1": lambda a: _with_slot(a, 0, -1),
    "slot past the cache": lambda a: _with_slot(a, 0, a[2].shape[0] * a[2].shape[1]),
    "duplicate slots": lambda a: _with_slot(a, 1, int(a[4][0])),
    "3-D cache view": lambda a: [a[0], a[1], a[2].flatten(2), a[3].flatten(2), a[4]],
    "float32 key": lambda a: [a[0].float(), *a[1:]],
    "non-contiguous key": lambda a: [a[0].transpose(1, 2).contiguous().transpose(1, 2), *a[1:]],
    "slot mapping shorter than the tokens": lambda a: [*a[:4], a[4][:-1].contiguous()],
}


# What each rejection must say, so a test cannot pass for the wrong reason.
REJECTION_REASON = {
    'float32 query': 'float16 or bfloat16',
    'int64 block table': 'block_table must be int32',
    'non-contiguous query': 'query must be contiguous',
    '4-D caches instead of the [blocks, block_size, hidden] view': 'one shape',
    'block_size argument differs from the caches': 'block_size=256',
    'per-request query lengths instead of cumulative ends': 'cumulative',
    'query starts (B+1 entries) instead of ends': 'one entry per request',
    'lengths as a tensor': 'list of ints',
    'query not trimmed to the packed tokens': 'must equal the query',
    'cumulative kv lengths': 'a request needs',
    'mask of the wrong shape': '2048, 2048',
    'float mask': 'bool, int8',
    'lower-triangular mask': 'triu',
    'sparse_mode=3 without a mask': 'needs the compressed',
    'sparse_mode=0 with a mask': 'takes no atten_mask',
    'sparse_mode=2': 'sparse_mode 0',
    'num_heads differs from the query': 'num_heads=4',
    'num_key_value_heads differs from the caches': 'num_key_value_heads',
    'integer scale': 'scale must be a float',
    'int64 slot mapping': 'must be int32',
    'slot -1': '-1 is not accepted',
    'slot past the cache': 'must be in',
    'duplicate slots': 'unique',
    '3-D cache view': '4-D',
    'float32 key': 'float16',
    'non-contiguous key': 'contiguous',
    'slot mapping shorter than the tokens': '[tokens]',
}


@pytest.mark.parametrize("op", ["npu_scatter_pa_kv_cache", "_npu_reshape_and_cache"])
@pytest.mark.parametrize("mistake", list(WRITE_MISTAKES))
def test_fake_kv_write_rejects(fake_npu, op, mistake):
    write = _writer(fake_npu, op)
    with pytest.raises(fake_npu.ContractError, match=re.escape(REJECTION_REASON[mistake])):
        write(*WRITE_MISTAKES[mistake](_valid_write()))


# ---- (2) the npu backend on the fake equals the cpu reference -------------------------------


@pytest.mark.parametrize("kind", BATCH_KINDS)
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128), (8, 1, 64)], ids=["mha", "gqa4", "mqa"])
def test_npu_backend_matches_cpu_reference(fake_npu, reference, kind, heads):
    case = random_paged_case(kind, 128, *heads, seed=heads[1])
    result = check_attention(NpuBackend(), reference, case, torch.bfloat16, kind)
    assert result.passed, result


@pytest.mark.parametrize("kind", ["chunked", "mixed"])
def test_npu_backend_block_size_256(fake_npu, reference, kind):
    case = random_paged_case(kind, 256, 4, 2, 64, seed=7)
    result = check_attention(NpuBackend(), reference, case, torch.bfloat16, kind)
    assert result.passed, result


def test_npu_backend_float16_matches(fake_npu, reference):
    case = random_paged_case("mixed", 128, 8, 2, 128, seed=11)
    result = check_attention(NpuBackend(), reference, case, torch.float16, "mixed")
    assert result.passed and result.max_error < 5e-3, result


def _attention_calls(fake_npu):
    return [args for op, args in fake_npu.CALL_LOG if op == "npu_fused_infer_attention_score"]


def test_decode_uses_no_mask_and_prefill_the_one_causal_mask(fake_npu, reference):
    backend = NpuBackend()
    for kind in ("decode", "prefill", "mixed", "decode"):
        check_attention(backend, reference, random_paged_case(kind, 128, 4, 2, 64), torch.bfloat16, kind)
    modes = [call["sparse_mode"] for call in _attention_calls(fake_npu)]
    assert modes == [0, 3, 3, 0]
    masks = [call["atten_mask"] for call in _attention_calls(fake_npu) if call["sparse_mode"] == 3]
    assert masks[0] is masks[1]  # built once per backend, on its device
    assert all(call["atten_mask"] is None for call in _attention_calls(fake_npu) if call["sparse_mode"] == 0)


def test_prepare_builds_the_op_metadata(fake_npu):
    case = random_paged_case("chunked", 128, 4, 2, 64)
    meta = case.meta()
    meta.slot_mapping = meta.slot_mapping.long()
    meta.block_tables = meta.block_tables.long()
    prepared = NpuBackend().prepare(meta)
    state = prepared.backend_state
    assert prepared.slot_mapping.dtype == prepared.block_tables.dtype == torch.int32
    assert state.cum_query_ends == case.query_start_loc[1:]
    assert state.kv_lens == case.seq_lens
    assert not state.decode_only and state.write_rows is None


def test_writes_kv_with_the_atb_op_as_vllm_ascend_does_on_a2_a3(fake_npu, reference):
    backend = NpuBackend()
    result = check_attention(backend, reference, random_paged_case("mixed", 128, 8, 2, 64), torch.bfloat16, "m")
    assert result.passed, result
    assert {op for op, _ in fake_npu.CALL_LOG} == {"_npu_reshape_and_cache", "npu_fused_infer_attention_score"}


def test_without_the_atb_op_the_plain_scatter_is_told_the_norm_layout(fake_npu, reference, monkeypatch):
    """Left out, cache_mode is the NZ layout (older bindings hard-code it): the plain 4-D
    caches would be written as if blocked."""
    monkeypatch.delattr(fake_npu, "_npu_reshape_and_cache")
    backend = NpuBackend()
    result = check_attention(backend, reference, random_paged_case("mixed", 128, 8, 2, 64), torch.bfloat16, "m")
    assert result.passed, result
    assert {args["cache_mode"] for op, args in fake_npu.CALL_LOG if op == "npu_scatter_pa_kv_cache"} == {"Norm"}


def test_missing_nnal_is_one_line_saying_what_to_source(fake_npu, monkeypatch):
    def no_atb(*args):
        raise RuntimeError("libatb.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(fake_npu, "_npu_reshape_and_cache", no_atb)
    case = random_paged_case("mixed", 128, 4, 2, 64)
    with pytest.raises(DeviceUnavailableError, match=r"ATB ops cannot load \(libatb.so: .*\): install "
                                                     r"NNAL and run 'source /usr/local/Ascend/nnal"):
        check_attention(NpuBackend(), get_backend("cpu"), case, torch.bfloat16, "mixed")


@pytest.mark.parametrize("cann, refused", [("8.2.RC1", True), ("7.0.0", True), ("8.3.RC1", False),
                                           ("9.0.0", False), ("unreadable", False)])
def test_a_cann_older_than_8_3_is_refused_at_start(fake_npu, monkeypatch, cann, refused):
    """The paged TND attention call fails on older CANN releases (vLLM-Ascend calls it only
    from 8.3): say so at start-up, not as an op error in the first forward."""
    monkeypatch.setattr(torch.version, "cann", cann, raising=False)
    if refused:
        with pytest.raises(DeviceUnavailableError, match=f"CANN {cann} is too old .* needs CANN 8.3"):
            NpuBackend()
    else:
        NpuBackend()


def test_padded_query_rows_are_trimmed_for_the_op(fake_npu):
    case = random_paged_case("mixed", 128, 4, 2, 64).rounded(torch.bfloat16)
    backend = NpuBackend()

    def run(extra_rows: int) -> torch.Tensor:
        caches = [case.key_cache.bfloat16(), case.value_cache.bfloat16()]
        q, k, v = (torch.cat([t, t[:extra_rows]]).bfloat16() for t in (case.query, case.key, case.value))
        meta = case.meta()
        meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((extra_rows,), -1, dtype=torch.int32)])
        meta = backend.prepare(meta)
        return backend.forward(q, k, v, *caches, meta, case.params)

    exact, padded = run(0), run(5)
    assert padded.shape[0] == exact.shape[0] + 5
    assert torch.equal(padded[: exact.shape[0]], exact)
    assert not padded[exact.shape[0]:].any()


def test_minus_one_slots_are_not_written(fake_npu):
    args = _valid_write()
    key, value, key_cache, value_cache, slots = args
    skipped = slots.clone()
    skipped[::2] = -1
    before = key_cache.clone()
    NpuBackend().write_kv(key, value, key_cache, value_cache, skipped)
    flat, flat_before = key_cache.view(-1, *key_cache.shape[2:]), before.view(-1, *before.shape[2:])
    written = slots[1::2].long()
    assert torch.equal(flat[written], key[1::2])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(flat[untouched], flat_before[untouched])


def test_attend_without_prepare_says_what_to_do(fake_npu):
    case = random_paged_case("decode", 128, 4, 2, 64)
    with pytest.raises(ValueError, match="prepare"):
        NpuBackend().attend(case.query.bfloat16(), case.key_cache.bfloat16(), case.value_cache.bfloat16(),
                            case.meta(), case.params)


def test_engine_style_cache_allocation_on_the_backend_device(fake_npu, reference):
    backend = get_backend("npu")
    cache = torch.empty((4, 128, 2, 64), dtype=torch.bfloat16, device=backend.device)
    assert cache.device == backend.device == Device.create("npu").torch_device


def test_tiny_model_on_the_fake_matches_cpu_float32(fake_npu):
    from worker.loader import load_model

    reference_model, _ = load_model("tiny", dtype=torch.float32, backend=get_backend("cpu"))
    model, _ = load_model("tiny", dtype=torch.bfloat16, backend=NpuBackend())
    result = compare_models(model, reference_model, block_size=128)
    assert result.passed, result


# ---- (3) a host without torch_npu or CANN ---------------------------------------------------


def test_missing_torch_npu_says_what_to_install(monkeypatch):
    _forget_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(DeviceUnavailableError) as info:
        get_backend("npu")
    message = str(info.value)
    assert f"pip install torch_npu=={TORCH_VERSION}" in message and "\n" not in message
    with pytest.raises(DeviceUnavailableError):
        Device.create("npu")


def test_missing_cann_says_what_to_source(monkeypatch, tmp_path):
    _forget_torch_npu()
    broken = tmp_path / "torch_npu"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(DeviceUnavailableError) as info:
            get_backend("npu")
    finally:
        _forget_torch_npu()
    message = str(info.value)
    assert "set_env.sh" in message and "libhccl" in message and "\n" not in message


def test_invisible_device_index(fake_npu, monkeypatch):
    monkeypatch.setenv("FAKE_NPU_DEVICE_COUNT", "2")
    with pytest.raises(DeviceUnavailableError, match="npu:2"):
        get_backend("npu", device_index=2)


# ---- (4) start-up limits name the setting ---------------------------------------------------

GOOD = dict(block_size=128, head_num=32, kv_head_num=8, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("change, setting", [
    ({"block_size": 64}, "block_size"),
    ({"block_size": 192}, "block_size"),
    ({"block_size": 1024}, "block_size"),
    ({"head_dim": 576}, "head_dim"),
    ({"head_dim": 72}, "head_dim"),
    ({"head_dim": 96}, "head_dim"),  # 16-aligned, but TND takes 64, 128 and 192 only
    ({"head_dim": 256}, "head_dim"),
    ({"head_num": 512, "kv_head_num": 8}, "head_num"),
    ({"head_num": 128, "kv_head_num": 1}, "head_num/kv_head_num"),
    ({"kv_head_num": 3}, "kv_head_num"),
    ({"dtype": torch.float32}, "dtype"),
])
def test_limits_name_the_setting(change, setting):
    with pytest.raises(ValueError, match=setting.replace("*", r"\*")):
        check_npu_config(**{**GOOD, **change})


@pytest.mark.parametrize("block_size", [128, 256, 384, 512])
@pytest.mark.parametrize("head_dim", [64, 128, 192])
def test_documented_configs_pass(block_size, head_dim):
    check_npu_config(**{**GOOD, "block_size": block_size, "head_dim": head_dim})


def test_forward_checks_limits_before_calling_the_ops(fake_npu):
    case = random_paged_case("prefill", 64, 4, 2, 64)
    backend = NpuBackend()
    with pytest.raises(ValueError, match="block_size=64"):
        check_attention(backend, get_backend("cpu"), case, torch.bfloat16, "prefill")
    assert not fake_npu.CALL_LOG

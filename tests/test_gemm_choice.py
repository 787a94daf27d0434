"""Choosing between MKL's and oneDNN's packed GEMM: the PAGEDSERVE_CPU_GEMM setting, the timed
choice on a sample of a model's projections, and the sample's size limits."""
import logging

import pytest
import torch

from worker.models import gemm_choice
from worker.models.gemm_choice import ENV_VAR, choose_packer, onednn_time_ratio

both = pytest.mark.skipif(not all(available() for available in gemm_choice.AVAILABLE.values()),
                          reason="this torch build lacks MKL's or oneDNN's packed GEMM")


def _projections(count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(64, 96, generator=g) for _ in range(count)]


def _kind(packer) -> str | None:
    return None if packer is None else packer(torch.randn(8, 4)).kind


def test_the_setting_defaults_to_auto_and_refuses_unknown_values(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert gemm_choice.setting() == "auto"
    monkeypatch.setenv(ENV_VAR, " OneDNN ")
    assert gemm_choice.setting() == "onednn"
    monkeypatch.setenv(ENV_VAR, "openblas")
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='openblas' is not one of auto, mkl, onednn, none"):
        choose_packer(_projections())


@both
@pytest.mark.parametrize("kind", ["mkl", "onednn"])
def test_a_named_library_is_used_without_timing(kind, monkeypatch):
    monkeypatch.setenv(ENV_VAR, kind)
    monkeypatch.setattr(gemm_choice, "onednn_time_ratio", None)  # calling it would fail
    assert _kind(choose_packer(_projections())) == kind


def test_none_means_plain_torch_matmuls(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "none")
    assert choose_packer(_projections()) is None


@both
@pytest.mark.parametrize("max_ratio, expected", [(0.0, "mkl"), (float("inf"), "onednn")])
def test_auto_times_both_and_takes_onednn_only_within_the_ratio(max_ratio, expected, monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(gemm_choice, "ONEDNN_MAX_TIME_RATIO", max_ratio)
    with caplog.at_level(logging.INFO, logger="pagedserve.gemm_choice"):
        assert _kind(choose_packer(_projections())) == expected
    assert f"CPU GEMM: {expected} packed weights (oneDNN took" in caplog.text


@both
def test_the_time_ratio_is_a_positive_measurement():
    ratio = onednn_time_ratio(_projections())
    assert 0 < ratio < float("inf")


def test_the_sample_cuts_large_weights_and_stops_at_its_budget(monkeypatch):
    monkeypatch.setattr(gemm_choice, "SAMPLE_MAX_BYTES_EACH", 64 * 10 * 4)  # 10 columns of 64 rows
    monkeypatch.setattr(gemm_choice, "SAMPLE_BYTES", 64 * 25 * 4)
    weights = _projections(5)
    sample = gemm_choice._sample(weights)
    assert [w.shape for w in sample] == [(64, 10)] * 3  # 30 columns reach the 25-column budget
    assert all(w.is_contiguous() and torch.equal(w, full[:, :10]) for w, full in zip(sample, weights))

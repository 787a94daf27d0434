"""`pagedserve selftest`: the cpu run passes and prints its table, exit codes 0 / 1 / 2, and the
TORCH_DEVICE_BACKEND_AUTOLOAD rule for cpu runs."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import worker.selftest
from cluster.cli import main, requested_device
from worker.selftest import SelftestResult

AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"


@pytest.fixture
def clean_env(monkeypatch):
    """No TORCH_DEVICE_BACKEND_AUTOLOAD during the test, and whatever main() sets is undone."""
    monkeypatch.setenv(AUTOLOAD, "unset")
    monkeypatch.delenv(AUTOLOAD)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core CI box is shared; torch's 2-thread sync stalls there
    yield
    torch.set_num_threads(threads)


def test_cpu_selftest_passes_and_prints_every_check(capsys, clean_env, one_thread):
    code = main(["selftest", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["check", "dtype", "max", "error", "tolerance", "result"]
    rows = out[2:-1]
    passed, total = map(int, out[-1].split()[0].split("/"))
    assert passed == total == len(rows) > 0
    assert all(row.rstrip().endswith("ok") or " ok (" in row for row in rows)
    assert {"float32", "bfloat16"} <= {row.split()[-4] for row in rows}
    assert any(row.startswith("tiny model") for row in rows)
    assert os.environ[AUTOLOAD] == "0"  # cpu runs keep torch from auto-loading torch_npu


def test_npu_without_torch_npu_is_one_line_and_exit_2(capsys, clean_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # as if not installed, even where it is
    code = main(["selftest", "--device", "npu"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("pagedserve: error: torch_npu is not installed: pip install")
    assert AUTOLOAD not in os.environ  # only cpu runs change it


def test_a_failing_check_exits_1_and_says_fail(capsys, monkeypatch):
    """The exit code follows the results (run_selftest itself is tested in test_device.py)."""
    results = [SelftestResult("good", "float32", 0.0, 1e-3, True),
               SelftestResult("bad", "float32", 1.0, 1e-3, False)]
    monkeypatch.setattr(worker.selftest, "run_selftest", lambda device, seed=0: results)
    assert main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.rstrip().endswith("1/2 checks passed")


@pytest.mark.parametrize(("argv", "device"), [
    (["selftest"], None), (["selftest", "--device", "npu"], "npu"),
    (["generate", "--device=cuda", "--prompt", "x"], "cuda"), (["selftest", "--device"], None)])
def test_requested_device_is_read_before_argparse(argv, device):
    assert requested_device(argv) == device

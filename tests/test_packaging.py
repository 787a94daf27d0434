"""A wheel built from the project ships what an installed pagedserve needs beside its code: the
preset configs next to cluster/, where cluster/config.py looks for them (a `pip install .`
without -e had none, so `up`, `serve` and `demo` failed on the default config)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "worker", "scheduler", "kvcache", "configs")


def test_the_wheel_ships_every_module_and_the_preset_configs(tmp_path):
    pytest.importorskip("setuptools")  # the build runs without isolation: nothing to download
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside it
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("pagedserve-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    presets = [f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")]
    assert "configs/cpu-sim.yaml" in presets
    assert set(presets) <= shipped
    modules = {p.relative_to(ROOT).as_posix() for package in PACKAGES
               for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= shipped, sorted(modules - shipped)

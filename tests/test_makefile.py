"""The Makefile names where torch comes from (issue 23.9): the PyTorch CPU wheel index by default when reachable,
any index through TORCH_INDEX, pip's own choice with TORCH_INDEX empty; EXTRAS= gives a venv without the
test extras (Ray). Checked with `make -n` (nothing installed)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(tmp_path, *settings) -> str:
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / f, tmp_path / f)
    out = subprocess.run(["make", "-n", "venv", *settings], cwd=tmp_path, capture_output=True, text=True, check=True)
    return out.stdout


def test_default_asks_for_the_cpu_wheel_index_when_reachable(tmp_path):
    out = dry_run(tmp_path)
    assert 'index="auto"' in out and "https://download.pytorch.org/whl/cpu/torch/" in out
    assert "pip install -q torch==2.13.0 ${index:+--index-url $index}" in out
    assert 'pip install -q -e ".[test]"' in out


def test_an_index_for_cuda_users_and_a_venv_without_extras(tmp_path):
    out = dry_run(tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cu124", "EXTRAS=")
    assert 'index="https://download.pytorch.org/whl/cu124"' in out
    assert 'pip install -q -e "."' in out and "[test]" not in out
    assert 'index=""' in dry_run(tmp_path, "TORCH_INDEX=")

"""The supported torch range is stated once (nnrnn_fused/_supported.py) and enforced at
build and import time; pyproject.toml must say the same."""
import tomllib
from pathlib import Path

import pytest

import nnrnn_fused
from nnrnn_fused import _extension
from nnrnn_fused._supported import TORCH_REQUIREMENT

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_supported_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert TORCH_REQUIREMENT in project["project"]["dependencies"]
    assert TORCH_REQUIREMENT in project["build-system"]["requires"]


def test_installed_torch_is_in_the_range():
    assert _extension.unsupported_torch_reason() is None


@pytest.mark.parametrize("version", ["2.10.2", "2.15.0", "2.15.0a0+gitabc", "3.0.0"])
def test_torch_outside_the_range_is_refused(version, monkeypatch):
    monkeypatch.delenv("NNRNN_ALLOW_UNTESTED_TORCH", raising=False)
    reason = _extension.unsupported_torch_reason(version)
    assert f"torch {version} is outside the range" in reason and TORCH_REQUIREMENT in reason
    monkeypatch.setattr(_extension.torch, "__version__", version)
    loaded, error, _ = _extension._load()
    assert not loaded and error == reason
    monkeypatch.setenv("NNRNN_ALLOW_UNTESTED_TORCH", "1")
    assert _extension.unsupported_torch_reason(version) is None


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.13.0+cpu", "2.14.1"])
def test_torch_inside_the_range_is_accepted(version):
    assert _extension.unsupported_torch_reason(version) is None


def test_build_info_records_the_python_it_was_built_for():
    import sysconfig

    from nnrnn_fused import _build_info

    assert _build_info.EXT_SUFFIX == sysconfig.get_config_var("EXT_SUFFIX")
    assert nnrnn_fused.__version__ == _build_info.VERSION

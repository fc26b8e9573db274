"""The extension is built and loaded: tests of the fused op would otherwise be
skipped silently, so this fails loudly instead."""
import nnrnn_fused


def test_extension_loaded():
    st = nnrnn_fused.status()
    assert st["extension_loaded"], st["load_error"]
    assert st["built_against_torch"] == st["torch"]


def test_version_mismatch_message(monkeypatch):
    """An extension built against another torch is refused with a rebuild hint."""
    import sys
    import types

    from nnrnn_fused import _extension

    fake = types.ModuleType("nnrnn_fused._build_info")
    fake.TORCH_VERSION, fake.TORCH_CUDA_VERSION, fake.WITH_CUDA, fake.DIRECT_BLAS = "0.0.1", None, False, False
    monkeypatch.setitem(sys.modules, "nnrnn_fused._build_info", fake)
    monkeypatch.setattr(nnrnn_fused, "_build_info", fake, raising=False)
    loaded, error, info = _extension._load()
    assert not loaded
    assert "built against torch 0.0.1" in error and "--no-build-isolation" in error
    assert info["TORCH_VERSION"] == "0.0.1"


def test_missing_build_is_reported(monkeypatch):
    """Without a built extension the package imports, status() says why, and the fused
    path raises a clear error pointing at the rebuild and at backend='reference'."""
    import sys

    import pytest

    from nnrnn_fused import NNRNN, _extension, fused_nnrnn

    monkeypatch.setitem(sys.modules, "nnrnn_fused._build_info", None)  # import fails
    monkeypatch.delattr(nnrnn_fused, "_build_info", raising=False)
    loaded, error, _ = _extension._load()
    assert not loaded and "not built" in error

    monkeypatch.setattr(_extension, "LOADED", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", error)
    assert nnrnn_fused.status()["extension_loaded"] is False
    import torch
    with pytest.raises(RuntimeError, match="backend='reference'"):
        fused_nnrnn(torch.randn(2, 1, 4), torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="not built"):
        NNRNN(3, 4)
    out, _ = NNRNN(3, 4, backend="reference")(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 4)


def test_cuda_tensors_without_cuda_kernels_are_refused_clearly(monkeypatch):
    import pytest

    from nnrnn_fused import _extension

    monkeypatch.setattr(_extension, "WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="CUDA tensors need the CUDA kernels"):
        _extension.require("cuda")
    _extension.require("cpu")  # the CPU kernels are there

"""The package version, stated once: pyproject.toml reads it (tool.setuptools.dynamic),
setup.py records it in the build info, nnrnn_fused.__version__ re-exports it."""
__version__ = "0.1.0"

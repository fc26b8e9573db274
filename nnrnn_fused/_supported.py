"""The torch releases this package is built and tested with (README, "Supported versions").

Read by setup.py (without importing the package) and by _extension.py at import time;
pyproject.toml's `dependencies` and `build-system.requires` say the same (a test checks).
A new torch minor is added here only after the whole suite passed on it: custom-op and
torch.compile behaviour changes between minors (torch 2.11's compile zeroed a gradient
that 2.14 computes: docs/torch_versions.md).
"""
TORCH_MIN = "2.11"    # the GPU machine's torch, the oldest CI runs
TORCH_BELOW = "2.15"  # first minor not tested yet
TORCH_REQUIREMENT = f"torch>={TORCH_MIN},<{TORCH_BELOW}"

import pytest
import torch

import nnrnn_fused


def pytest_report_header(config):
    return f"nnrnn_fused status: {nnrnn_fused.status()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

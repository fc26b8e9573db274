import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--grid", default="targets",
                     choices=("quick", "targets", "full", "gpu", "gpucheck", "crossover", "step"),
                     help="benchmark sizes (benchmarks/cases.py: GRIDS)")
    parser.addoption("--impls", default=None,
                     help="comma-separated implementations (default: the grid's; benchmarks/cases.py: IMPLS)")
    parser.addoption("--rounds", type=int, default=None, help="timed rounds per case")


def pytest_generate_tests(metafunc):
    from benchmarks.cases import cases, memory_cases

    grid = metafunc.config.getoption("--grid")
    impls = metafunc.config.getoption("--impls")
    impls = tuple(impls.split(",")) if impls else None
    for name, make in (("case", lambda g: cases(g, impls=impls)), ("memory_case", memory_cases)):
        if name in metafunc.fixturenames:
            selected = list(make(grid))
            metafunc.parametrize(name, selected, ids=[c.id for c in selected])


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under benchmarks/gpu_check.sh (GPU_CHECK_RESULTS set): each case's result as a JSON line the
    moment it exists (the --benchmark-json file is written only at the end, lost if the run is killed)."""
    yield
    bench = item.funcargs.get("benchmark") if call.when == "call" and os.environ.get("GPU_CHECK_RESULTS") else None
    if bench is not None and bench.stats:
        from benchmarks.gpu_check import record

        record("suites", "case", id=item.name, extra_info=dict(bench.extra_info), median_s=bench.stats.stats.median)

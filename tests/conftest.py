"""Shared fixtures, and the ``unit`` / ``integration`` marks every test gets (``pytest -m unit``: the fast ones).

A test is ``integration`` when it builds, loads or trains models, runs a study or a benchmark, or starts
processes: every test of a module in ``INTEGRATION_MODULES``, any test whose own code calls ``subprocess`` or
imports a benchmark (``INTEGRATION_CALLS``), and every ``slow`` test (``-m unit`` replaces the default
``-m 'not slow'``). The rest are ``unit``: small tensors and tables, in-process. A test marked ``unit`` or
``integration`` explicitly keeps its mark (in a module that mixes both).
"""

import inspect
import os

import pytest
import torch

INTEGRATION_MODULES = {
    "test_benchmarks_smoke", "test_distill", "test_distributed", "test_fused_score", "test_hf", "test_loading",
    "test_pretrained", "test_probe", "test_reproduce", "test_run_safety", "test_runs", "test_small",
    "test_studies", "test_trl_engine", "test_tuned", "test_variance",
}
INTEGRATION_CALLS = ("subprocess", "from benchmarks")


def _is_integration(item) -> bool:
    """Whether a test item is an integration test (see the module docstring)."""
    if item.get_closest_marker("slow") or item.module.__name__.rpartition(".")[2] in INTEGRATION_MODULES:
        return True
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in INTEGRATION_CALLS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("unit") is None and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration if _is_integration(item) else pytest.mark.unit)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The test suite runs the eager chunked pass: torch.compile costs seconds per kernel variant.
# tests/test_chunk_kernels.py checks the compiled kernels against it (compiled=True).
os.environ.setdefault("VOPD_COMPILE", "0")

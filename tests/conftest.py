import os

import pytest
import torch


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

"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded, then restore the thread count. These modules push many tiny tensors:
    on a busy 2-core machine the intra-op pool's hand-offs cost far more than the arithmetic (about 30 ms
    per op, measured), so one thread is faster. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

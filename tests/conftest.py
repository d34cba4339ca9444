"""Shared test fixtures."""

import dataclasses

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


def random_tiny_checkpoint(path, step=0, **settings):
    """Write a `tiny`-preset EDM checkpoint with random (not zero-initialised) weights, so that samples depend on
    the network, to `path`; `settings` override the edm_task.Config fields. Returns the path."""
    from minidiffit.tools import edm_task
    from minidiffit.base.runtime import save_checkpoint

    cfg = edm_task.Config(**{"preset": "tiny", "data": "synthetic", "grid": 0, "augment_p": 0, **settings})
    torch.manual_seed(0)
    model = edm_task.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    save_checkpoint({"model": state, "ema": state, "step": step, "config": dataclasses.asdict(cfg)}, path)
    return path

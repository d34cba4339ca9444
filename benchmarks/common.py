"""What the benchmark scripts share: the device (runtime.select_device: TF32 on for CUDA, as train.py), its name,
and a synchronised clock."""

import time

import torch

from minidiffit.base.runtime import select_device

device = select_device()
cuda = device.type == "cuda"
name = torch.cuda.get_device_name(device) if cuda else "CPU"


def sync():
    """Wait for queued CUDA work, so a clock read after it times the work itself."""
    if cuda:
        torch.cuda.synchronize()


def clock(fn, n):
    """Seconds per call of fn over n calls (synchronised at both ends)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n

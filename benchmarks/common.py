"""What the benchmark scripts share: the device (TF32 on for CUDA, as train.py), its name, and a synchronised clock."""

import time

import torch

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
name = torch.cuda.get_device_name() if cuda else "CPU"


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

"""gpu-check: without CUDA one line and exit 1; its pieces run on the CPU (the CUDA runs need a card)."""

import subprocess
import sys

import pytest
import torch

from minidiffit.tools import gpucheck
from minidiffit.unet import UNET_PRESETS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run `bash reproduce.sh gpu-check`")
def test_without_cuda_it_says_so_in_one_line_and_exits_1(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minidiffit", "gpu-check"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr


def test_its_measurements_run():
    assert "attention" in gpucheck.attention_kernel(torch.device("cpu"), torch.float32).lower()
    cfg = UNET_PRESETS["tiny"]
    shape = (cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
    with torch.device("meta"):
        model = gpucheck.EDMPrecond(gpucheck.DiffiTUNet(cfg))
        assert gpucheck.forward_flops(model, torch.zeros(2, *shape), torch.ones(2)) > 0
    assert gpucheck.train_rate(gpucheck.DiffiTUNet(cfg), shape, 2, torch.device("cpu"), bf16=False, compile=False,
                               steps=1) > 0

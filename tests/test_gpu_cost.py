"""The GPU cost table (benchmarks/gpu_cost.py) is what results/gpu_cost.md and the README quote, and its FLOPs are
the modules' own: a changed preset or model that is not re-costed fails here."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_cost", ROOT / "benchmarks" / "gpu_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_quotes_the_committed_table():
    table = (ROOT / "results" / "gpu_cost.md").read_text()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- gpu_cost: .*? -->\n(.*?)<!-- /gpu_cost -->", readme, re.S)
    assert block, "README has no <!-- gpu_cost: ... --> block"
    assert block.group(1) == table, "README's GPU table differs from results/gpu_cost.md: python benchmarks/gpu_cost.py --write"


def test_the_committed_flops_are_the_models_own():
    import torch

    from minidiffit.latent import LATENT_PRESETS, LatentDiffiT

    gpu_cost = load_script()
    table = (ROOT / "results" / "gpu_cost.md").read_text()
    cfg = LATENT_PRESETS["XL/2"]
    with torch.device("meta"):
        flops = gpu_cost.forward_flops(LatentDiffiT(cfg), torch.randn(2, 4, 32, 32), torch.zeros(2, dtype=torch.long),
                                       torch.zeros(2, dtype=torch.long))
    assert f"({flops / 1e9:.0f} GFLOP/img fwd)" in table
    from minidiffit.diffusion import EDMPrecond
    from minidiffit.unet import UNET_PRESETS, DiffiTUNet

    with torch.device("meta"):
        flops = gpu_cost.forward_flops(EDMPrecond(DiffiTUNet(UNET_PRESETS["cifar10"])), torch.randn(2, 3, 32, 32),
                                       torch.ones(2))
    assert f"({flops / 1e9:.2f} GFLOP/img fwd)" in table
    assert f"MFU {gpu_cost.MFU:.1%}" in table

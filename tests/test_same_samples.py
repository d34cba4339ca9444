"""The same seed gives the same samples as before the core/tools split (issue 19), for both tasks.

tests/data/refactor_{edm,latent}_tiny.npz were written by commit 826d92b's command lines (the package before the
split), with the commands below in their old spelling (`python -m minidiffit.train ...`), on this torch build:
a tiny preset trained 3 steps at lr 1e-3 on synthetic data, then sampled (EDM Heun 4 steps; the latent model
with the tiny random VAE, 5 ancestral steps). Moving code must not move a bit of them.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
TRAIN = ["--iters=3", "--batch=8", "--grid=0", "--compile=false", "--lr=1e-3", "--warmup_kimg=0", "--log_every=1", "--ckpt_every=3"]


def minidiffit(*args, cwd):
    subprocess.run([sys.executable, "-m", "minidiffit", *args], cwd=cwd, check=True, capture_output=True,
                   env={"MINIDIFFIT_FAST": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("task", ["edm", "latent"])
def test_same_seed_same_samples_as_before_the_split(task, tmp_path):
    if task == "edm":
        minidiffit("train", "--preset=tiny", "--data=synthetic", "--out=run", *TRAIN, cwd=tmp_path)
        minidiffit("sample", "--ckpt=run/ckpt.pt", "--num_samples=4", "--steps=4", "--out=s.npz", cwd=tmp_path)
    else:
        minidiffit("imagenet", "synthetic", "--out=images", "--num_classes=4", "--per_class=2", "--size=64", cwd=tmp_path)
        minidiffit("imagenet", "prepare", "--data_dir=images", "--out=latents", "--image_size=64", "--vae=tiny", "--batch=8",
                   "--shard_size=8", "--num_workers=0", cwd=tmp_path)
        minidiffit("train", "--task=latent", "--preset=tiny", "--data_dir=latents", "--out=run", *TRAIN, cwd=tmp_path)
        minidiffit("sample", "--ckpt=run/ckpt.pt", "--num_samples=4", "--steps=5", "--out=s.npz", cwd=tmp_path)
    before = np.load(DATA / f"refactor_{task}_tiny.npz")
    now = np.load(tmp_path / "s.npz")
    assert sorted(now.files) == sorted(before.files)
    for key in before.files:
        assert np.array_equal(now[key], before[key]), f"{task}: {key} differs from the samples made before the split"

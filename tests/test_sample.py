"""sample.py: image i comes from seed i alone (any batch size, order or output format); PNG dirs resume."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_tiny_checkpoint
from minidiffit.base.runtime import seeded_noise
from minidiffit.tools.sample import SampleConfig, generate_images, main, sample
from minidiffit.tools.tasks import build_from_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny-preset checkpoint with random (not zero-initialised) weights, so samples depend on the net."""
    return random_tiny_checkpoint(tmp_path_factory.mktemp("run") / "ckpt.pt")


def test_noise_of_image_i_is_seed_i():
    noise = seeded_noise(torch.tensor([7, 3]), (3, 4, 4))
    assert torch.equal(noise[0], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(noise[1], torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3)))


def test_image_i_does_not_depend_on_batching_or_order(ckpt):
    model, cfg, _ = build_from_checkpoint(ckpt)
    a = generate_images(model, cfg, [0, 1, 2], steps=2, batch=3)
    b = generate_images(model, cfg, [2, 0, 1], steps=2, batch=2)
    # equal up to float32 rounding that differs with the batch size (matmul blocking), which the ODE
    # carries along: a few pixels differ by ~1e-3, a different seed by ~0.5
    torch.testing.assert_close(b, a[[2, 0, 1]], rtol=0, atol=5e-3)
    assert (b - a[[2, 0, 1]]).abs().mean() < 1e-5
    assert (a[0] - a[1]).abs().mean() > 0.05  # different seeds, different images
    assert a.shape == (3, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_png_dir_npz_and_resume_agree(ckpt, tmp_path):
    out = tmp_path / "pngs"
    sample(SampleConfig(ckpt=str(ckpt), num_samples=3, out=str(out), steps=1, batch=2), log=lambda *a: None)
    pngs = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(3)])  # (3, 32, 32, 3)
    sample(SampleConfig(ckpt=str(ckpt), num_samples=3, out=str(tmp_path / "s.npz"), steps=1, batch=3), log=lambda *a: None)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - pngs).max() <= 1  # equal up to a float rounding at a .5 boundary

    # resume: a deleted PNG is made again, the others are left alone
    (out / "00001.png").unlink()
    (out / "00002.png").write_bytes(b"sentinel")  # not a PNG: proves existing files are skipped
    sample(SampleConfig(ckpt=str(ckpt), num_samples=3, out=str(out), steps=1, batch=2), log=lambda *a: None)
    assert np.abs(np.asarray(Image.open(out / "00001.png")).astype(int) - pngs[1]).max() <= 1
    assert (out / "00002.png").read_bytes() == b"sentinel"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"--ckpt={tmp_path / 'none.pt'}", "--num_samples=1"])
    assert "no checkpoint at" in capsys.readouterr().err


def test_sampler_option(ckpt, tmp_path, capsys):
    # --sampler picks the task's sampler: the npz equals the task's generate with it; an unknown name is one line.
    from minidiffit.tools import edm_task

    model, cfg, _ = build_from_checkpoint(ckpt)
    sample(SampleConfig(ckpt=str(ckpt), num_samples=2, out=str(tmp_path / "d.npz"), steps=3, sampler="dpm++2m"),
           log=lambda *a: None)
    want = edm_task.generate(model, torch.arange(2), cfg, 3, sampler="dpm++2m")
    got = torch.from_numpy(np.load(tmp_path / "d.npz")["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (got - want).abs().max() <= 1 / 127.5 + 1e-6  # within one grey level of rounding
    heun = edm_task.generate(model, torch.arange(2), cfg, 3)
    assert (heun - want).abs().max() > 1e-2  # another sampler, other images
    with pytest.raises(SystemExit):
        main([f"--ckpt={ckpt}", "--num_samples=1", "--sampler=ancestral", f"--out={tmp_path / 'x.npz'}"])
    assert "--sampler=ancestral: unknown for the 'edm' task; choose one of heun, dpm++2m, euler, stochastic" in capsys.readouterr().err


def test_stochastic_sampler_is_edm_algorithm_2_seeded_per_image(ckpt):
    # EDM's Algorithm 2 with its ImageNet-64 settings; image i's churn noise continues image i's own generator
    # after its initial noise, so an image is the same alone as in a batch, and seeds give new images.
    from minidiffit.base.runtime import image_generators
    from minidiffit.diffusion import stochastic_sample
    from minidiffit.tools import edm_task

    model, cfg, _ = build_from_checkpoint(ckpt)
    got = edm_task.generate(model, torch.tensor([3, 4, 5]), cfg, 4, sampler="stochastic")
    gens = image_generators([3, 4, 5])
    noise = torch.stack([torch.randn(edm_task.image_shape(cfg), generator=g) for g in gens])
    want = stochastic_sample(model, noise, num_steps=4, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003, generator=gens)
    torch.testing.assert_close(got, want.clamp(-1, 1))
    alone = edm_task.generate(model, torch.tensor([4]), cfg, 4, sampler="stochastic")
    torch.testing.assert_close(alone[0], got[1], rtol=1e-4, atol=1e-4)  # same noise; a batch of 1 vs 3 rounds apart
    heun = edm_task.generate(model, torch.tensor([3, 4, 5]), cfg, 4)
    assert (heun - got).abs().max() > 1e-2  # the churn changes the images


@pytest.mark.parametrize("task", ["edm", "latent"])
def test_each_task_picks_samplers_from_one_table_with_one_error(task):
    """Both tasks name their samplers in a dict name -> function, and refuse another name alike (before any work)."""
    from minidiffit.tools import edm_task, latent_task

    module = {"edm": edm_task, "latent": latent_task}[task]
    assert isinstance(module.SAMPLERS, dict) and all(callable(f) for f in module.SAMPLERS.values())
    with pytest.raises(ValueError, match=f"--sampler=nope: unknown for the '{task}' task; choose one of "
                                         + ", ".join(module.SAMPLERS).replace("+", r"\+")):
        module.generate(None, torch.arange(2), None, sampler="nope")

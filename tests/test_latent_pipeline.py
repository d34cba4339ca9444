"""The imagenet256 pipeline end to end at toy size: synthetic ImageFolder -> prepare (tiny VAE) -> train the
tiny latent DiffiT a few steps -> resume -> sample an ADM-layout npz with labels -> FID (tiny random network).
Plus: per-seed determinism, class balance, guidance plumbing, the released-weights path, clear errors."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from minidiffit import fid, latent
from minidiffit.tools import evaluate, latent_task
from minidiffit.adm import GaussianDiffusion
from minidiffit.tools.imagenet import PrepareConfig, make_synthetic_imagefolder, prepare, write_reference_batch
from minidiffit.latent import LATENT_PRESETS, LatentDiffiT
from minidiffit.tools.released import save_safetensors
from minidiffit.tools.sample import SampleConfig, sample
from minidiffit.base.runtime import load_checkpoint, save_checkpoint
from minidiffit.tools.tasks import build_from_checkpoint
from minidiffit.tools.tasks import train
from minidiffit.train import ema_beta
from minidiffit.tools.vae import VAEConfig, load_vae

QUIET = dict(log=lambda *a: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 synthetic 64 px images in 10 classes, encoded by the tiny VAE into 4x8x8 latents (the tiny preset)."""
    root = tmp_path_factory.mktemp("imagenet")
    make_synthetic_imagefolder(root / "images", num_classes=10, per_class=2, size=64)
    prepare(PrepareConfig(data_dir=str(root / "images"), out=str(root / "latents"), image_size=64, vae="tiny",
                          batch=20, shard_size=8, num_workers=0))
    return root


def run_config(data, out, **kw):
    """The latent task's defaults (as `python -m minidiffit train --task=latent`), shrunk to the tiny preset."""
    cfg = latent_task.Config()
    # a short EMA half-life: at batch 4 the recipe's 0.9999-at-256 would leave the EMA at its initial weights
    small = dict(preset="tiny", data_dir=str(data / "latents"), out=str(out), batch=4, lr=1e-3, ckpt_every=2,
                 log_every=2, grid=0, compile=False, ema_halflife_kimg=0.01)
    return dataclasses.replace(cfg, **{**small, **kw})


@pytest.fixture(scope="module")
def run(data):
    """A 4-step run made as 2 steps + a resume for 2 more (the pipeline's train stage)."""
    out = data / "run"
    assert train(run_config(data, out, iters=2, grid=2, sample_steps=2), **QUIET) == 2
    assert (out / "grid_0000002.png").is_file()  # generate ran inside the loop (VAE from the manifest)
    assert train(run_config(data, out, iters=4, grid=2, sample_steps=2), **QUIET) == 4
    return out


def randomized(model, seed=0):
    """Random (not zero-initialised) weights, so outputs depend on the labels, the guidance and the seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# The recipe


def test_defaults_are_the_papers_recipe():
    d = latent_task.Config()
    assert (d.preset, d.lr, d.batch, d.warmup_kimg, d.betas, d.eps) == ("XL/2", 3e-4, 256, 0, (0.9, 0.999), 1e-8)
    assert not hasattr(d, "augment_p") and not hasattr(d, "dropout")  # EDM's settings are not the latent task's
    # a constant EMA of 0.9999 per step at batch 256 (DiffiT App. I.2), from the loop's own formula
    for nimg in (0, 256, 10**9):
        assert ema_beta(nimg, 256, d.ema_halflife_kimg, d.ema_rampup) == pytest.approx(0.9999, abs=1e-12)
    assert LATENT_PRESETS[d.preset].class_dropout_prob == 0.1  # label dropout lives in the model


def test_loss_is_the_hybrid_loss_at_a_uniform_t():
    torch.manual_seed(0)
    model = LatentDiffiT(LATENT_PRESETS["tiny"])
    x, y = torch.randn(6, 4, 8, 8), torch.arange(6)
    torch.manual_seed(1)
    got = latent_task.loss(model, x, y, None)
    torch.manual_seed(1)  # the same draws, by hand: t, then the noise, then the label dropout
    t = torch.randint(0, 1000, (6,))
    expected = GaussianDiffusion().training_losses(model, x, t, model_kwargs={"y": y})["loss"]
    torch.testing.assert_close(got, expected)
    assert got.shape == (6,) and torch.isfinite(got).all()


# ----------------------------------------------------------------------------
# The pipeline: prepare -> train -> resume -> sample -> evaluate


def test_resumed_run_equals_a_straight_run(data, run):
    straight = data / "straight"
    train(run_config(data, straight, iters=4, ckpt_every=4), **QUIET)
    a, b = load_checkpoint(run / "ckpt.pt"), load_checkpoint(straight / "ckpt.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    # the run trained, and the EMA followed: the zero-initialised output layer has moved in both
    assert a["model"]["final_layer.linear.weight"].abs().max() > 0 and a["ema"]["final_layer.linear.weight"].abs().max() > 0


def test_sample_npz_in_adms_layout_then_evaluate(data, run, tmp_path):
    npz = tmp_path / "samples.npz"
    sample(SampleConfig(ckpt=str(run / "ckpt.pt"), num_samples=20, out=str(npz), steps=4, batch=8), **QUIET)
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(20) % 10)  # image i has class i % num_classes
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # class-balanced
    assert images.std() > 0

    ref = write_reference_batch(data / "images", tmp_path / "ref.npz", image_size=64)
    results = tmp_path / "results.txt"
    value = evaluate.evaluate(evaluate.EvalConfig(samples=str(npz), ref=str(ref), network="tiny-random", results=str(results),
                                        device="cpu"))
    assert math.isfinite(value) and value > 0
    line = results.read_text()
    assert "samples 20" in line and "NOT a real FID" in line and "precision" in line


def test_image_i_depends_on_seed_i_only(run):
    model, cfg, _ = build_from_checkpoint(run / "ckpt.pt")
    randomized(model)
    vae = load_vae(VAEConfig(source="tiny"))
    a = latent_task.generate(model, torch.tensor([0, 1, 2]), cfg, num_steps=5, vae=vae)
    b = latent_task.generate(model, torch.tensor([2, 0]), cfg, num_steps=5, vae=vae)
    assert a.shape == (3, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(b, a[[2, 0]], rtol=0, atol=1e-4)  # float rounding differs with the batch size
    assert (a[0] - a[1]).abs().mean() > 10 * (b - a[[2, 0]]).abs().max()  # another seed is another image


def test_generate_is_guided_ancestral_sampling_by_hand(run):
    """generate == the sampler written out: per-image generators for the noise and every step, labels i % K,
    the release's guidance (power-cosine 4.4 at this size), then the VAE decoder."""
    model, cfg, _ = build_from_checkpoint(run / "ckpt.pt")
    randomized(model, seed=1)
    vae = load_vae(VAEConfig(source="tiny"))
    seeds = torch.tensor([11, 4, 7])
    got = latent_task.generate(model, seeds, cfg, num_steps=6, vae=vae)

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    y = seeds % 10
    d = GaussianDiffusion.respaced("6")
    for i in reversed(range(6)):
        t = torch.full((3,), i)
        t_orig = d.timestep_map[t]
        s = 1 + 3.4 * (1 - torch.cos(math.pi * (1 - t_orig / 1000) ** 4)) / 2  # power-cosine, scale 4.4
        cond = model(x, t_orig, y)
        uncond = model(x, t_orig, torch.full_like(y, 10))  # row 10: the null label of the tiny preset
        eps = torch.cat([uncond[:, :3] + s.view(-1, 1, 1, 1) * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], 1)
        p = d.p_mean_variance(eps, x, t)
        x = p["mean"] + (torch.exp(0.5 * p["log_variance"]) * torch.stack([torch.randn(4, 8, 8, generator=g)
                                                                            for g in gens]) if i > 0 else 0)
    expected = vae.decode(x).clamp(-1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # the guidance reaches the samples (a constant 8 against none; the ramp above is mild at 6 steps)
    unguided = latent_task.generate(model, seeds, cfg, num_steps=6, guidance=1.0, vae=vae)
    strong = latent_task.generate(model, seeds, cfg, num_steps=6, guidance=8.0, vae=vae)
    assert (unguided - strong).abs().max() > 1e-2


def test_the_runs_guidance_is_the_default(run, monkeypatch):
    """Guidance is chosen when sampling: the call's, else the run's --guidance, else its preset's (GUIDANCE: the
    fashion preset's constant 3), else the release's rule."""
    model, cfg, _ = build_from_checkpoint(run / "ckpt.pt")
    randomized(model, seed=2)
    vae, seeds = load_vae(VAEConfig(source="tiny")), torch.tensor([1, 5])
    explicit = latent_task.generate(model, seeds, cfg, num_steps=3, guidance=2.0, vae=vae)
    got = latent_task.generate(model, seeds, dataclasses.replace(cfg, guidance=2.0), num_steps=3, vae=vae)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)
    monkeypatch.setitem(latent_task.GUIDANCE, "tiny", 2.0)  # as the fashion preset has 3.0
    torch.testing.assert_close(latent_task.generate(model, seeds, cfg, num_steps=3, vae=vae), explicit, rtol=0, atol=0)
    release = latent_task.generate(model, seeds, cfg, num_steps=3, guidance=latent.GUIDANCE_PRESETS["256"], vae=vae)
    assert (got - release).abs().max() > 1e-3
    assert latent_task.run_guidance(latent_task.Config(preset="fashion"), LATENT_PRESETS["fashion"]) == 3.0
    assert latent_task.run_guidance(latent_task.Config(), LATENT_PRESETS["XL/2"]) is latent.GUIDANCE_PRESETS["256"]
    assert not hasattr(LATENT_PRESETS["fashion"], "guidance")  # a sampling setting, not the architecture's


def test_released_weights_path_matches_the_model(run, tmp_path, monkeypatch):
    """sample.py --weights=FILE on a file in the release's layout (here: our tiny run exported) gives exactly
    the images of that model, with labels; the export CLI writes such a file from a training checkpoint."""
    monkeypatch.delenv("MINIDIFFIT_VAE", raising=False)  # the header names the run's VAE (the tiny one): no override
    weights = tmp_path / "tiny.safetensors"
    latent_task.main(["export", f"--ckpt={run / 'ckpt.pt'}", f"--out={weights}"])
    npz = tmp_path / "released.npz"
    sample(SampleConfig(weights=str(weights), num_samples=6, out=str(npz), steps=3, batch=6), **QUIET)
    model, cfg, _ = build_from_checkpoint(run / "ckpt.pt")  # the EMA weights, which export wrote
    expected = latent_task.generate(model, torch.arange(6), cfg, num_steps=3, vae=load_vae(VAEConfig(source="tiny")))
    with np.load(npz) as z:
        assert np.abs(z["arr_0"].astype(int) - fid.as_uint8_nchw(expected).permute(0, 2, 3, 1).numpy()).max() <= 1
        np.testing.assert_array_equal(z["arr_1"], np.arange(6) % 10)

    other = randomized(LatentDiffiT(LATENT_PRESETS["tiny"]))  # save_safetensors -> released_model round trip
    save_safetensors(other, tmp_path / "other.safetensors")
    loaded, rcfg = latent_task.released_model(tmp_path / "other.safetensors")
    assert rcfg.task == "latent" and loaded.cfg == other.cfg and rcfg.vae == ""  # no header: the release's rules
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(x, t, y), other(x, t, y), rtol=0, atol=0)


def test_an_exported_file_samples_as_its_run(run, tmp_path, monkeypatch):
    """export records what the weights alone do not say, the preset's guidance and the VAE of the run's latents,
    so sample.py --weights on the file makes the images sample.py --ckpt makes (not the release's guidance, not
    SD's VAE)."""
    guidance = latent.Guidance(scale=2.5, schedule="constant")
    monkeypatch.setitem(latent_task.GUIDANCE, "tiny", guidance)  # as the fashion preset's constant 3
    monkeypatch.delenv("MINIDIFFIT_VAE", raising=False)  # the VAE comes from the run's manifest: the tiny one
    model, cfg, ckpt = build_from_checkpoint(run / "ckpt.pt")
    randomized(model, seed=3)  # trained 4 steps, the model's output hardly depends on the guidance: make it
    save_checkpoint(dict(ckpt, ema=model.state_dict()), tmp_path / "ckpt.pt")
    weights = tmp_path / "tiny.safetensors"
    latent_task.export(tmp_path / "ckpt.pt", weights)
    loaded, rcfg = latent_task.released_model(weights)
    assert rcfg.guidance == guidance and (rcfg.vae, rcfg.vae_scale) == latent_task.vae_source(cfg)
    npz = tmp_path / "exported.npz"
    sample(SampleConfig(weights=str(weights), num_samples=4, out=str(npz), steps=3, batch=4, quantize="round"), **QUIET)
    expected = latent_task.generate(model, torch.arange(4), cfg, num_steps=3)
    release = latent_task.generate(model, torch.arange(4), cfg, num_steps=3, guidance=latent.GUIDANCE_PRESETS["256"])
    assert (expected - release).abs().max() > 1e-3  # the guidance matters here
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["arr_0"], fid.as_uint8_nchw(expected).permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------
# Clear errors


def test_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match="--image_size=256"):  # 8x8 latents for a 32x32-latent preset
        latent_task.load_data(run_config(data, tmp_path, preset="S/2"))
    with pytest.raises(ValueError, match="python -m minidiffit imagenet prepare"):
        latent_task.load_data(run_config(data, tmp_path, data_dir=None))
    with pytest.raises(ValueError, match="unknown for task 'latent'"):
        run_config(data, tmp_path, preset="cifar10")
    with pytest.raises(FileNotFoundError, match="huggingface.co/nvidia/DiffiT"):
        latent_task.released_model(tmp_path / "diffit_256.safetensors")


def test_reference_batch_refuses_more_images_than_the_folder_holds(tmp_path):
    make_synthetic_imagefolder(tmp_path / "images", num_classes=2, per_class=2, size=64)
    with pytest.raises(ValueError, match="holds only 4 images"):
        write_reference_batch(tmp_path / "images", tmp_path / "ref.npz", image_size=64, num=5)

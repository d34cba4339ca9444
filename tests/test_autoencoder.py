"""Our KL autoencoder (autoencoder.py) and its task (tools/autoencoder_task.py): shapes, training that reconstructs,
the measured scale factor, resume through train.py's loop, load_vae on its ckpt.pt, the command line; then
Fashion-MNIST latents through it (imagenet.prepare --data=...) and back to images at sampling time (latent_task).
Real-data tests skip without a Fashion-MNIST copy; the loop's tests on the synthetic set always run."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from minidiffit.tools import autoencoder_task, latent_task
from minidiffit.tools.tasks import main as train_main
from minidiffit.autoencoder import (Autoencoder, AutoencoderConfig, AutoencoderVAE, autoencoder_loss, kl_divergence,
                                    load_autoencoder, measure_scale, psnr, reconstruct)
from minidiffit.base.data import load_dataset, synthetic_dataset, to_float
from minidiffit.tools.imagenet import LatentShardDataset, PrepareConfig, prepare
from minidiffit.base.runtime import load_checkpoint
from minidiffit.tools.vae import VAEConfig, load_vae

pytestmark = pytest.mark.usefixtures("one_thread")

# The torchvision root holding FashionMNIST/raw: $MINIDIFFIT_FASHION_MNIST, else ../shared/data next to the repo.
FASHION = Path(os.environ.get("MINIDIFFIT_FASHION_MNIST") or Path(__file__).resolve().parents[2] / "shared/data/fashion_mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "FashionMNIST").is_dir(), reason=(
    f"no Fashion-MNIST copy at {FASHION}: set MINIDIFFIT_FASHION_MNIST to a torchvision root holding FashionMNIST/"))


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion_mnist", str(FASHION), train=True), load_dataset("fashion_mnist", str(FASHION), train=False)


def small_cfg(out, **kw):
    """A narrow autoencoder and a short run: what the command line tests train."""
    return dict(data_dir=str(FASHION), out=str(out), channels="8,16,16", batch=16, scale_images=300, test_images=200,
                ckpt_every=10, log_every=10, **kw)


def main(args):
    train_main(["--task=autoencoder", "--compile=false", *args])


def cli(cfg):
    main([f"--{k}={v}" for k, v in cfg.items()])
    return load_checkpoint(Path(cfg["out"]) / "ckpt.pt")


def synthetic_cfg(out, **kw):
    """The same short run on the synthetic set (gray discs): no download, so these tests always run."""
    return dict(data="synthetic", num_data=48, out=str(out), channels="8,16,16", batch=16, scale_images=48,
                test_images=20, ckpt_every=5, log_every=5, grid=4, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 20-step run on the real training set: its checkpoint has the measured scale, a grid and the test PSNR."""
    if not (FASHION / "FashionMNIST").is_dir():
        pytest.skip(f"no Fashion-MNIST copy at {FASHION}")
    out = tmp_path_factory.mktemp("ae")
    return out, cli(small_cfg(out, iters=20))


# ----------------------------------------------------------------------------
# The model


def test_shapes_and_the_latent_vae_interface():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig()).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, 4, 8, 8)  # downsampling 4, 4 latent channels
    assert model.decode(mean).shape == (3, 1, 32, 32)
    recon, m, lv = model(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.equal(m, mean)
    vae = AutoencoderVAE(model, scale=0.5)
    assert (vae.image_channels, vae.latent_channels, vae.downsampling) == (1, 4, 4)
    torch.testing.assert_close(vae.encode(x, sample=False), mean * 0.5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sample = mean + (0.5 * logvar).exp() * torch.randn(3, 4, 8, 8, generator=g2)
    torch.testing.assert_close(vae.encode(x, generator=g1), sample * 0.5)
    torch.testing.assert_close(vae.decode(mean * 0.5), model.decode(mean))
    # the KL of N(mean, exp(logvar)) to N(0, 1), summed: zero at the prior, 0.5 * mu^2 for a shifted unit Gaussian
    assert kl_divergence(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)).tolist() == [0, 0]
    torch.testing.assert_close(kl_divergence(torch.full((1, 4, 8, 8), 2.0), torch.zeros(1, 4, 8, 8)), torch.tensor([512.0]))


def test_scale_is_one_over_the_std_of_the_latents():
    images = synthetic_dataset(num=70, resolution=32, channels=1).images  # (70, 1, 32, 32) uint8
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig()).eval()
    with torch.no_grad():  # independently: the whole set at once, one posterior sample per image from one generator
        mean, logvar = model.encode(to_float(images))
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = 1 / z.double().std().item()
    assert measure_scale(model, images, batch=16, seed=3) == pytest.approx(expected, rel=1e-5)  # batches of 16
    assert measure_scale(model, images, batch=16, seed=4) != pytest.approx(expected, rel=1e-5)  # the sample counts


@needs_fashion
def test_a_few_hundred_steps_reconstruct_real_images(fashion):
    train, test = fashion
    cfg = autoencoder_task.Config()  # the task's defaults: the model's and lr 2e-3
    torch.manual_seed(0)
    model = Autoencoder(cfg)
    before = reconstruct(model.eval(), test.images[:200])
    optimizer = torch.optim.Adam(model.train().parameters(), lr=cfg.lr)
    images, g = train.images[:1024], torch.Generator().manual_seed(0)
    for step in range(200):
        x = to_float(images[torch.randint(len(images), (16,), generator=g)])
        loss = autoencoder_loss(model, x, cfg, g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruct(model.eval(), test.images[:200])
    error = lambda r: (r.float() - test.images[:200].float()).abs().mean().item()  # noqa: E731
    assert error(after) < error(before) / 4  # on unseen test images
    assert psnr(after, test.images[:200]) > psnr(before, test.images[:200]) + 8  # dB


# ----------------------------------------------------------------------------
# The command line: train, measure, resume, rerun; load_vae


@needs_fashion
def test_run_stores_the_measured_scale_grid_and_psnr(run, fashion):
    out, ckpt = run
    assert {"model", "ema", "config", "step", "optimizer", "scale", "psnr", "data"} <= set(ckpt) and ckpt["step"] == 20
    assert (out / "recon.png").is_file() and ckpt["psnr"] > 5
    model = Autoencoder(AutoencoderConfig(channels=(8, 16, 16))).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():  # 1 / std of posterior samples of the first scale_images training images, seeded by seed 0
        mean, logvar = model.encode(to_float(fashion[0].images[:300]))
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert ckpt["scale"] == pytest.approx(1 / z.double().std().item(), rel=1e-5)


@needs_fashion
def test_resumed_run_equals_a_straight_run_and_a_finished_one_does_nothing(run, tmp_path, capsys):
    first = run[1]
    out = tmp_path / "resumed"  # a copy: the run itself stays as the other tests expect it
    out.mkdir()
    shutil.copy(run[0] / "ckpt.pt", out / "ckpt.pt")
    resumed = cli(small_cfg(out, iters=30))  # 20 steps done, 10 more: then the scale is measured again
    straight = cli(small_cfg(tmp_path / "straight", iters=30))
    assert resumed["step"] == straight["step"] == 30
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    assert resumed["scale"] == straight["scale"] != first["scale"]
    capsys.readouterr()
    again = cli(small_cfg(out, iters=30))
    assert "already done" in capsys.readouterr().out and again["step"] == 30
    with pytest.raises(SystemExit) as e:  # another run's settings in the same folder
        main([f"--{k}={v}" for k, v in small_cfg(out, iters=30, lr=1e-3).items()])
    assert e.value.code == 2 and "different run (lr" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(capsys):
    for args, message in [(["--lr=-1"], "--lr=-1.0: must be > 0"), (["--channels=8,16"], "three positive widths"),
                          (["--loss=l3"], "choose l1 or l2"), (["--btach=3"], "unknown config key 'btach'"),
                          (["--data=mnist"], "--data=mnist: choose fashion_mnist, cifar10 or synthetic")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@needs_fashion
def test_load_vae_round_trips_the_checkpoint(run, fashion, tmp_path):
    out, ckpt = run
    vae = load_vae(VAEConfig(source=str(out / "ckpt.pt")))  # scale: None = the measured one in the file
    assert isinstance(vae, AutoencoderVAE) and vae.scale == ckpt["scale"] and not vae.training
    model = Autoencoder(AutoencoderConfig(channels=(8, 16, 16))).eval()
    model.load_state_dict(ckpt["model"])
    x = to_float(fashion[1].images[:4])
    with torch.no_grad():
        mean, logvar = model.encode(x)
        torch.testing.assert_close(vae.encode(x, sample=False), mean * ckpt["scale"], rtol=0, atol=0)
        torch.testing.assert_close(vae.decode(mean * ckpt["scale"]), model.decode(mean), rtol=0, atol=1e-6)
    same = load_vae(VAEConfig(source=str(out / "ckpt.pt"), scale=ckpt["scale"]))  # a manifest's scale: the same
    torch.testing.assert_close(same.encode(x, sample=False), vae.encode(x, sample=False), rtol=0, atol=0)
    with pytest.raises(ValueError, match="retrained"):  # latents made with another scale: another autoencoder
        load_vae(VAEConfig(source=str(out / "ckpt.pt"), scale=0.5))
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint"):
        load_vae(VAEConfig(source=str(tmp_path / "none.pt")))


# ----------------------------------------------------------------------------
# Fashion-MNIST latents: prepare --data=fashion_mnist, then decoding at sampling time


@needs_fashion
def test_prepare_fashion_mnist_latents_and_decode_them(run, fashion, tmp_path, capsys):
    out, ckpt = run
    source = str(out / "ckpt.pt")
    cfg = PrepareConfig(data="fashion_mnist", data_dir=str(FASHION), out=str(tmp_path / "latents"), vae=source, num=40,
                        batch=16, shard_size=16, dtype="float32", sample_posterior=False, num_workers=0, device="cpu")
    manifest = prepare(cfg)
    assert manifest["complete"] and manifest["latent_shape"] == [2, 4, 8, 8] and manifest["image_size"] == 32
    assert manifest["num_images"] == 40 and [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["vae"] == source and manifest["scale_factor"] == ckpt["scale"] and manifest["num_classes"] == 10
    assert manifest["classes"][0] == "T-shirt/top"
    assert json.loads((tmp_path / "latents" / "manifest.json").read_text())["complete"]
    data = LatentShardDataset(tmp_path / "latents", random_flip=False)
    stored = torch.cat([data._shard(s)[0] for s in range(3)])  # (40, 2, 4, 8, 8): as is, mirrored
    labels = torch.cat([data._shard(s)[1] for s in range(3)])
    vae = load_vae(VAEConfig(source=source))
    x = to_float(fashion[0].images[:40])
    torch.testing.assert_close(stored[:, 0], vae.encode(x, sample=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored[:, 1], vae.encode(x.flip(-1), sample=False), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stored[:, 0], stored[:, 1], atol=1e-3) and torch.equal(labels, fashion[0].labels[:40])

    capsys.readouterr()
    prepare(cfg)  # the plan check on resume: the same settings find it done
    assert "already encoded" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different settings.*num_images"):
        prepare(PrepareConfig(**{**cfg.__dict__, "num": 20}))

    # Sampling decodes with the autoencoder and the scale the manifest names, not SD's VAE.
    run_cfg = latent_task.Config(preset="fashion", data_dir=str(tmp_path / "latents"))
    assert latent_task.vae_source(run_cfg) == (source, ckpt["scale"])
    assert latent_task.load_data(run_cfg).manifest["latent_shape"][1:] == [4, 8, 8]  # fits the fashion preset
    decoder = latent_task._cached_vae(source, ckpt["scale"], "cpu")
    images = latent_task.decode(decoder, stored[:5, 0])
    assert images.shape == (5, 1, 32, 32)
    torch.testing.assert_close(images, vae.decode(stored[:5, 0]).clamp(-1, 1))


# ----------------------------------------------------------------------------
# The task in train.py's loop, on the synthetic set: the checkpoint load_vae reads, resume, the old command name


def test_the_task_trains_in_the_loop_and_stores_what_load_vae_reads(tmp_path, capsys):
    ckpt = cli(synthetic_cfg(tmp_path / "a", iters=10))
    assert ckpt["step"] == 10 and ckpt["config"]["task"] == "autoencoder" and ckpt["psnr"] > 5
    for name, value in ckpt["model"].items():  # no EMA by default: the loop's EMA is a copy of the weights
        torch.testing.assert_close(ckpt["ema"][name], value, rtol=0, atol=0, msg=name)
    assert (tmp_path / "a" / "recon.png").is_file() and (tmp_path / "a" / "grid_0000010.png").is_file()
    model, scale = load_autoencoder(tmp_path / "a" / "ckpt.pt")
    assert scale == ckpt["scale"] and model.cfg == AutoencoderConfig(channels=(8, 16, 16))
    images = synthetic_dataset(num=48, resolution=32, channels=1).images  # the training set: the scale is measured on it
    assert measure_scale(model, images, seed=0) == pytest.approx(scale, rel=1e-6)
    vae = load_vae(VAEConfig(source=str(tmp_path / "a" / "ckpt.pt")))
    assert isinstance(vae, AutoencoderVAE) and vae.scale == scale


def test_the_task_resumes_bit_exactly_and_the_old_command_name_is_the_same_thing(tmp_path, capsys):
    from minidiffit.__main__ import main as dispatch

    cli(synthetic_cfg(tmp_path / "r", iters=5))
    assert load_checkpoint(tmp_path / "r" / "ckpt.pt")["scale"] is not None
    resumed = cli(synthetic_cfg(tmp_path / "r", iters=12))  # trains on: the scale is measured again at the end
    dispatch(["autoencoder", *[f"--{k}={v}" for k, v in synthetic_cfg(tmp_path / "s", iters=12).items()]])
    straight = load_checkpoint(tmp_path / "s" / "ckpt.pt")
    assert resumed["step"] == straight["step"] == 12
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    assert resumed["scale"] == straight["scale"] and resumed["psnr"] == straight["psnr"]


def test_a_run_killed_before_measuring_measures_when_rerun(tmp_path, capsys):
    cli(synthetic_cfg(tmp_path / "k", iters=5))
    path = tmp_path / "k" / "ckpt.pt"
    ckpt = load_checkpoint(path)
    torch.save({**ckpt, "scale": None, "psnr": None}, path)  # as a kill between the last save and the scale leaves it
    with pytest.raises(ValueError, match="no measured scale"):
        load_autoencoder(path)
    again = cli(synthetic_cfg(tmp_path / "k", iters=5))
    assert "already done" in capsys.readouterr().out and again["scale"] == ckpt["scale"]

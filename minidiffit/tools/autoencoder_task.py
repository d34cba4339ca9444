"""The laptop tier's KL autoencoder as a training task: train.py's loop, then its latent scale and test PSNR.

Plugs `autoencoder.Autoencoder` (LDM's KL autoencoder in miniature, DESIGN.md 2b) into train.py's loop as the
task "autoencoder": the same data order, checkpoint, resume and divergence stop as the diffusion tasks. A task
is a Config and build_model, loss, generate, load_data (edm_task.py); this one adds `finish`, which the loop
calls once training is over: it measures the latent scale factor (autoencoder.measure_scale, as LDM measured
SD's 0.18215), writes recon.png and the test PSNR, and stores scale and PSNR in ckpt.pt, where
`vae.load_vae(VAEConfig(source="DIR/ckpt.pt"))` (autoencoder.load_autoencoder) reads them. Introduced in
notebooks/07_latent_space.ipynb. Command line:
    python -m minidiffit train --task=autoencoder --data=fashion_mnist --data_dir=DIR --out=runs/fashion/ae --minutes=3
"""

import functools
import sys
import time
from dataclasses import dataclass

import torch

from .. import train as loop
from ..autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss, measure_scale, psnr, reconstruct
from ..base.config import RunConfig, check, run_command
from ..base.data import load_dataset, save_grid, synthetic_dataset, to_float
from ..base.runtime import load_checkpoint, save_checkpoint


@dataclass
class Config(RunConfig, AutoencoderConfig):  # the model's fields (AutoencoderConfig) and the loop's (RunConfig)
    task: str = "autoencoder"  # the laptop tier's KL autoencoder (autoencoder.py)
    data: str = "fashion_mnist"  # the set it trains on (its training split): fashion_mnist, cifar10, or synthetic (tests)
    num_data: int = 1024  # size of the synthetic set (--data=synthetic only)
    out: str = "runs/fashion/ae"  # run directory: ckpt.pt (weights, config, step; then scale and PSNR), recon.png
    iters: int = 100_000  # optimizer steps (--minutes usually stops the run first)
    batch: int = 64  # images per step
    lr: float = 2e-3  # Adam learning rate, constant (no warm-up)
    warmup_kimg: float = 0.0  # no lr warm-up
    # Choice: no EMA (LDM trains its autoencoders without one); the loop's EMA is then a copy of the weights,
    # which is what the grids, the scale and load_autoencoder use. --ema_halflife_kimg=N turns one on.
    ema_halflife_kimg: float = 0.0  # 0: no average
    ckpt_every: int = 500  # steps between checkpoints (one is also written at the end)
    grid: int = 16  # reconstructions of the first test images in the grid written with each checkpoint (0 = none)
    scale_images: int = 10_000  # training images the scale factor is measured on (the first ones; 0 = all)
    test_images: int = 10_000  # test images the reconstruction PSNR is measured on (the first ones; 0 = all)

    RESUMABLE = RunConfig.RESUMABLE + ("test_images",)  # measured after training: the weights do not depend on it

    def __post_init__(self):
        self.channels = tuple(self.channels)
        super().__post_init__()

    def validate(self):
        RunConfig.validate(self)
        AutoencoderConfig.validate(self)
        check(self.task == "autoencoder", f"--task={self.task}: this is the autoencoder's config (task autoencoder)")
        check(self.data in ("fashion_mnist", "cifar10", "synthetic"),
              f"--data={self.data}: choose fashion_mnist, cifar10 or synthetic")
        check(min(self.scale_images, self.test_images) >= 0 and self.num_data > 1,
              "--scale_images and --test_images must be >= 0, --num_data > 1")


def model_config(cfg):
    """The AutoencoderConfig part of the task's Config: what the model is built from (and load_autoencoder reads)."""
    return AutoencoderConfig(**{k: getattr(cfg, k) for k in AutoencoderConfig.__dataclass_fields__})


def build_model(cfg):
    return Autoencoder(model_config(cfg))


def loss(model, images, labels, cfg):
    """(B,) L1 (or L2) reconstruction error summed over pixels + kl_weight * KL; labels are unused. The posterior
    sample comes from torch's global generator, which the loop seeds per micro-batch."""
    return autoencoder_loss(model, images, cfg)


def _load(cfg, train):
    if cfg.data == "synthetic":  # the test split: the same recipe with another seed
        return synthetic_dataset(num=cfg.num_data, resolution=32, seed=0 if train else 1, channels=cfg.image_channels)
    return load_dataset(cfg.data, cfg.data_dir or None, train=train)


def load_data(cfg):
    data = _load(cfg, train=True)
    C, H, W = data.images.shape[1:]
    check(C == cfg.image_channels, f"--data={cfg.data} has {C}-channel images; pass --image_channels={C}")
    check(H % Autoencoder.downsampling == 0 and W % Autoencoder.downsampling == 0,
          f"{cfg.data} images are {(H, W)}: the sides must be multiples of {Autoencoder.downsampling}")
    return data


@functools.lru_cache(maxsize=1)
def _test_images(data, data_dir, image_channels, num_data, test_images):
    cfg = Config(data=data, data_dir=data_dir, image_channels=image_channels, num_data=num_data)
    return _load(cfg, train=False).images[:test_images or None]  # (N, C, H, W) uint8


def test_images(cfg):
    """The first cfg.test_images images of the test split, uint8 (loaded once per process)."""
    return _test_images(cfg.data, cfg.data_dir, cfg.image_channels, cfg.num_data, cfg.test_images)


# sample.py --sampler: an autoencoder has no sampler; its "samples" are reconstructions
SAMPLERS = ()


@torch.no_grad()
def generate(model, seeds, cfg, num_steps=None, **options):
    """Reconstructions (from the posterior means) of test images `seeds` (wrapping around), float in [-1, 1]:
    what the loop's checkpoint grids show for this task (sample.py likewise)."""
    device = next(model.parameters()).device
    images = test_images(cfg)
    x = images[torch.as_tensor(seeds, dtype=torch.int64) % len(images)].to(device)  # (N, C, H, W) uint8
    return to_float(reconstruct(model, x))


# ----------------------------------------------------------------------------
# After training: the scale factor, the reconstruction grid and PSNR, stored in the checkpoint


def finish(run):
    """Measure the latent scale (1 / std of the latents of the first cfg.scale_images training images) and the
    test PSNR with the weights the loop just saved, and add both to ckpt.pt. Done once: a finished run's rerun
    only reports them; a resumed run that trains further saves a checkpoint without them, so they are measured
    again. A kill in here loses nothing: the trained weights are already on disk."""
    cfg, path = run.cfg, run.out / "ckpt.pt"
    ckpt = load_checkpoint(path, what="autoencoder checkpoint")
    if ckpt.get("scale") is not None:
        run.log(f"scale factor {ckpt['scale']:.5f}, test PSNR {ckpt['psnr']:.2f} dB (measured when the run ended)")
        return ckpt
    t0 = time.time()
    model = run.ema.eval()  # == the weights (no EMA by default); what load_autoencoder loads
    subset = run.data.images[:cfg.scale_images or len(run.data)].to(run.device)
    scale = measure_scale(model, subset, seed=cfg.seed)
    test = test_images(cfg)
    recon = reconstruct(model, test.to(run.device)).cpu()
    value = psnr(recon, test)
    grid = run.out / "recon.png"
    save_grid(to_float(torch.cat([test[:16], recon[:16]])), grid, nrow=16)  # originals, then reconstructions
    ckpt = {**ckpt, "scale": scale, "psnr": value}
    save_checkpoint(ckpt, path)
    run.log(f"scale factor {scale:.5f} (1 / std of the latents of {len(subset)} training images); test PSNR {value:.2f} dB "
            f"on {len(test)} images (posterior means, uint8); grid {grid} ({time.time() - t0:.1f}s)")
    return ckpt


def main(argv=None):
    """`python -m minidiffit autoencoder ARGS`: the same as `python -m minidiffit train --task=autoencoder ARGS`."""
    run_command("minidiffit autoencoder", __doc__, {"": (lambda a: Config(), lambda cfg: loop.train(sys.modules[__name__], cfg))},
                argv)

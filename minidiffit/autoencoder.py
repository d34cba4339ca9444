"""A small KL autoencoder for the laptop tier: 32x32x1 Fashion-MNIST images <-> 8x8x4 latents (DESIGN.md 2b).

The ImageNet recipe in miniature: Latent DiffiT diffuses in the latent space of Stable Diffusion's KL
autoencoder (LDM, Rombach et al. 2022, Sec. 3 and App. G); here a conv autoencoder of the same kind (ResNet
blocks, GroupNorm, SiLU; downsampling 4 where SD's is 8, 4 latent channels as SD), trained on the data in
a few CPU minutes. The encoder gives a diagonal Gaussian, a small KL penalty keeps the latents tame, and
the latent scale factor is then measured as LDM measured SD's 0.18215: 1 / std of the latents.
`AutoencoderVAE` gives it vae.LatentVAE's interface, so `vae.load_vae(VAEConfig(source="DIR/ckpt.pt"))`,
imagenet.prepare and the latent task take it as they take SD's VAE. It trains in train.py's loop as the task
"autoencoder" (tools/autoencoder_task.py). Introduced in notebooks/07_latent_space.ipynb. Command line:
    python -m minidiffit train --task=autoencoder --data=fashion_mnist --data_dir=DIR --out=runs/fashion/ae --minutes=3
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base.config import check
from .base.data import to_float, to_uint8
from .base.runtime import dataclass_from_dict, load_checkpoint, load_weights

# ----------------------------------------------------------------------------
# Config


@dataclass
class AutoencoderConfig:
    image_channels: int = 1  # channels of the images (Fashion-MNIST: 1, gray)
    latent_channels: int = 4  # channels of the latents (4, as SD's VAE)
    channels: tuple = (16, 32, 32)  # conv widths at 32x32, 16x16, 8x8 (two stride-2 steps: downsampling 4)
    # Choice: L1 as LDM's autoencoders (no LPIPS or GAN term: at 32x32 gray they buy little for their cost).
    loss: str = "l1"  # reconstruction loss, summed over pixels: l1 or l2
    # Choice: LDM's KL weight is 1e-6 against a loss summed over 256x256x3 pixels and 32x32x4 latents; we
    # have 4 pixels per latent value, not 48, and want latents a small diffusion model finds easy, so more.
    kl_weight: float = 1e-4  # weight of the KL(posterior || N(0, I)) penalty, summed over latent values

    def __post_init__(self):
        self.channels = tuple(self.channels)

    def validate(self):
        check(len(self.channels) == 3 and min(self.channels) > 0,
              f"--channels={','.join(map(str, self.channels))}: three positive widths (32x32, 16x16, 8x8), e.g. 32,64,64")
        check(all(c % 8 == 0 for c in self.channels), "--channels: multiples of 8 (GroupNorm with 8 groups)")
        check(min(self.image_channels, self.latent_channels) > 0, "--image_channels and --latent_channels must be > 0")
        check(self.loss in ("l1", "l2"), f"--loss={self.loss}: choose l1 or l2")
        check(self.kl_weight >= 0, f"--kl_weight={self.kl_weight}: must be >= 0")


# ----------------------------------------------------------------------------
# The model: SD's autoencoder layout, two levels smaller


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): the ResNet block of LDM's autoencoder (no time input)."""

    def __init__(self, channels):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 1, 32, 32) images -> (B, 2 * 4, 8, 8): the mean and log-variance of the latent Gaussian."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        c0, c1, c2 = cfg.channels
        self.layers = nn.Sequential(
            nn.Conv2d(cfg.image_channels, c0, 3, padding=1), ResBlock(c0),  # 32x32
            nn.Conv2d(c0, c1, 3, stride=2, padding=1), ResBlock(c1),  # 16x16
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), ResBlock(c2),  # 8x8
            nn.GroupNorm(8, c2), nn.SiLU(), nn.Conv2d(c2, 2 * cfg.latent_channels, 3, padding=1),
        )

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(B, 4, 8, 8) latents -> (B, 1, 32, 32) images in about [-1, 1] (not squashed: clamp when quantising)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        c0, c1, c2 = cfg.channels

        def up(a, b):  # nearest-neighbour 2x, then a 3x3 conv (LDM's Upsample)
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1))

        self.layers = nn.Sequential(
            nn.Conv2d(cfg.latent_channels, c2, 3, padding=1), ResBlock(c2),  # 8x8
            up(c2, c1), ResBlock(c1),  # 16x16
            up(c1, c0), ResBlock(c0),  # 32x32
            nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, cfg.image_channels, 3, padding=1),
        )

    def forward(self, z):
        return self.layers(z)


class Autoencoder(nn.Module):
    """KL autoencoder: encode -> (mean, logvar) of a diagonal Gaussian over (B, 4, 8, 8), decode -> images."""

    downsampling = 4  # two stride-2 convolutions

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def encode(self, x):
        """(B, 1, 32, 32) in [-1, 1] -> mean, logvar, each (B, 4, 8, 8) (unscaled latents)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps the same way

    def decode(self, z):
        return self.decoder(z)  # (B, 1, 32, 32)

    def forward(self, x, generator=None):
        """Training pass: (reconstruction from a posterior sample, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = sample_posterior(mean, logvar, generator)
        return self.decode(z), mean, logvar


def sample_posterior(mean, logvar, generator=None):
    """z = mean + std * eps, eps ~ N(0, I) from `generator` (the reparameterisation trick)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


def kl_divergence(mean, logvar):
    """(B,) KL(N(mean, exp(logvar)) || N(0, I)), summed over the latent values (LDM's `kl()`)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def autoencoder_loss(model, x, cfg, generator=None):
    """(B,) reconstruction error summed over pixels + kl_weight * KL, per image (LDM's nll + kl terms)."""
    recon, mean, logvar = model(x, generator)
    err = (recon - x).abs() if cfg.loss == "l1" else (recon - x).pow(2)
    return err.flatten(1).sum(1) + cfg.kl_weight * kl_divergence(mean, logvar)


# ----------------------------------------------------------------------------
# The latent scale factor and the reconstruction error


@torch.no_grad()
def measure_scale(model, images, batch=500, seed=0):
    """1 / std of the unscaled latents of `images` (uint8 (N, C, H, W)): how LDM obtained SD's 0.18215.

    LDM (`scale_by_std`) takes one posterior sample per image and the std over all of its values (one number
    for all channels); so do we, with the samples drawn from a generator seeded with `seed`, batch after
    batch (the draws are the same as one draw for the whole set), and the moments summed in float64.
    """
    g = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(images), batch):
        z = sample_posterior(*model.encode(to_float(images[i:i + batch])), generator=g).double()  # (b, 4, 8, 8)
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    var = (total_sq - count * mean**2) / (count - 1)  # unbiased, as torch.std
    return 1.0 / math.sqrt(var)


@torch.no_grad()
def reconstruct(model, images, batch=500):
    """uint8 images (N, C, H, W) -> uint8 reconstructions from the posterior means, quantised as saved PNGs."""
    return torch.cat([to_uint8(model.decode(model.encode(to_float(images[i:i + batch]))[0]))
                      for i in range(0, len(images), batch)])


def psnr(a, b):
    """PSNR in dB between uint8 image sets: 10 log10(255^2 / MSE), the MSE over every pixel of the set."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


# ----------------------------------------------------------------------------
# vae.LatentVAE's interface


class AutoencoderVAE(nn.Module):
    """Images in [-1, 1] (B, 1, 32, 32) <-> scaled latents (B, 4, 8, 8), as vae.LatentVAE for SD's VAE."""

    def __init__(self, autoencoder, scale):
        super().__init__()
        self.autoencoder, self.scale = autoencoder, scale
        self.image_channels = autoencoder.cfg.image_channels  # 1 (SD: 3)
        self.latent_channels = autoencoder.cfg.latent_channels  # 4 (SD: 4)
        self.downsampling = autoencoder.downsampling  # 4 (SD: 8)

    @torch.no_grad()
    def encode(self, images, sample=True, generator=None):
        """Scaled latents: a posterior sample (`sample=True`) or its mean, times the measured scale."""
        mean, logvar = self.autoencoder.encode(images)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return z * self.scale  # (B, 4, H/4, W/4)

    @torch.no_grad()
    def decode(self, latents):
        """Images in about [-1, 1] (not clamped: clamp when quantising to uint8)."""
        return self.autoencoder.decode(latents / self.scale)  # (B, 1, H, W)


def load_autoencoder(path, device="cpu"):
    """(Autoencoder in eval mode, measured scale) from the ckpt.pt of a `train --task=autoencoder` run (or of the
    older `python -m minidiffit autoencoder`, whose config says kind "autoencoder" and which kept no EMA)."""
    ckpt = load_checkpoint(path, what="autoencoder checkpoint")
    config = ckpt["config"]
    if "autoencoder" not in (config.get("task"), config.get("kind")):
        raise ValueError(f"{path} is not an autoencoder checkpoint (it is a {config.get('task', '?')!r} training "
                         f"run); pass the ckpt.pt of `python -m minidiffit train --task=autoencoder --out=DIR`")
    if ckpt.get("scale") is None:
        raise ValueError(f"autoencoder {path} has no measured scale factor yet (its run stopped before the end); rerun "
                         f"`python -m minidiffit train --task=autoencoder` with the same settings to finish it")
    model = Autoencoder(dataclass_from_dict(AutoencoderConfig, config))
    # The weights the loop evaluates: its EMA (autoencoder_task turns the average off, so it equals the weights)
    load_weights(model, ckpt["ema"] if "ema" in ckpt else ckpt["model"], path, what="autoencoder checkpoint")
    return model.to(device).eval().requires_grad_(False), ckpt["scale"]

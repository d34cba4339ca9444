"""The Stable Diffusion VAE that maps 256x256x3 images to 32x32x4 latents and back (DiffiT Sec. 3.3).

Latent DiffiT, like DiT and LDM, diffuses in the latent space of Stable Diffusion's KL autoencoder
(`stabilityai/sd-vae-ft-ema` or `-mse`), an 8x spatial downsampling; latents are multiplied by 0.18215 so
they have roughly unit variance. We use diffusers' `AutoencoderKL` (an optional dependency, imported only
here, lazily), a tiny randomly initialised one built from a config for tests and FAST mode, and, for the
laptop tier, our own small autoencoder (autoencoder.py) from its `ckpt.pt`, with the scale it measured.
Introduced in notebooks/07_latent_space.ipynb.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

SD_VAE_SCALE = 0.18215  # LDM's scale factor: 1 / std of the SD VAE's latents on its training data


@dataclass
class VAEConfig:
    # Hugging Face id, a local diffusers directory, "tiny" (random, no download), or a path ending in .pt:
    # the ckpt.pt of our own autoencoder (`python -m minidiffit autoencoder`)
    source: str = "stabilityai/sd-vae-ft-ema"
    # latents are multiplied by this after encoding, divided before decoding. None: the source's own
    # (0.18215 for SD's VAEs, the measured one stored in an autoencoder ckpt.pt, which a value must match)
    scale: float | None = None


def is_autoencoder_checkpoint(source):
    """True when `source` names one of our autoencoder checkpoints (a .pt file) rather than an SD VAE."""
    return str(source).endswith(".pt")


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("the latent path needs diffusers (the Stable Diffusion VAE): "
                          "pip install minidiffit[latent]") from None
    return AutoencoderKL


def tiny_autoencoder(seed=0):
    """A randomly initialised AutoencoderKL with the SD layout (4 levels -> 8x downsampling, 4 latent
    channels) but 16 channels per level and one ResNet per level instead of (128, 256, 512, 512) x 2.

    # Choice: for tests and FAST mode only; its latents are meaningless but have the real shapes.
    """
    AutoencoderKL = _autoencoder_kl()
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global generator; leave it as it was
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
        )


class LatentVAE(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> scaled latents (B, 4, H/8, W/8)."""

    def __init__(self, autoencoder, scale=SD_VAE_SCALE):
        super().__init__()
        self.autoencoder = autoencoder
        self.scale = scale
        cfg = autoencoder.config
        self.image_channels = cfg.in_channels  # 3
        self.latent_channels = cfg.latent_channels  # 4
        self.downsampling = 2 ** (len(cfg.block_out_channels) - 1)  # 8: one stride-2 step between levels

    @torch.no_grad()
    def encode(self, images, sample=True, generator=None):
        """Scaled latents. The encoder outputs a diagonal Gaussian; `sample=True` draws from it (as DiT's
        training does), `sample=False` takes its mean."""
        dist = self.autoencoder.encode(images).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z * self.scale  # (B, 4, H/8, W/8)

    @torch.no_grad()
    def decode(self, latents):
        """Images in about [-1, 1] (not clamped: clamp when quantising to uint8)."""
        return self.autoencoder.decode(latents / self.scale).sample  # (B, 3, H, W)


def vae_shape(cfg: VAEConfig = VAEConfig(), vae=None):
    """(scale, image channels, latent channels, downsampling) of a VAE: what prepare's plan records.

    Read off `vae` when given (an object lacking these attributes has SD's: 0.18215, 3, 4, 8); else from `cfg`:
    SD's VAEs and "tiny" are not loaded (SD's values, cfg.scale if set), an autoencoder is read from its file.
    """
    if vae is not None:
        return tuple(getattr(vae, k, d) for k, d in
                     (("scale", SD_VAE_SCALE), ("image_channels", 3), ("latent_channels", 4), ("downsampling", 8)))
    if is_autoencoder_checkpoint(cfg.source):
        vae = load_vae(cfg)  # a small file: reading it is the way to know its shapes and scale
        return vae.scale, vae.image_channels, vae.latent_channels, vae.downsampling
    return (SD_VAE_SCALE if cfg.scale is None else cfg.scale), 3, 4, 8


def load_vae(cfg: VAEConfig = VAEConfig(), device="cpu"):
    """A LatentVAE from a Hugging Face id (needs internet or the HF cache), a local directory, or "tiny";
    an autoencoder.AutoencoderVAE (the same interface) from a path ending in .pt.

    The environment variable MINIDIFFIT_VAE, when set, replaces Stable Diffusion's VAE (any source but "tiny" and
    a .pt path) wherever it is asked for: a local directory (for offline machines: download sd-vae-ft-ema once,
    point MINIDIFFIT_VAE at it), or the word "tiny" for the random test VAE (CI and FAST runs of the release's
    path, which would otherwise download 335 MB). This is the variable's only reader.
    """
    if is_autoencoder_checkpoint(cfg.source):
        from ..autoencoder import AutoencoderVAE, load_autoencoder

        if not os.path.isfile(cfg.source):
            raise FileNotFoundError(f"no autoencoder checkpoint at {cfg.source!r}; train one with `python -m "
                                    f"minidiffit autoencoder --out=DIR` (it writes DIR/ckpt.pt), or fix the path")
        autoencoder, measured = load_autoencoder(cfg.source)
        # The latents' manifest records the scale they were made with: a different one means the autoencoder
        # was retrained since, and its decoder no longer fits those latents.
        if cfg.scale is not None and not math.isclose(cfg.scale, measured, rel_tol=1e-6):
            raise ValueError(f"autoencoder {cfg.source} has scale {measured:.6g}, but {cfg.scale:.6g} was asked for (the "
                             f"latents were made with it): it was retrained since; rerun imagenet prepare with it")
        return AutoencoderVAE(autoencoder, measured).to(device).eval()
    scale = SD_VAE_SCALE if cfg.scale is None else cfg.scale
    # Choice: MINIDIFFIT_VAE, an offline override of SD's VAE (the release downloads it at run time).
    source = cfg.source if cfg.source == "tiny" else (os.environ.get("MINIDIFFIT_VAE") or cfg.source)
    if source == "tiny":
        autoencoder = tiny_autoencoder()
    else:
        hint = ("Download it on a machine with internet (huggingface-cli download stabilityai/sd-vae-ft-ema "
                "--local-dir DIR) and set MINIDIFFIT_VAE=DIR, or use source='tiny' for a random test VAE.")
        # A Hugging Face id is "owner/name"; anything else that is not a directory is a wrong local path.
        if (source.startswith(("/", ".", "~")) or source.count("/") > 1) and not os.path.isdir(source):
            raise FileNotFoundError(f"no VAE directory at {source!r}. {hint}")
        try:
            autoencoder = _autoencoder_kl().from_pretrained(source)
        except OSError as e:
            raise OSError(f"cannot load the VAE from {source!r}: {e}\n{hint}") from None
    return LatentVAE(autoencoder, scale).to(device).eval()

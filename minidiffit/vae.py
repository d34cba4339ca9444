"""The Stable Diffusion VAE that maps 256x256x3 images to 32x32x4 latents and back (DiffiT Sec. 3.3).

Latent DiffiT, like DiT and LDM, diffuses in the latent space of Stable Diffusion's KL autoencoder
(`stabilityai/sd-vae-ft-ema` or `-mse`), an 8x spatial downsampling; latents are multiplied by 0.18215 so
they have roughly unit variance. We use diffusers' `AutoencoderKL` (an optional dependency, imported only
here, lazily) and a tiny randomly initialised one built from a config for tests and FAST mode.
Introduced in notebooks/07_latent_space.ipynb.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

SD_VAE_SCALE = 0.18215  # LDM's scale factor: 1 / std of the SD VAE's latents on its training data


@dataclass
class VAEConfig:
    source: str = "stabilityai/sd-vae-ft-ema"  # Hugging Face id, a local directory, or "tiny" (random, no download)
    scale: float = SD_VAE_SCALE  # latents are multiplied by this after encoding, divided before decoding


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


def load_vae(cfg: VAEConfig = VAEConfig(), device="cpu"):
    """A LatentVAE from a Hugging Face id (needs internet or the HF cache), a local directory, or "tiny".

    The environment variable MINIDIFFIT_VAE, when set, names a local directory that replaces the Hugging
    Face id (for offline machines: download sd-vae-ft-ema once, point MINIDIFFIT_VAE at it).
    """
    # Choice: MINIDIFFIT_VAE, an offline override of the Hugging Face id (the release downloads at run time).
    if cfg.source == "tiny":
        autoencoder = tiny_autoencoder()
    else:
        source = os.environ.get("MINIDIFFIT_VAE") or cfg.source
        hint = ("Download it on a machine with internet (huggingface-cli download stabilityai/sd-vae-ft-ema "
                "--local-dir DIR) and set MINIDIFFIT_VAE=DIR, or use source='tiny' for a random test VAE.")
        # A Hugging Face id is "owner/name"; anything else that is not a directory is a wrong local path.
        if (source.startswith(("/", ".", "~")) or source.count("/") > 1) and not os.path.isdir(source):
            raise FileNotFoundError(f"no VAE directory at {source!r}. {hint}")
        try:
            autoencoder = _autoencoder_kl().from_pretrained(source)
        except OSError as e:
            raise OSError(f"cannot load the VAE from {source!r}: {e}\n{hint}") from None
    return LatentVAE(autoencoder, cfg.scale).to(device).eval()

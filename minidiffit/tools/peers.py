"""Peer baselines from diffusers, for side-by-side size and speed comparisons (benchmarks/peers.py).

`DiffusersUNet` puts diffusers' `UNet2DModel` (DDPM's convolutional U-Net, attention at the low resolutions)
behind DiffiTUNet's call signature, so `diffusion.EDMPrecond` and the EDM recipe train it unchanged;
`unet2d_like` sizes one to a DiffiTUNet preset's parameter budget. `DiffusersDiT` / `diffusers_dit` build
diffusers' `DiTTransformer2DModel` (Peebles & Xie 2023) shaped like a LatentDiffiT preset, called as
`model(x, t, y)`. diffusers is an optional dependency, imported only inside these functions. In tools/, next
to what uses it: edm_task's `--arch=unet2d` (the ablations' peer), benchmarks/peers.py and experiments/ablations.py.
Introduced in notebooks/10_ablations.ipynb.
"""

import math

import torch
import torch.nn as nn

from ..base.runtime import num_parameters
from ..latent import LATENT_PRESETS, LatentConfig
from ..unet import UNET_PRESETS, UNetConfig, count_parameters


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("the peer baselines need diffusers: pip install diffusers (or minidiffit[latent])") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """UNet2DModel as EDM's raw network F: forward(x (B, C, H, W), noise_labels (B,), None) -> (B, C, H, W)."""

    def __init__(self, **unet_kwargs):
        super().__init__()
        self.net = _diffusers().UNet2DModel(**unet_kwargs)
        self.in_channels, self.img_resolution = self.net.config.in_channels, self.net.config.sample_size
        # Choice: a zero output conv, as DiffiTUNet's head, so both start from D(x; sigma) = c_skip x.
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)

    def forward(self, x, noise_labels, augment_labels=None):
        if augment_labels is not None:
            raise ValueError("DiffusersUNet takes no augmentation labels; train it with augment_p=0")
        # noise_labels is EDM's c_noise = ln(sigma) / 4, a float "timestep" for the sinusoidal embedding.
        noise_labels = torch.as_tensor(noise_labels, device=x.device).float().reshape(-1).expand(x.shape[0])
        return self.net(x, noise_labels, return_dict=False)[0]  # (B, C, H, W)


def unet2d_kwargs(cfg: UNetConfig, widths, layers_per_block):
    """UNet2DModel settings with cfg's channels, resolution and time-token width, and the given stage widths."""
    S = len(widths)
    # GroupNorm as unet.group_norm: at most 32 groups and at least 4 channels each (one count for all stages).
    groups = max(g for g in range(1, 33) if all(w % g == 0 for w in widths) and widths[0] // g >= 4)
    return dict(
        sample_size=cfg.img_resolution, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=widths, layers_per_block=layers_per_block, norm_num_groups=groups, dropout=cfg.dropout,
        time_embedding_dim=cfg.temb_dim,
        # Choice: self-attention at every resolution below the input's (and in the middle block), as DDPM's
        # attention at 16x16 of 32x32 images; heads of our head_dim, or the largest divisor of it that fits.
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (S - 1),
        up_block_types=("AttnUpBlock2D",) * (S - 1) + ("UpBlock2D",),
        attention_head_dim=math.gcd(cfg.head_dim, *widths),
        # Choice: "positional" time embedding with cos first and no frequency shift: exactly our
        # tmsa.timestep_embedding of c_noise ("fourier" would divide the output by the timestep, 0 at sigma = 1).
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
    )


def unet2d_like(preset: str | UNetConfig, tolerance=0.1):
    """A DiffusersUNet with about the parameter count of DiffiTUNet(preset) (random weights).

    Scales the preset's stage widths by s = 4/32, 5/32, ... (rounded to multiples of 8), with layers_per_block =
    its most blocks per stage, then one more; prefers a fit within `tolerance` at the preset's block count.
    """
    cfg = UNET_PRESETS[preset] if isinstance(preset, str) else preset
    target, base = count_parameters(cfg), max(cfg.num_blocks)
    candidates = []  # (misses the tolerance, other block count, relative error, layers, widths)
    for layers in (base, base + 1):
        for k in range(4, 129):
            widths = tuple(8 * max(1, round(k / 32 * c / 8)) for c in cfg.channels)
            with torch.device("meta"):  # counted, not allocated
                n = num_parameters(DiffusersUNet(**unet2d_kwargs(cfg, widths, layers)))
            err = abs(n - target) / target
            candidates.append((err > tolerance, layers != base, err, layers, widths))
            if n > target:
                break  # wider only grows
    *_, layers, widths = min(candidates)
    return DiffusersUNet(**unet2d_kwargs(cfg, widths, layers))


class DiffusersDiT(nn.Module):
    """DiTTransformer2DModel called as LatentDiffiT: forward(x (B, C, H, W), t (B,), y (B,)) -> (B, 2C, H, W)."""

    def __init__(self, cfg: LatentConfig):
        super().__init__()
        if cfg.mlp_ratio != 4.0:
            raise ValueError(f"diffusers' DiT has a fixed MLP ratio of 4, got mlp_ratio={cfg.mlp_ratio}")
        self.cfg = cfg
        self.net = _diffusers().DiTTransformer2DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
            in_channels=cfg.in_channels, out_channels=2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels,
            num_layers=cfg.depth, sample_size=cfg.input_size, patch_size=cfg.patch_size,
            num_embeds_ada_norm=cfg.num_classes,  # label table of num_classes + 1 rows (the null label)
        )
        # Choice: one time + label embedder shared by all blocks, as in DiT. diffusers builds one per block (its
        # checkpoint conversion copies DiT's into each): 0.63M more parameters per block at S/2, 7.6M in all (+23%).
        blocks = self.net.transformer_blocks
        for block in blocks[1:]:
            block.norm1.emb = blocks[0].norm1.emb

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y, return_dict=False)[0]  # (B, 2C, H, W)


def diffusers_dit(size: str | LatentConfig):
    """diffusers' DiT shaped like a LatentDiffiT preset ("S/2", "B/2", ...; DiT Table 1), random weights."""
    return DiffusersDiT(LATENT_PRESETS[size] if isinstance(size, str) else size)

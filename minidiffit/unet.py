"""Image-space DiffiT: the DiffiT ResBlock, conv down/upsampling and the U-shaped network, DiffiT Sec. 3.2.

A conv tokenizer, an encoder and a decoder of DiffiT ResBlocks (windowed TMSA, no shift) with a skip at
every resolution, and a GN -> SiLU -> Conv3x3 head. The network is EDM's raw F_theta: `diffusion.EDMPrecond`
wraps it. Presets follow DiffiT App. I.1 (CIFAR-10) and H.1/I.1 (FFHQ-64); every choice the paper leaves
open is marked `# Choice:`. `time_mode` swaps TMSA for one of the paper's ablations (`variants.py`), e.g.
`dataclasses.replace(UNET_PRESETS["cifar10"], time_mode="adaln")`. Introduced in notebooks/04_unet.ipynb.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base.runtime import num_parameters
from .tmsa import TimestepEmbedder
from .variants import make_block


@dataclass
class UNetConfig:
    img_resolution: int = 32  # input height = width; every stage halves it
    in_channels: int = 3  # image channels in = out (RGB)
    channels: tuple = (128, 256, 256)  # width of each stage, highest resolution first (DiffiT App. I.1)
    num_blocks: tuple = (2, 2, 2)  # DiffiT ResBlocks per stage, in the encoder and again in the decoder
    window_size: int = 4  # TMSA window (w x w tokens); capped at the stage's resolution
    head_dim: int = 32  # channels per attention head  # Choice: not in the paper
    mlp_ratio: float = 4.0  # MLP hidden width / channels  # Choice: not in the paper (ViT/DiT default)
    temb_dim: int = 512  # width of the time token (DiffiT App. I.1)
    dropout: float = 0.13  # dropout inside each ResBlock (EDM's CIFAR-10 value)
    augment_dim: int = 9  # size of EDM's augmentation label vector; 0 disables that input
    time_mode: str = "tmsa"  # how time enters each block: tmsa (default, DiffiT Eq. 3-5), bias, mlp, token, adaln


UNET_PRESETS = {
    # Tests and FAST mode: two stages, a single narrow block each; forward+backward on 8 images in ~0.1 s.
    "tiny": UNetConfig(channels=(32, 64), num_blocks=(1, 1), head_dim=16, temb_dim=64, dropout=0.0),
    # CPU tier (reproduce.sh without CUDA): sized for a ~30 min run on 2 cores (~2.7M parameters).
    "small": UNetConfig(channels=(64, 128, 128), num_blocks=(1, 1, 1), temb_dim=256, dropout=0.0),
    # Laptop tier (reproduce.sh fashion, notebook 05): Fashion-MNIST padded to 32x32, one channel, no augmentation
    # input. Choice: sized for ~15 CPU minutes (DESIGN.md 2b): 1.33M parameters train at 125 img/s on 2 idle cores
    # (batch 64), 3.4x the rate of the 2.67M `small` layout with one channel (37 img/s), so a run sees ~1.5 epochs.
    "fashion": UNetConfig(in_channels=1, channels=(32, 64, 128), num_blocks=(1, 1, 1), head_dim=16, temb_dim=128,
                          dropout=0.0, augment_dim=0),
    # DiffiT App. I.1: 3 stages at 32/16/8, 128/256/256 channels, 2 ResBlocks each, window 4, time dim 512;
    # Choice: dropout 0.13 from EDM's CIFAR-10 recipe, which DiffiT says it follows (the paper gives no rate).
    "cifar10": UNetConfig(),
    # DiffiT App. I.1: 4 stages at 64/32/16/8, blocks 1-2-2-2, window 8.  # Choice: dropout 0.05 as EDM's FFHQ-64.
    # (App. H.1 says 4 ResBlocks per stage instead: UNetConfig(..., num_blocks=(4, 4, 4, 4)).)
    "ffhq64": UNetConfig(img_resolution=64, channels=(128, 256, 256, 256), num_blocks=(1, 2, 2, 2),
                         window_size=8, dropout=0.05),
}


def group_norm(channels):
    """GroupNorm with 32 groups, fewer for narrow layers (at least 4 channels per group, as EDM)."""
    # Choice: the paper says only "GN"; 32 groups is the usual U-Net value (DDPM, ADM, EDM).
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


# ----------------------------------------------------------------------------
# Building blocks


class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock (Sec. 3.2): h = Conv3x3(SiLU(GN(x))); out = DiffiTBlock(h, temb) + x.

    The outer residual wraps the transformer block's own two residuals. TMSA runs inside non-overlapping
    w x w windows with no shift (the paper's "local attention").
    """

    def __init__(self, channels, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, dropout=0.0, time_mode="tmsa"):
        super().__init__()
        self.norm = group_norm(channels)
        # Choice: dropout sits after the activation, before the conv, as in DDPM/ADM/EDM blocks (the
        # paper gives a rate through EDM's recipe but no position).
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = make_block(time_mode, channels, num_heads, window_size, mlp_ratio, temb_dim)  # tmsa: DiffiTBlock

    def forward(self, x, temb):  # x: (B, C, H, W), temb: (B, Dt)
        h = self.conv(self.dropout(F.silu(self.norm(x))))  # (B, C, H, W)
        h = self.block(h.permute(0, 2, 3, 1), temb)  # (B, H, W, C): the block works channels-last
        return h.permute(0, 3, 1, 2) + x  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 Conv3x3, which also changes the channel count."""

    # Choice: the paper says "convolutional downsampling" without a kernel; 3x3 stride 2 as DDPM/ADM.
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then Conv3x3 (which may change the channel count)."""

    # Choice: nearest + conv (DDPM/ADM) rather than a transposed conv, which leaves checkerboard artifacts.
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------
# The U-Net


class DiffiTUNet(nn.Module):
    """The U-shaped image-space DiffiT: returns the raw network output F_theta (EDM's notation).

    forward(x (B, C, H, W), noise_labels (B,), augment_labels (B, augment_dim) or None) -> (B, C, H, W).
    `noise_labels` is EDM's c_noise = ln(sigma) / 4, embedded by the sinusoidal time embedder.

    Layout for S stages (s = 0 is the input resolution):
        tokenizer Conv3x3 (C -> channels[0])
        encoder stage s: num_blocks[s] ResBlocks, keep its output as skip s, then Downsample (s < S-1)
        decoder stage s (s = S-1 .. 0): for s < S-1 Upsample, concatenate skip s, a 1x1 conv back to
            channels[s]; then num_blocks[s] ResBlocks
        head GN -> SiLU -> Conv3x3 (channels[0] -> C)
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if len(cfg.channels) != len(cfg.num_blocks):
            raise ValueError(f"channels={cfg.channels} and num_blocks={cfg.num_blocks} must have one entry per stage")
        if cfg.img_resolution % 2 ** (len(cfg.channels) - 1):
            raise ValueError(f"img_resolution={cfg.img_resolution} cannot be halved {len(cfg.channels) - 1} times")
        for c in cfg.channels:
            if c % cfg.head_dim:
                raise ValueError(f"stage width {c} is not divisible by head_dim={cfg.head_dim}")
        self.cfg = cfg
        S = len(cfg.channels)
        res = [cfg.img_resolution // 2**s for s in range(S)]
        # Choice: a window larger than the map becomes global attention over the map (e.g. FFHQ's 8x8 stage).
        windows = [min(cfg.window_size, r) for r in res]

        def blocks(s):
            return nn.ModuleList(
                DiffiTResBlock(cfg.channels[s], cfg.channels[s] // cfg.head_dim, windows[s], cfg.mlp_ratio,
                               cfg.temb_dim, cfg.dropout, cfg.time_mode)
                for _ in range(cfg.num_blocks[s]))

        # Time token: sinusoidal embedding of c_noise -> MLP (DiffiT's "positional" time embedding).
        self.t_embedder = TimestepEmbedder(cfg.temb_dim)
        # Choice: EDM's augmentation labels are added to the time token through their own Linear, so every
        # TMSA sees them (EDM adds them to its noise embedding; DiffiT says only that it follows EDM).
        # No bias: zero labels (no augmentation, always the case when sampling) contribute exactly nothing.
        self.augment_embedder = nn.Linear(cfg.augment_dim, cfg.temb_dim, bias=False) if cfg.augment_dim else None

        self.tokenizer = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(blocks(s) for s in range(S))
        self.down = nn.ModuleList(Downsample(cfg.channels[s], cfg.channels[s + 1]) for s in range(S - 1))
        # Choice: channels change in the Downsample / Upsample convs; the decoder merges its skip by
        # concatenation and a 1x1 conv ("a conv at the start of each stage matches channel counts").
        self.up = nn.ModuleList(Upsample(cfg.channels[s + 1], cfg.channels[s]) for s in range(S - 1))
        self.merge = nn.ModuleList(nn.Conv2d(2 * cfg.channels[s], cfg.channels[s], 1) for s in range(S - 1))
        # Choice: the lowest resolution has no separate skip (it would concatenate a map with itself): the
        # decoder's bottom stage continues from the encoder's, a bottleneck of 2 * num_blocks[-1] ResBlocks.
        self.decoder = nn.ModuleList(blocks(s) for s in range(S))
        self.head_norm = group_norm(cfg.channels[0])
        self.head = nn.Conv2d(cfg.channels[0], cfg.in_channels, 3, padding=1)
        # Choice: zero-initialised output conv, so F = 0 and D(x; sigma) = c_skip x at the start of training
        # (EDM scales its last conv's init by 1e-5 for the same reason).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x, noise_labels, augment_labels=None):
        cfg = self.cfg
        B = x.shape[0]
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.img_resolution, cfg.img_resolution):
            raise ValueError(f"expected images (B, {cfg.in_channels}, {cfg.img_resolution}, {cfg.img_resolution}), "
                             f"got {tuple(x.shape)}; build the model with a matching img_resolution / in_channels")
        noise_labels = torch.as_tensor(noise_labels, device=x.device).float().reshape(-1).expand(B)
        temb = self.t_embedder(noise_labels)  # (B, Dt)
        if augment_labels is not None:
            if self.augment_embedder is None:
                raise ValueError("augment_labels given but the model has augment_dim=0; build it with augment_dim=9")
            if augment_labels.shape != (B, cfg.augment_dim):
                raise ValueError(f"augment_labels must be (B, {cfg.augment_dim}), got {tuple(augment_labels.shape)}")
            temb = temb + self.augment_embedder(augment_labels.to(temb.dtype))  # (B, Dt)

        h = self.tokenizer(x)  # (B, C0, H, W)
        skips = []
        for s, stage in enumerate(self.encoder):
            for block in stage:
                h = block(h, temb)  # (B, Cs, H/2^s, W/2^s)
            skips.append(h)
            if s < len(self.down):
                h = self.down[s](h)  # (B, C(s+1), H/2^(s+1), W/2^(s+1))
        for s in reversed(range(len(self.decoder))):
            if s < len(self.up):
                h = self.up[s](h)  # (B, Cs, H/2^s, W/2^s)
                h = self.merge[s](torch.cat([h, skips[s]], dim=1))  # (B, 2 Cs, ...) -> (B, Cs, ...)
            for block in self.decoder[s]:
                h = block(h, temb)
        return self.head(F.silu(self.head_norm(h)))  # (B, C, H, W)


# ----------------------------------------------------------------------------
# Parameter counts (paper-size models are built on the meta device: no memory is allocated)


def count_parameters(cfg: UNetConfig | str):
    """Number of trainable parameters of the U-Net for a config or a preset name."""
    cfg = UNET_PRESETS[cfg] if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        model = DiffiTUNet(cfg)
    return num_parameters(model)


def print_parameter_counts():
    """One line per preset: name and parameter count in millions."""
    for name in UNET_PRESETS:
        print(f"{name:8s} {count_parameters(name) / 1e6:8.2f}M")


if __name__ == "__main__":
    print_parameter_counts()

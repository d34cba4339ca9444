"""Latent DiffiT: the class-conditional transformer that denoises VAE latents (DiffiT Sec. 3.3, Fig. 5).

A DiT-style skeleton (patchify -> fixed 2-D sin-cos positions -> transformer blocks -> final layer ->
unpatchify) whose blocks are DiffiT's TMSA blocks from `tmsa.py`, with global attention plus a relative
position bias over the whole token grid. Module names and shapes follow the official release
(`nvidia/DiffiT`), so `load_released` takes its safetensors files strictly. Also classifier-free
guidance as released. The VAE is in `vae.py`, the discrete diffusion in `adm.py`.
Introduced in notebooks/08_latent_diffit.ipynb.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange

from .attention import relative_position_index
from .tmsa import TimestepEmbedder
from .variants import make_block

# ----------------------------------------------------------------------------
# Config and presets


@dataclass
class LatentConfig:
    input_size: int = 32  # latent side: 32 for 256 px images, 64 for 512 px (the VAE downsamples 8x)
    in_channels: int = 4  # latent channels of the Stable Diffusion VAE
    patch_size: int = 2  # p: each p x p latent patch becomes one token
    dim: int = 1152  # D, token width
    # Deviation (from the paper's text, which says 30): depth 28, as the released weights and the 561M count.
    depth: int = 28  # number of DiffiT blocks
    num_heads: int = 16  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    num_classes: int = 1000  # class labels 0..num_classes-1; row num_classes is the null (unconditional) label
    class_dropout_prob: float = 0.1  # training-time probability of replacing a label by the null label (for CFG)
    learn_sigma: bool = True  # output 2 * in_channels: eps and the learned-range variance interpolation v
    fused: bool = True  # attention through F.scaled_dot_product_attention (False: explicit softmax, same numbers)
    # Choice: the ablations of the image-space model (variants.py) on the latent one too; "adaln" is DiT's block.
    time_mode: str = "tmsa"  # how time enters each block: tmsa (DiffiT, the release's), bias, mlp, token, adaln


# The DiT family of sizes (DiT Table 1), all patch 2; XL/2 is the released DiffiT model (DESIGN.md Sec. 4).
# Choice: L/2, B/2, S/2 and tiny are not in the DiffiT paper; they are DiT's sizes for smaller budgets.
LATENT_PRESETS = {
    "XL/2": LatentConfig(depth=28, dim=1152, num_heads=16),
    "L/2": LatentConfig(depth=24, dim=1024, num_heads=16),
    "B/2": LatentConfig(depth=12, dim=768, num_heads=12),
    "S/2": LatentConfig(depth=12, dim=384, num_heads=6),
    # Tests and FAST mode: 8x8x4 latents (a 64 px image), a 4x4 token grid, 10 classes.
    "tiny": LatentConfig(input_size=8, depth=2, dim=64, num_heads=2, num_classes=10),
    # Choice: the laptop tier (DESIGN.md 2b), Fashion-MNIST's 8x8x4 latents of autoencoder.py, 10 classes (+ the
    # null row), label dropout 0.1, learned variance. Patch 2 (16 tokens), dim 192, depth 6: forward + backward
    # with the hybrid loss at batch 128 ran 590 img/s on 2 CPU threads (330 on 1), against 360 (196) for dim 256,
    # 860 (500) for dim 128 x depth 8, and 390 (220) for patch 1 (64 tokens) at dim 128 x depth 4; 3.4M parameters.
    # Its guidance (a constant 3) is a sampling setting: latent_task.GUIDANCE.
    "fashion": LatentConfig(input_size=8, patch_size=2, dim=192, depth=6, num_heads=6, num_classes=10),
}


# ----------------------------------------------------------------------------
# Embedders: patches, fixed positions, labels


class PatchEmbed(nn.Module):
    """(B, C, H, W) latents -> (B, H/p, W/p, D) tokens: a p x p conv with stride p is a Linear per patch."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)


def sincos_pos_embed(dim, grid_size):
    """(grid_size^2, dim) fixed 2-D sin-cos position embedding, tokens row-major (as DiT and the release).

    The first dim/2 channels encode the column x, the last dim/2 the row y; each half is
    [sin(pos * w_i) | cos(pos * w_i)] with w_i = 10000^(-i / (dim/4)), i = 0..dim/4-1.
    Computed in float64 as the release does (numpy), then stored in float32.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for a 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
    y, x = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")

    def embed_1d(pos):  # (N,) -> (N, dim/2)
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([embed_1d(x), embed_1d(y)], axis=1)).float()


class LabelEmbedder(nn.Module):
    """Class label -> (B, D) vector; a table of num_classes + 1 rows, the last row is the null label.

    In training each label is replaced by the null label with probability `dropout_prob`, so one model
    learns both p(x | y) and p(x), which classifier-free guidance combines at sampling time.
    """

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # Choice: the null row always exists (the release adds it only when dropout_prob > 0), so guidance
        # works with any config; the released configs all have it (1001 rows).
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y, force_drop=None, generator=None):  # y: (B,) long -> (B, D)
        """`force_drop`: optional (B,) bool, True = use the null label (overrides random dropout)."""
        if force_drop is not None:
            y = torch.where(force_drop.to(y.device, torch.bool), self.num_classes, y)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device if generator is None else generator.device)
            y = torch.where(drop.to(y.device) < self.dropout_prob, self.num_classes, y)
        return self.embedding_table(y)


class FinalLayer(nn.Module):
    """(B, h, w, D) -> (B, h, w, p*p*C_out): LayerNorm (no affine) -> SiLU -> Linear, as the release."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no parameters: no state-dict key
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x):
        return self.linear(self.act(self.norm(x)))


# ----------------------------------------------------------------------------
# The model


class LatentDiffiT(nn.Module):
    """eps (and variance) prediction on latents: forward(x (B,4,H,W), t (B,) in 0..999, y (B,)) -> (B,8,H,W).

    c = t_embedder(t) + y_embedder(y) is the TMSA time token of every block (DESIGN.md Sec. 4).
    """

    def __init__(self, cfg: LatentConfig):
        super().__init__()
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"input_size={cfg.input_size} is not divisible by patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = cfg.input_size // cfg.patch_size  # tokens per side: 16 at 256 px, 32 at 512 px
        self.out_channels = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch_size)
        # Fixed, but a Parameter (requires_grad=False) because the release stores it in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, cfg.dim), requires_grad=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        # Global attention: the "window" is the whole token grid, so the relative position bias table has
        # (2*16-1)^2 = 961 rows per block at 256 px and covers every token pair.
        self.blocks = nn.ModuleList([
            make_block(cfg.time_mode, cfg.dim, cfg.num_heads, self.grid_size, cfg.mlp_ratio, fused=cfg.fused)
            for _ in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(cfg.dim, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The release's (and DiT's) init of every tensor; skipped on the meta device (nothing to fill).

        Complete, buffers included, so a model built on "meta" then `to_empty(device=...)` is made whole by
        calling this again.
        """
        if self.pos_embed.is_meta:
            return
        for m in self.modules():  # every Linear, the time projection `qkv_temb` included
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        index = relative_position_index(self.grid_size)  # a constant of the grid, the same in every block
        for block in self.blocks:  # Swin's init of the bias table
            nn.init.trunc_normal_(block.attn.relative_position_bias_table, std=0.02)
            block.attn.relative_position_index.copy_(index)
            if hasattr(block, "zero_modulation"):  # time_mode="adaln": zero again after the xavier pass, as DiT
                block.zero_modulation()
        self.pos_embed.copy_(sincos_pos_embed(self.cfg.dim, self.grid_size)[None])
        # The patch conv initialised as the Linear it is: xavier over (D, C*p*p).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero output layer: the untrained model predicts eps = 0 and v = 0 (the middle of the variance range).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(B, h, w, p*p*C) -> (B, C, h*p, w*p); the Linear's outputs are laid out (p, p, C), C fastest."""
        p = self.cfg.patch_size
        return rearrange(x, "b h w (p q c) -> b c (h p) (w q)", p=p, q=p)

    def forward(self, x, t, y, force_drop=None, generator=None):
        """x: (B, C, H, W) latents, t: (B,) DDPM steps 0..999, y: (B,) labels -> (B, 2C, H, W) [eps | v].

        `force_drop` / `generator`: see LabelEmbedder (label dropout is active only in training mode).
        """
        if x.shape[1:] != (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size):
            raise ValueError(f"expected latents (B, {self.cfg.in_channels}, {self.cfg.input_size}, "
                             f"{self.cfg.input_size}), got {tuple(x.shape)}; set LatentConfig.input_size to match")
        g = self.grid_size
        x = self.x_embedder(x) + self.pos_embed.view(1, g, g, -1)  # (B, h, w, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop, generator)  # (B, D): the time token
        for block in self.blocks:
            x = block(x, c)  # (B, h, w, D)
        return self.unpatchify(self.final_layer(x))  # (B, 2C, H, W)

    def forward_with_cfg(self, x, t, y, scale, channels=3):
        """Classifier-free guidance as released: eps = eps_null + s(t) * (eps_y - eps_null).

        x (B, C, H, W), t (B,) original DDPM steps, y (B,) labels -> (B, 2C, H, W).
        `scale`: a float (constant) or a `Guidance` (see GUIDANCE_PRESETS). The batch is doubled to
        [y, null] and run in one pass. `channels=3` guides output channels 0..2 only, as the release
        and DiT do (a quirk: the 4th eps channel and the variance channels keep the conditional output);
        `channels=None` guides all eps channels (the variance channels always stay conditional).
        """
        # Choice: the released behaviour (channels 0..2) is the default because it reproduces the published
        # FID; all-channel guidance is the textbook formula and an option.
        B = x.shape[0]
        null = torch.full_like(y, self.cfg.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, 2C, H, W)
        cond, uncond = out[:B], out[B:]
        s = guidance_scale(scale, t).to(out.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        n = self.cfg.in_channels if channels is None else channels
        guided = uncond[:, :n] + s * (cond[:, :n] - uncond[:, :n])
        return torch.cat([guided, cond[:, n:]], dim=1)


# ----------------------------------------------------------------------------
# Guidance schedules (the release's sample.py; DESIGN.md Sec. 4)


@dataclass
class Guidance:
    # Deviation (from the paper's 4.6 at 256 px): 4.4, the released sampler's value.
    scale: float = 4.4  # the guidance scale at t = 0
    schedule: str = "power-cosine"  # "power-cosine": ramps from 1 (t = T) to `scale` (t = 0); "constant"
    power: float = 4.0  # exponent of the power-cosine ramp
    num_steps: int = 1000  # T of the original (un-respaced) diffusion


GUIDANCE_PRESETS = {
    "256": Guidance(scale=4.4, schedule="power-cosine"),  # the released 256 px sampler
    "512": Guidance(scale=1.49, schedule="constant"),  # the released 512 px sampler
}


def default_guidance(cfg: LatentConfig):
    """The release's rule for a model's guidance: power-cosine 4.4 up to 32x32 latents (256 px), constant 1.49
    above. The rule knows only 32 and 64; smaller latents (the tiny preset's 8x8) get the 256 px schedule.
    Guidance is a sampling setting, not the architecture's: a run may choose another (latent_task.GUIDANCE)."""
    return GUIDANCE_PRESETS["256"] if cfg.input_size <= 32 else GUIDANCE_PRESETS["512"]


def guidance_scale(g, t):
    """(B,) guidance scale at original DDPM steps t, for a float (constant) or a `Guidance`.

    power-cosine: s(t) = 1 + (scale - 1) * (1 - cos(pi * (1 - t/T)^power)) / 2, i.e. almost no guidance
    at high noise and the full scale near the data, which keeps diversity (recall) while sharpening.
    """
    t = t.float()
    if not isinstance(g, Guidance):
        return torch.full_like(t, float(g))
    if g.schedule == "constant":
        return torch.full_like(t, g.scale)
    if g.schedule == "power-cosine":
        ramp = (1 - torch.cos(math.pi * (1 - t / g.num_steps) ** g.power)) / 2
        return 1 + (g.scale - 1) * ramp
    raise ValueError(f"unknown guidance schedule {g.schedule!r}; use 'power-cosine' or 'constant'")

"""Time-dependent multi-head self-attention (TMSA) and the DiffiT transformer block, DiffiT Sec. 3.2.

The time token `temb` (the paper's x_t) enters every query, key and value through its own linear
projection, so the attention pattern itself changes with the diffusion time (DiffiT Eq. 3-5):
    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt.
Used by the image-space U-Net (`unet.py`) and the latent model (`latent.py`).
The block's `time_mode` also builds the paper's ablations (DiffiT Tables 6-7, DESIGN.md Sec. 2): time only in
the relative position bias ("bias", config F), time added to the MLP input ("mlp", G), the time token as an
extra token of every window ("token"), and DiT's adaLN-Zero ("adaln"). Introduced in notebooks/02_tmsa.ipynb.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MLP, Attention, window_partition, window_reverse

# How the time token enters each DiffiTBlock: DiffiT's TMSA (the default) and the ablations of DiffiT Tables 6-7.
TIME_MODES = ("tmsa", "bias", "mlp", "token", "adaln")

# ----------------------------------------------------------------------------
# The time token: sinusoidal embedding -> MLP (DiffiT Sec. 3.2, "positional" time embedding)


def timestep_embedding(t, dim=256, max_period=10000):
    """(B,) float times -> (B, dim) embedding [cos(t f_i) | sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    With dim=256: 128 frequencies, i = 0..127 (DESIGN.md Sec. 1). `t` may be fractional: the latent
    model passes the DDPM step 0..999, the image model EDM's c_noise = ln(sigma) / 4.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding needs an even dim (half cos, half sin), got dim={dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Time token: sinusoidal embedding (256) -> Linear -> SiLU -> Linear (names as the release's `mlp.0/2`)."""

    def __init__(self, dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t: (B,) -> (B, D)
        return self.mlp(timestep_embedding(t, self.frequency_dim))


# ----------------------------------------------------------------------------
# TMSA


class TMSA(Attention):
    """Attention whose q, k, v also carry a per-image projection of the time token (DiffiT Eq. 3-5).

    `qkv_temb(temb)` is one (3D,) vector per image, broadcast over all N tokens: the extra cost is one
    D x 3D matrix-vector product per image, against N of them for the spatial tokens.
    `temb_dim` may differ from `dim` (the U-Net's time token is wider than its early stages).

    Note: the time term of the keys, k_t, adds q_i . k_t to every logit of row i, a constant over the
    keys j, so the softmax cancels it; time acts through q_t (a per-key score q_t . k_j) and v_t (a shift
    of every output). The weights stay, as the paper's Eq. 4 and the released checkpoints have them.
    """

    def __init__(self, dim, num_heads, window_size=None, temb_dim=None, fused=True):
        super().__init__(dim, num_heads, window_size, fused)
        self.qkv_temb = nn.Linear(temb_dim or dim, 3 * dim)

    def forward(self, x, temb):  # x: (B*nW, N, D), the nW windows of B images (nW = 1: whole images); temb: (B, Dt)
        qkv_t = self.qkv_temb(temb)  # (B, 3D): once per image, not per window
        qkv_t = qkv_t.repeat_interleave(x.shape[0] // temb.shape[0], dim=0)  # window k of image b gets image b's
        return self.attend(self.qkv(x) + qkv_t[:, None])  # (B*nW, N, 3D) -> (B*nW, N, D)


# ----------------------------------------------------------------------------
# Ablations: other ways for the time token to enter attention (DiffiT Tables 6-7; DESIGN.md Sec. 2)


class TimeBiasAttention(Attention):
    """Config F, time only in the position bias: softmax(Q K^T / sqrt(d) + B + B_t) V, q, k, v from x alone.

    B_t = Linear(Dt, (2w-1)^2 h)(temb) is a second relative position table, one per image, indexed like B.
    """

    def __init__(self, dim, num_heads, window_size, temb_dim=None, fused=True):
        if window_size is None:
            raise ValueError("time_mode='bias' needs a window_size: the time bias is a relative position table")
        super().__init__(dim, num_heads, window_size, fused)
        # Deviation: DESIGN.md reads F as a per-head scalar, Linear(Dt, heads), added to every logit; a constant
        # added to a whole row of logits cancels in the softmax, so the output would ignore time. Our reading:
        # time predicts a whole (2w-1)^2 x h table, added to B (default Linear init, as qkv_temb).
        self.bias_temb = nn.Linear(temb_dim or dim, self.relative_position_bias_table.numel())

    def forward(self, x, temb):  # x: (B*nW, N, D), the nW windows of B images; temb: (B, Dt)
        table = self.relative_position_bias_table + self.bias_temb(temb).view(temb.shape[0], -1, self.num_heads)
        bias = table[:, self.relative_position_index].permute(0, 3, 1, 2)  # (B, (2w-1)^2, h) -> (B, h, N, N)
        bias = bias.repeat_interleave(x.shape[0] // temb.shape[0], dim=0)  # window k of image b gets image b's
        return self.attend(self.qkv(x), bias)  # (B*nW, N, D)


class TimeTokenAttention(Attention):
    """DiffiT Table 7, the time token attended separately: one extra token per window, q, k, v of x alone.

    The projected time token joins each window, attends and is attended like any spatial token, and its
    own output is dropped.
    """

    def __init__(self, dim, num_heads, window_size=None, temb_dim=None, fused=True):
        super().__init__(dim, num_heads, window_size, fused)
        # Choice: Table 7's "separate" time token read as an extra token of every window that shares the spatial
        # tokens' qkv and proj (the paper gives one line); the same token is copied into all windows of an image.
        # Choice: the time token reaches the width D through one Linear(Dt, D), without a LayerNorm.
        self.token_temb = nn.Linear(temb_dim or dim, dim)

    def forward(self, x, temb):  # x: (B*nW, N, D), temb: (B, Dt)
        token = self.token_temb(temb).repeat_interleave(x.shape[0] // temb.shape[0], dim=0)  # (B*nW, D)
        qkv = self.qkv(torch.cat([x, token[:, None]], dim=1))  # (B*nW, N+1, 3D), the time token last
        bias = self.position_bias()  # (1, h, N, N) or None
        # Choice: the time token has no position, so every logit that involves it gets zero relative bias.
        bias = F.pad(bias, (0, 1, 0, 1)) if bias is not None else None  # (1, h, N+1, N+1)
        return self.attend(qkv, bias)[:, :-1]  # (B*nW, N, D): the time token's output dropped


def modulate(x, shift, scale):
    """adaLN's affine map of a normalised x, as DiT: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class DiffiTBlock(nn.Module):
    """Pre-norm transformer block with TMSA: x = x + TMSA(LN(x), temb); x = x + MLP(LN(x)).

    Works on a (B, H, W, D) map. With `window_size` smaller than the map, attention runs inside
    non-overlapping windows (no shift); with `window_size` equal to the map it is global attention with a
    relative bias over the whole grid (the latent model). No adaLN, no gates: time enters only through TMSA.
    LayerNorms without affine parameters, eps 1e-6, as the release.

    `time_mode` picks an ablation instead of TMSA (module docstring); the default builds exactly the block
    above, with the released checkpoints' parameter names:
        bias   x = x + Attn_{B + B_t}(LN(x));  x = x + MLP(LN(x))              (TimeBiasAttention)
        mlp    x = x + Attn(LN(x));            x = x + MLP(LN(x) + W t)
        token  x = x + Attn([LN(x), U t])[:N]; x = x + MLP(LN(x))              (TimeTokenAttention)
        adaln  x = x + g1 * Attn(LN(x) (1 + s1) + b1);  x = x + g2 * MLP(LN(x) (1 + s2) + b2),
               (b1, s1, g1, b2, s2, g2) = Linear(SiLU(t)), zero-initialised    (DiT's adaLN-Zero)
    """

    def __init__(self, dim, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, fused=True, time_mode="tmsa"):
        super().__init__()
        if time_mode not in TIME_MODES:
            raise ValueError(f"time_mode={time_mode!r} is not one of {', '.join(TIME_MODES)} "
                             f"(tmsa is DiffiT's; the others are the paper's ablations, see tmsa.py)")
        self.window_size = window_size
        self.time_mode = time_mode
        # Choice: the image-space U-Net uses the same affine-free LayerNorm; the paper does not say, the
        # latent release has it (its state dict holds no norm weights).
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        attn_class = {"tmsa": TMSA, "bias": TimeBiasAttention, "token": TimeTokenAttention}.get(time_mode)
        if attn_class is None:  # mlp, adaln: attention without time terms
            self.attn = Attention(dim, num_heads, window_size, fused)
        else:
            self.attn = attn_class(dim, num_heads, window_size, temb_dim, fused)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        if time_mode == "mlp":
            # Choice: config G's "time in the MLP" read as the time token projected to D added to the MLP input.
            self.mlp_temb = nn.Linear(temb_dim or dim, dim)
        if time_mode == "adaln":
            # Choice: the adaLN-Zero baseline read as DiT builds it: SiLU -> Linear(Dt, 6D) gives shift, scale,
            # gate for attention and MLP; zero-initialised, so every gate is 0 and the block starts as the
            # identity. The LayerNorms above already have no affine parameters, as DiT's.
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim or dim, 6 * dim))
            nn.init.zeros_(self.adaLN_modulation[1].weight)
            nn.init.zeros_(self.adaLN_modulation[1].bias)

    def windowed_attention(self, x, temb):  # x: (B, H, W, D) normalised map -> (B, H, W, D)
        H, W = x.shape[1:3]
        windows = window_partition(x, self.window_size)  # (B*nW, w*w, D), image-major
        out = self.attn(windows) if self.time_mode in ("mlp", "adaln") else self.attn(windows, temb)
        return window_reverse(out, self.window_size, H, W)

    def forward(self, x, temb):  # x: (B, H, W, D), temb: (B, Dt)
        if self.time_mode == "adaln":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(temb)[:, None, None].chunk(6, -1)
            x = x + gate1 * self.windowed_attention(modulate(self.norm1(x), shift1, scale1), temb)  # gates (B,1,1,D)
            return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        x = x + self.windowed_attention(self.norm1(x), temb)
        h = self.norm2(x)
        if self.time_mode == "mlp":
            h = h + self.mlp_temb(temb)[:, None, None]  # (B, 1, 1, D): one vector per image
        return x + self.mlp(h)

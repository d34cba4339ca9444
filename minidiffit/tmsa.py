"""Time-dependent multi-head self-attention (TMSA) and the DiffiT transformer block, DiffiT Sec. 3.2.

The time token `temb` (the paper's x_t) enters every query, key and value through its own linear
projection, so the attention pattern itself changes with the diffusion time (DiffiT Eq. 3-5):
    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt.
Used by the image-space U-Net (`unet.py`) and the latent model (`latent.py`), which build their blocks through
`variants.make_block`: the paper's ablations (time in the bias, in the MLP, as a token; DiT's adaLN-Zero) are
subclasses of this block there. Introduced in notebooks/02_tmsa.ipynb.
"""

import math

import torch
import torch.nn as nn

from .attention import MLP, Attention, window_partition, window_reverse

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
# The DiffiT transformer block


class DiffiTBlock(nn.Module):
    """Pre-norm transformer block with TMSA: x = x + TMSA(LN(x), temb); x = x + MLP(LN(x)).

    Works on a (B, H, W, D) map. With `window_size` smaller than the map, attention runs inside
    non-overlapping windows (no shift); with `window_size` equal to the map it is global attention with a
    relative bias over the whole grid (the latent model). No adaLN, no gates: time enters only through TMSA.
    LayerNorms without affine parameters, eps 1e-6, as the release.
    """

    time_mode = "tmsa"  # how the time token enters (variants.py's subclasses name their own)
    attention_class = TMSA  # built as attention_class(dim, num_heads, window_size, temb_dim, fused)

    def __init__(self, dim, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, fused=True):
        super().__init__()
        self.window_size = window_size
        # Choice: the image-space U-Net uses the same affine-free LayerNorm; the paper does not say, the
        # latent release has it (its state dict holds no norm weights).
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = self.attention_class(dim, num_heads, window_size, temb_dim, fused)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def windowed_attention(self, x, temb):  # x: (B, H, W, D) normalised map -> (B, H, W, D)
        H, W = x.shape[1:3]
        windows = window_partition(x, self.window_size)  # (B*nW, w*w, D), image-major
        return window_reverse(self.attn(windows, temb), self.window_size, H, W)

    def forward(self, x, temb):  # x: (B, H, W, D), temb: (B, Dt)
        x = x + self.windowed_attention(self.norm1(x), temb)
        return x + self.mlp(self.norm2(x))

"""The paper's ablations of how time enters the DiffiT block (DiffiT Sec. 5.3, Tables 6-7; DESIGN.md Sec. 2).

Each variant is a small subclass of `tmsa.DiffiTBlock` (same LayerNorms, MLP and windows, same parameter names)
that changes only where the time token goes:
    bias   x = x + Attn_{B + B_t}(LN(x));  x = x + MLP(LN(x))              (TimeBiasAttention, config F)
    mlp    x = x + Attn(LN(x));            x = x + MLP(LN(x) + W t)           (config G)
    token  x = x + Attn([LN(x), U t])[:N]; x = x + MLP(LN(x))              (TimeTokenAttention, Table 7)
    adaln  x = x + g1 * Attn(LN(x) (1 + s1) + b1);  x = x + g2 * MLP(LN(x) (1 + s2) + b2),
           (b1, s1, g1, b2, s2, g2) = Linear(SiLU(t)), zero-initialised    (DiT's adaLN-Zero)
`make_block(time_mode, ...)` builds any of them or DiffiT's own ("tmsa"); unet.py and latent.py call it.
The paper gives one line per ablation: every reading here is ours (`# Choice:` / `# Deviation:`).
Introduced in notebooks/10_ablations.ipynb.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention
from .tmsa import DiffiTBlock

# ----------------------------------------------------------------------------
# Other ways for the time token to enter attention


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


class TimeFreeAttention(Attention):
    """Plain windowed attention that takes the time token and ignores it (configs G and adaLN: time enters
    elsewhere in the block). No parameter beyond `Attention`'s."""

    def __init__(self, dim, num_heads, window_size=None, temb_dim=None, fused=True):
        super().__init__(dim, num_heads, window_size, fused)

    def forward(self, x, temb=None):  # x: (B*nW, N, D) -> (B*nW, N, D)
        return super().forward(x)


# ----------------------------------------------------------------------------
# The blocks: DiffiTBlock with another attention, or time added around it


class TimeBiasBlock(DiffiTBlock):
    """Config F: time only in the relative position bias."""

    time_mode = "bias"
    attention_class = TimeBiasAttention


class TimeTokenBlock(DiffiTBlock):
    """DiffiT Table 7's "separate" time token."""

    time_mode = "token"
    attention_class = TimeTokenAttention


class TimeMLPBlock(DiffiTBlock):
    """Config G, time in the MLP: x = x + Attn(LN(x)); x = x + MLP(LN(x) + W t)."""

    time_mode = "mlp"
    attention_class = TimeFreeAttention

    def __init__(self, dim, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, fused=True):
        super().__init__(dim, num_heads, window_size, mlp_ratio, temb_dim, fused)
        # Choice: config G's "time in the MLP" read as the time token projected to D added to the MLP input.
        self.mlp_temb = nn.Linear(temb_dim or dim, dim)

    def forward(self, x, temb):  # x: (B, H, W, D), temb: (B, Dt)
        x = x + self.windowed_attention(self.norm1(x), temb)
        return x + self.mlp(self.norm2(x) + self.mlp_temb(temb)[:, None, None])  # (B, 1, 1, D): one vector per image


def modulate(x, shift, scale):
    """adaLN's affine map of a normalised x, as DiT: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class AdaLNZeroBlock(DiffiTBlock):
    """DiT's adaLN-Zero instead of TMSA: LayerNorm shifted and scaled, each branch gated, all from the time token."""

    time_mode = "adaln"
    attention_class = TimeFreeAttention

    def __init__(self, dim, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, fused=True):
        super().__init__(dim, num_heads, window_size, mlp_ratio, temb_dim, fused)
        # Choice: the adaLN-Zero baseline read as DiT builds it: SiLU -> Linear(Dt, 6D) gives shift, scale,
        # gate for attention and MLP; zero-initialised, so every gate is 0 and the block starts as the
        # identity. The block's LayerNorms already have no affine parameters, as DiT's.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim or dim, 6 * dim))
        self.zero_modulation()

    @torch.no_grad()
    def zero_modulation(self):
        """The "Zero" of adaLN-Zero (latent.py calls it again after its xavier pass, as DiT does)."""
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x, temb):  # x: (B, H, W, D), temb: (B, Dt)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(temb)[:, None, None].chunk(6, -1)
        x = x + gate1 * self.windowed_attention(modulate(self.norm1(x), shift1, scale1), temb)  # gates (B, 1, 1, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


# ----------------------------------------------------------------------------
# The factory: time_mode -> block


BLOCKS = {"tmsa": DiffiTBlock, "bias": TimeBiasBlock, "mlp": TimeMLPBlock, "token": TimeTokenBlock,
          "adaln": AdaLNZeroBlock}
TIME_MODES = tuple(BLOCKS)  # DiffiT's TMSA first, then the ablations


def make_block(time_mode, dim, num_heads, window_size, mlp_ratio=4.0, temb_dim=None, fused=True):
    """The block for `time_mode` (a key of BLOCKS), e.g. make_block("adaln", 128, 4, 4, temb_dim=512)."""
    if time_mode not in BLOCKS:
        raise ValueError(f"time_mode={time_mode!r} is not one of {', '.join(TIME_MODES)} "
                         f"(tmsa is DiffiT's; the others are the paper's ablations, see variants.py)")
    return BLOCKS[time_mode](dim, num_heads, window_size, mlp_ratio, temb_dim, fused)

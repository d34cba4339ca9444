"""Plain multi-head self-attention, windows, Swin-style relative position bias, and the MLP.

The transformer parts that DiffiT shares with ViT/Swin/DiT; `tmsa.py` adds time on top of them.
Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V  (DiffiT Eq. 3-6, Swin Eq. 4), written twice:
an explicit path to read and an `F.scaled_dot_product_attention` path to run, tested equal.
Introduced in notebooks/01_attention.ipynb.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ----------------------------------------------------------------------------
# The attention function: explicit (readable) and fused (fast)


def attention(q, k, v, bias=None, fused=True):
    """softmax(q k^T / sqrt(d) + bias) v.

    q, k, v: (B, h, N, d). bias: None or broadcastable to (B, h, N, N), added to the logits.
    `fused=True` uses F.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA), with
    the bias passed as an additive float mask; `fused=False` spells the equation out.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, N, N)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v  # (B, h, N, d)


# ----------------------------------------------------------------------------
# Non-overlapping windows (Swin Sec. 3.2; DiffiT's image-space model, no shift)


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, w*w, C): cut the map into non-overlapping w x w windows."""
    if x.ndim != 4:
        raise ValueError(f"window_partition wants a channels-last map (B, H, W, C), got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    if H % window_size or W % window_size:
        raise ValueError(f"feature map {H}x{W} is not divisible by window_size={window_size}: "
                         f"pick a window_size that divides both H and W (or resize the map)")
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window_size, ww=window_size)


def window_reverse(windows, window_size, H, W):
    """(B * nW, w*w, C) -> (B, H, W, C): the inverse of `window_partition`."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                     nh=H // window_size, nw=W // window_size, wh=window_size, ww=window_size)


# ----------------------------------------------------------------------------
# Relative position bias (Swin Sec. 3.2): one learned scalar per head and per (dy, dx)


def relative_position_index(window_size):
    """(w*w, w*w) long: for tokens i, j of a window, the row of the bias table for their (dy, dx).

    dy, dx range over -(w-1)..(w-1); shifted to 0..2w-2 they index a (2w-1) x (2w-1) grid, flattened
    row-major: index = (dy + w - 1) * (2w - 1) + (dx + w - 1).
    """
    w = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): (dy, dx) of every pair
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, D) tokens, with an optional relative position bias.

    With `window_size=w` the tokens must be one w x w window (N = w*w), flattened row-major, and a
    learned bias B = table[relative_position_index] (h, N, N) is added to the logits.
    """

    def __init__(self, dim, num_heads, window_size=None, fused=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.fused = fused  # True: SDPA; False: the explicit softmax path (same numbers)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if window_size is not None:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # Swin's init
            # Persistent: the released latent checkpoints store it, so strict loading expects it.
            self.register_buffer("relative_position_index", relative_position_index(window_size))

    def position_bias(self):
        """(1, h, N, N) additive bias, or None without windows."""
        if self.window_size is None:
            return None
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, h)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def attend(self, qkv, bias=None):
        """(B, N, 3D) projected q|k|v -> (B, N, D) attention output after `proj`.

        `bias`: an additive logit bias broadcastable to (B, h, N, N) in place of the relative position bias
        (the ablations in tmsa.py build their own from it); None: this module's position bias, if any.
        """
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if bias is None:
            bias = self.position_bias()
            if bias is not None and q.shape[2] != bias.shape[-1]:
                raise ValueError(f"got {q.shape[2]} tokens, but window_size={self.window_size} expects one "
                                 f"{self.window_size}x{self.window_size} window of {bias.shape[-1]} tokens: "
                                 f"cut the map with window_partition first")
        if bias is not None:
            bias = bias.to(q.dtype)  # SDPA wants the mask in q's dtype (bf16 under autocast)
        out = attention(q, k, v, bias, fused=self.fused)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x):  # x: (B, N, D)
        return self.attend(self.qkv(x))


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear, the transformer feed-forward (as DiT and the DiffiT release)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

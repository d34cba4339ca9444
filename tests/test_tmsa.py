"""Tests for minidiffit/tmsa.py: the time embedding, TMSA and the DiffiT block against references.

The sinusoid against a float64 numpy closed form; TMSA with its time projection zeroed against plain
Attention; the windowed block against its math run window by window by hand.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minidiffit.attention import Attention, relative_position_index
from minidiffit.base.runtime import num_parameters
from minidiffit.tmsa import TMSA, DiffiTBlock, TimestepEmbedder, timestep_embedding

# ----------------------------------------------------------------------------
# The time token


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.0, 250.5, 999.0, -1.3, 0.25])
    i = np.arange(128, dtype=np.float64)
    freqs = np.exp(-np.log(10000.0) * i / 128)  # DESIGN.md Sec. 1: 128 frequencies
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # [cos | sin]
    got = timestep_embedding(torch.tensor(t, dtype=torch.float32))
    assert got.shape == (len(t), 256) and got.dtype == torch.float32
    # float32 frequencies times t up to 999: absolute error ~1e-4 at most in the argument.
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-4)
    # Endpoints of the layout: column 0 is cos(t), column 128 is sin(t), the last is sin(t / 10000^(127/128)).
    np.testing.assert_allclose(got[:, 0].numpy(), np.cos(t), atol=1e-5)
    np.testing.assert_allclose(got[:, 128].numpy(), np.sin(t), atol=1e-5)


def test_timestep_embedding_other_dims_and_errors():
    t = torch.tensor([3.0, 40.0])
    got = timestep_embedding(t, dim=8, max_period=100)
    f = 100.0 ** (-np.arange(4) / 4)
    args = t.numpy()[:, None].astype(np.float64) * f
    np.testing.assert_allclose(got.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-5)
    assert timestep_embedding(torch.tensor([5]), dim=16).dtype == torch.float32  # integer steps work
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(t, dim=7)


def test_timestep_embedder():
    torch.manual_seed(0)
    emb = TimestepEmbedder(32)
    t = torch.tensor([0.0, 10.0, 500.0])
    assert emb(t).shape == (3, 32)
    # Names as the release: mlp.0 and mlp.2 are the two Linears.
    assert set(emb.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    ref = emb.mlp[2](F.silu(emb.mlp[0](timestep_embedding(t, 256))))
    torch.testing.assert_close(emb(t), ref)


# ----------------------------------------------------------------------------
# TMSA


@pytest.mark.parametrize("window_size", [None, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_tmsa_zero_time_projection_is_plain_attention(window_size, fused):
    torch.manual_seed(0)
    dim, heads = 24, 3
    tmsa = TMSA(dim, heads, window_size, fused=fused)
    with torch.no_grad():
        tmsa.qkv_temb.weight.zero_()
        tmsa.qkv_temb.bias.zero_()
    plain = Attention(dim, heads, window_size, fused=fused)
    state = {k: v for k, v in tmsa.state_dict().items() if not k.startswith("qkv_temb.")}
    plain.load_state_dict(state, strict=True)  # the rest of TMSA is exactly an Attention
    x = torch.randn(2, 9, dim)
    temb = torch.randn(2, dim)
    torch.testing.assert_close(tmsa(x, temb), plain(x), rtol=1e-6, atol=1e-6)


def test_tmsa_equals_eq_3_to_5_by_hand():
    # q = x_s W_qs + x_t W_qt (and k, v alike), then softmax(q k^T / sqrt(d) + B) v per head.
    torch.manual_seed(0)
    dim, heads, w, Dt = 12, 2, 3, 20
    m = TMSA(dim, heads, w, temb_dim=Dt, fused=False)
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, w * w, dim)
    temb = torch.randn(2, Dt)
    qkv = x @ m.qkv.weight.T + m.qkv.bias + (temb @ m.qkv_temb.weight.T + m.qkv_temb.bias)[:, None]
    q, k, v = qkv.chunk(3, dim=-1)
    d = dim // heads
    bias = m.relative_position_bias_table[relative_position_index(w)]  # (N, N, h)
    outs = []
    for hi in range(heads):
        sl = slice(hi * d, (hi + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d) + bias[..., hi]
        outs.append(logits.softmax(-1) @ v[..., sl])
    ref = m.proj(torch.cat(outs, -1))
    torch.testing.assert_close(m(x, temb), ref, rtol=1e-5, atol=1e-5)


def test_tmsa_depends_on_temb_per_image():
    torch.manual_seed(0)
    dim = 16
    m = TMSA(dim, 2, window_size=2)
    x = torch.randn(3, 4, dim)
    temb = torch.randn(3, dim)
    out = m(x, temb)
    temb2 = temb.clone()
    temb2[1] += torch.randn(dim)  # change the time token of image 1 only
    out2 = m(x, temb2)
    assert not torch.allclose(out[1], out2[1], atol=1e-4)
    torch.testing.assert_close(out[0], out2[0])
    torch.testing.assert_close(out[2], out2[2])
    # An image's output does not depend on the rest of the batch.
    torch.testing.assert_close(m(x[:1], temb[:1]), out[:1])


def test_tmsa_attention_pattern_depends_on_temb():
    # With the value projection of time zeroed, any change of output must come from q and k, the pattern.
    torch.manual_seed(0)
    dim = 16
    m = TMSA(dim, 2)
    with torch.no_grad():
        m.qkv_temb.weight[2 * dim:].zero_()
        m.qkv_temb.bias[2 * dim:].zero_()
    x = torch.randn(1, 9, dim)
    assert not torch.allclose(m(x, torch.randn(1, dim)), m(x, torch.randn(1, dim)), atol=1e-4)


def test_tmsa_time_key_term_cancels_in_softmax():
    # (q_i + a).(k_j + b) = q_i.k_j + a.k_j + (terms constant in j): the softmax over j ignores b = x_t W_kt,
    # so zeroing the key rows of qkv_temb changes nothing (notebook 02 explains; kept for checkpoint layout).
    torch.manual_seed(0)
    dim = 16
    m = TMSA(dim, 2, window_size=3, temb_dim=8)
    x, temb = torch.randn(2, 9, dim), torch.randn(2, 8)
    out = m(x, temb)
    with torch.no_grad():
        m.qkv_temb.weight[dim:2 * dim].mul_(0)
        m.qkv_temb.bias[dim:2 * dim].mul_(0)
    torch.testing.assert_close(m(x, temb), out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the query rows, in contrast, do matter
        m.qkv_temb.weight[:dim].mul_(0)
        m.qkv_temb.bias[:dim].mul_(0)
    assert not torch.allclose(m(x, temb), out, atol=1e-4)


def test_tmsa_temb_dim_differs_from_dim():
    torch.manual_seed(0)
    m = TMSA(16, 4, window_size=2, temb_dim=40)
    assert m.qkv_temb.weight.shape == (48, 40) and m.qkv.weight.shape == (48, 16)
    assert m(torch.randn(2, 4, 16), torch.randn(2, 40)).shape == (2, 4, 16)


def test_tmsa_fused_equals_explicit():
    torch.manual_seed(0)
    a = TMSA(32, 4, 4, temb_dim=8, fused=True)
    b = TMSA(32, 4, 4, temb_dim=8, fused=False)
    b.load_state_dict(a.state_dict())
    x, temb = torch.randn(3, 16, 32), torch.randn(3, 8)
    torch.testing.assert_close(a(x, temb), b(x, temb), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# The DiffiT block


def _block_by_hand(block, x, temb):
    """The block's math, window by window, with python loops over images and windows."""
    B, H, W, D = x.shape
    w = block.window_size
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)  # noqa: E731  (no affine parameters)
    out = x.clone()
    for b in range(B):
        for i in range(H // w):
            for j in range(W // w):
                win = ln(x[b, i * w:(i + 1) * w, j * w:(j + 1) * w]).reshape(1, w * w, D)
                att = block.attn(win, temb[b:b + 1]).reshape(w, w, D)
                out[b, i * w:(i + 1) * w, j * w:(j + 1) * w] += att
    hidden = F.gelu(ln(out) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias, approximate="tanh")
    return out + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("H,W,w", [(4, 4, 2), (6, 9, 3), (4, 4, 4)])
def test_block_windowed_equals_by_hand(H, W, w):
    torch.manual_seed(0)
    D = 16
    block = DiffiTBlock(D, 2, w, mlp_ratio=2.0, temb_dim=12)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, H, W, D)
    temb = torch.randn(2, 12)
    out = block(x, temb)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _block_by_hand(block, x, temb), rtol=1e-5, atol=1e-5)


def test_block_full_window_is_global_attention():
    # window_size == map size: one window, so every token attends to every other (the latent model).
    torch.manual_seed(0)
    D, S = 16, 4
    block = DiffiTBlock(D, 2, S, temb_dim=D)
    x = torch.randn(2, S, S, D)
    temb = torch.randn(2, D)
    tokens = F.layer_norm(x, (D,), eps=1e-6).reshape(2, S * S, D)  # the whole map, row-major
    h = x + block.attn(tokens, temb).reshape(2, S, S, D)
    ref = h + block.mlp(F.layer_norm(h, (D,), eps=1e-6))
    torch.testing.assert_close(block(x, temb), ref, rtol=1e-5, atol=1e-5)
    # Global: changing one corner token changes the output at the opposite corner (windows of 2 would not).
    x2 = x.clone()
    x2[:, 0, 0] += torch.randn(D)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(block(x2, temb)[:, -1, -1], block(x, temb)[:, -1, -1], atol=1e-5)
    small = DiffiTBlock(D, 2, 2, temb_dim=D)
    torch.testing.assert_close(small(x2, temb)[:, -1, -1], small(x, temb)[:, -1, -1])


def test_block_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = DiffiTBlock(16, 2, 2, temb_dim=8)
    x = torch.randn(2, 4, 4, 16, requires_grad=True)
    temb = torch.randn(2, 8, requires_grad=True)
    block(x, temb).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0 and temb.grad.abs().sum() > 0


def test_block_state_dict_names():
    # DESIGN.md Sec. 4: the released latent checkpoints use these names inside blocks.{i}.
    block = DiffiTBlock(32, 4, 4)
    keys = set(block.state_dict())
    expected = {
        "attn.qkv.weight", "attn.qkv.bias", "attn.qkv_temb.weight", "attn.qkv_temb.bias",
        "attn.proj.weight", "attn.proj.bias", "attn.relative_position_bias_table",
        "attn.relative_position_index", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    }
    assert keys == expected  # LayerNorms carry no affine parameters, so nothing else
    assert block.attn.relative_position_bias_table.shape == (49, 4)
    assert block.mlp.fc1.weight.shape == (128, 32)


def test_block_xl_shapes_on_meta():
    # One XL/2 block (width 1152, 16 heads, global 16x16 window), counted without allocating.
    with torch.device("meta"):
        block = DiffiTBlock(1152, 16, 16)
        out = block(torch.empty(2, 16, 16, 1152), torch.empty(2, 1152))
    assert out.shape == (2, 16, 16, 1152)
    n = num_parameters(block)
    D = 1152
    assert n == 2 * (3 * D * D + 3 * D) + (D * D + D) + 31 * 31 * 16 + (4 * D * D + 4 * D) + (4 * D * D + D)


def test_block_non_divisible_map_is_a_clear_error():
    block = DiffiTBlock(8, 2, 4)
    with pytest.raises(ValueError, match="window_size"):
        block(torch.randn(1, 6, 6, 8), torch.randn(1, 8))

"""Tests for minidiffit/attention.py: each piece against an independent reference.

Explicit softmax vs SDPA, windows vs direct slicing, the relative position index vs a brute-force
loop over token pairs, the MLP vs the GELU-tanh formula written out.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minidiffit.attention import (
    MLP,
    Attention,
    attention,
    relative_position_index,
    window_partition,
    window_reverse,
)

# ----------------------------------------------------------------------------
# attention(): explicit path vs F.scaled_dot_product_attention


@pytest.mark.parametrize("B,h,N,d", [(1, 1, 1, 4), (2, 3, 16, 8), (3, 4, 49, 32), (1, 2, 7, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_explicit_equals_sdpa(B, h, N, d, with_bias):
    g = torch.Generator().manual_seed(N * 100 + d)
    q, k, v = (torch.randn(B, h, N, d, generator=g) for _ in range(3))
    bias = torch.randn(1, h, N, N, generator=g) if with_bias else None
    fused = attention(q, k, v, bias, fused=True)
    explicit = attention(q, k, v, bias, fused=False)
    assert fused.shape == (B, h, N, d)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_explicit_equals_by_hand():
    # One head, written with python loops: o_i = sum_j softmax_j(q_i . k_j / sqrt(d) + b_ij) v_j.
    g = torch.Generator().manual_seed(0)
    N, d = 5, 3
    q, k, v = (torch.randn(1, 1, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 1, N, N, generator=g, dtype=torch.float64)
    out = torch.zeros(N, d, dtype=torch.float64)
    for i in range(N):
        logits = [float(q[0, 0, i] @ k[0, 0, j]) / math.sqrt(d) + float(bias[0, 0, i, j]) for j in range(N)]
        m = max(logits)
        weights = [math.exp(x - m) for x in logits]
        total = sum(weights)
        for j in range(N):
            out[i] += weights[j] / total * v[0, 0, j]
    torch.testing.assert_close(attention(q, k, v, bias, fused=False)[0, 0], out)


def test_bias_changes_output():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    bias = 3 * torch.randn(1, 2, 9, 9, generator=g)
    assert not torch.allclose(attention(q, k, v, bias), attention(q, k, v))


# ----------------------------------------------------------------------------
# The Attention module


@pytest.mark.parametrize("window_size", [None, 2, 4])
def test_attention_module_fused_equals_explicit(window_size):
    torch.manual_seed(0)
    dim, heads = 32, 4
    fused = Attention(dim, heads, window_size, fused=True)
    explicit = Attention(dim, heads, window_size, fused=False)
    explicit.load_state_dict(fused.state_dict())
    if window_size is not None:  # make the bias large enough to matter
        with torch.no_grad():
            fused.relative_position_bias_table.normal_()
            explicit.relative_position_bias_table.copy_(fused.relative_position_bias_table)
    N = (window_size or 5) ** 2
    x = torch.randn(3, N, dim)
    torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-5)


def test_attention_module_by_hand():
    # The module equals per-head attention written with plain matrices and the bias looked up by hand.
    torch.manual_seed(0)
    dim, heads, w = 12, 3, 3
    m = Attention(dim, heads, w, fused=False)
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, w * w, dim)
    Wq, Wk, Wv = m.qkv.weight.chunk(3)
    bq, bk, bv = m.qkv.bias.chunk(3)
    d = dim // heads
    idx = relative_position_index(w)
    heads_out = []
    for hi in range(heads):
        sl = slice(hi * d, (hi + 1) * d)
        q = x @ Wq[sl].T + bq[sl]
        k = x @ Wk[sl].T + bk[sl]
        v = x @ Wv[sl].T + bv[sl]
        bias = m.relative_position_bias_table[:, hi][idx]  # (N, N)
        heads_out.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + bias, dim=-1) @ v)
    ref = m.proj(torch.cat(heads_out, dim=-1))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_module_gradients():
    torch.manual_seed(0)
    m = Attention(16, 2, 3)
    m(torch.randn(2, 9, 16)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrong_token_count_for_window_is_a_clear_error():
    m = Attention(8, 2, 3)
    for fused in (True, False):
        m.fused = fused
        with pytest.raises(ValueError, match="window_partition"):
            m(torch.randn(1, 10, 8))


def test_dim_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, 4)


# ----------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("B,H,W,C,w", [(1, 4, 4, 1, 2), (2, 8, 12, 3, 4), (3, 6, 6, 5, 3), (1, 5, 5, 2, 5)])
def test_window_partition_reverse_identity(B, H, W, C, w):
    x = torch.randn(B, H, W, C)
    windows = window_partition(x, w)
    assert windows.shape == (B * (H // w) * (W // w), w * w, C)
    assert torch.equal(window_reverse(windows, w, H, W), x)


def test_window_equals_direct_slice():
    B, H, W, C, w = 2, 6, 9, 3, 3
    x = torch.arange(B * H * W * C, dtype=torch.float32).reshape(B, H, W, C)
    windows = window_partition(x, w)
    nh, nw = H // w, W // w
    for b in range(B):
        for i in range(nh):
            for j in range(nw):
                direct = x[b, i * w:(i + 1) * w, j * w:(j + 1) * w].reshape(w * w, C)  # row-major inside
                assert torch.equal(windows[(b * nh + i) * nw + j], direct)


def test_non_divisible_map_is_a_clear_error():
    with pytest.raises(ValueError, match="window_size"):
        window_partition(torch.zeros(1, 6, 8, 2), 4)
    with pytest.raises(ValueError, match="window_size"):
        window_partition(torch.zeros(1, 8, 7, 2), 4)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        window_partition(torch.zeros(8, 8, 2), 4)


# ----------------------------------------------------------------------------
# Relative position bias


@pytest.mark.parametrize("w", [1, 2, 3, 4, 7])
def test_relative_position_index_brute_force(w):
    # Enumerate every pair of tokens (i, j) of a w x w window with python loops.
    side = 2 * w - 1
    table_rows = {}  # (dy, dx) -> row, assigned row-major over dy then dx
    for dy in range(-(w - 1), w):
        for dx in range(-(w - 1), w):
            table_rows[(dy, dx)] = len(table_rows)
    expected = torch.zeros(w * w, w * w, dtype=torch.long)
    for yi in range(w):
        for xi in range(w):
            for yj in range(w):
                for xj in range(w):
                    expected[yi * w + xi, yj * w + xj] = table_rows[(yi - yj, xi - xj)]
    idx = relative_position_index(w)
    assert idx.dtype == torch.long
    assert torch.equal(idx, expected)
    # Every (dy, dx) is used, so every row of the table is learned.
    assert set(idx.flatten().tolist()) == set(range(side * side))


def test_same_offset_same_bias():
    # Translation invariance: the bias depends only on the offset, not on where the pair sits.
    torch.manual_seed(0)
    w = 4
    m = Attention(8, 2, w)
    bias = m.position_bias()[0]  # (h, N, N)
    tok = lambda y, x: y * w + x  # noqa: E731
    torch.testing.assert_close(bias[:, tok(0, 0), tok(1, 2)], bias[:, tok(2, 1), tok(3, 3)])
    torch.testing.assert_close(bias[:, tok(2, 3), tok(0, 1)], bias[:, tok(3, 3), tok(1, 1)])
    assert not torch.allclose(bias[:, tok(0, 0), tok(1, 2)], bias[:, tok(1, 2), tok(0, 0)])


def test_bias_table_shape_and_init():
    torch.manual_seed(0)
    w, heads = 8, 16
    m = Attention(64, heads, w)
    table = m.relative_position_bias_table
    assert table.shape == ((2 * w - 1) ** 2, heads)
    assert table.requires_grad
    # trunc_normal_(std=0.02) truncates at +-2 (absolute), far outside 0.02, so the std is ~0.02.
    assert abs(table.std().item() - 0.02) < 0.002
    assert abs(table.mean().item()) < 0.002
    assert table.abs().max() < 0.2


def test_relative_position_index_is_persistent_buffer():
    m = Attention(8, 2, 3)
    sd = m.state_dict()
    assert "relative_position_index" in sd and "relative_position_bias_table" in sd
    assert "relative_position_index" not in dict(m.named_parameters())
    assert torch.equal(sd["relative_position_index"], relative_position_index(3))
    # Strict loading round-trips into a fresh module.
    Attention(8, 2, 3).load_state_dict(sd, strict=True)


def test_no_window_no_bias():
    m = Attention(8, 2)
    assert m.position_bias() is None
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


# ----------------------------------------------------------------------------
# MLP


def test_mlp_is_gelu_tanh():
    torch.manual_seed(0)
    m = MLP(6, 24)
    x = torch.randn(4, 6)
    h = x @ m.fc1.weight.T + m.fc1.bias
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    ref = gelu_tanh @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)
    # ... and not the exact (erf) GELU: the two differ measurably on these inputs.
    exact = F.gelu(h) @ m.fc2.weight.T + m.fc2.bias
    assert not torch.allclose(m(x), exact, rtol=0, atol=1e-7)
    assert m.fc1.weight.shape == (24, 6) and m.fc2.weight.shape == (6, 24)

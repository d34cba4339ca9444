"""The ablation variants of the DiffiT block (`time_mode`, DESIGN.md Sec. 2) against references.

Every mode against a hand-written block (loops over images and windows, explicit softmax); the structural
claims of each (q, k, v free of time; zeroed time weights; adaLN-Zero's identity start); parameter counts
against a formula on the meta device; window counts; and one EDM training step of a tiny U-Net per mode.
The default, "tmsa", must stay exactly DiffiT's block (tests/test_tmsa.py, test_unet.py, test_latent.py).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from minidiffit.attention import relative_position_index, window_partition
from minidiffit.diffusion import EDMPrecond, edm_loss
from minidiffit.variants import BLOCKS, TIME_MODES, make_block
from minidiffit.unet import UNET_PRESETS, DiffiTUNet, count_parameters

# The parameters through which time enters a block, per mode (all other parameters never see temb).
TIME_PARAMETERS = {"tmsa": "attn.qkv_temb", "bias": "attn.bias_temb", "mlp": "mlp_temb", "token": "attn.token_temb",
                   "adaln": "adaLN_modulation"}

# ----------------------------------------------------------------------------
# The block written out by hand


def ln(z):
    return F.layer_norm(z, (z.shape[-1],), eps=1e-6)  # no affine parameters


def attention_by_hand(attn, tokens, bias, qkv_time=0.0):
    """proj(softmax(q k^T / sqrt(d) + bias) v) for one window's tokens (N, D), head by head; bias (h, N, N)."""
    N, D = tokens.shape
    d = D // attn.num_heads
    q, k, v = (tokens @ attn.qkv.weight.T + attn.qkv.bias + qkv_time).chunk(3, dim=-1)  # (N, D) each
    heads = []
    for i in range(attn.num_heads):
        sl = slice(i * d, (i + 1) * d)
        logits = q[:, sl] @ k[:, sl].T / math.sqrt(d) + bias[i]  # (N, N)
        heads.append(logits.softmax(-1) @ v[:, sl])
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


def table_bias(table, w):
    """((2w-1)^2, h) table -> (h, N, N) bias of a w x w window."""
    return table[relative_position_index(w)].permute(2, 0, 1)


def over_windows(x, w, fn):
    """fn(b, tokens (w*w, D)) -> (w*w, D) applied to every w x w window of every image b, with loops."""
    B, H, W, D = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for i in range(H // w):
            for j in range(W // w):
                win = x[b, i * w:(i + 1) * w, j * w:(j + 1) * w].reshape(w * w, D)
                out[b, i * w:(i + 1) * w, j * w:(j + 1) * w] = fn(b, win).reshape(w, w, D)
    return out


def mlp_by_hand(mlp, z):
    return F.gelu(z @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh") @ mlp.fc2.weight.T + mlp.fc2.bias


def block_by_hand(block, x, temb):
    """Each time_mode as DESIGN.md Sec. 2 describes it (with variants.py's readings), from the block's weights."""
    mode, a, w = block.time_mode, block.attn, block.window_size
    D, N, h = x.shape[-1], w * w, a.num_heads
    B_pos = table_bias(a.relative_position_bias_table, w)  # (h, N, N)
    col = lambda v: v[:, None, None]  # noqa: E731  (B, D) -> (B, 1, 1, D)
    if mode == "adaln":
        mod = F.silu(temb) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias  # (B, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.split(D, dim=-1)
        att = over_windows(x, w, lambda b, win: attention_by_hand(a, ln(win) * (1 + scale1[b]) + shift1[b], B_pos))
        x = x + col(gate1) * att
        return x + col(gate2) * mlp_by_hand(block.mlp, ln(x) * (1 + col(scale2)) + col(shift2))

    def window(b, win):
        if mode == "tmsa":  # DiffiT Eq. 3-5
            return attention_by_hand(a, ln(win), B_pos, temb[b] @ a.qkv_temb.weight.T + a.qkv_temb.bias)
        if mode == "bias":  # B + B_t, B_t a second table predicted from the time token
            time_table = (temb[b] @ a.bias_temb.weight.T + a.bias_temb.bias).reshape(-1, h)
            return attention_by_hand(a, ln(win), table_bias(a.relative_position_bias_table + time_table, w))
        if mode == "token":  # the time token appended last, zero position bias on its row and column
            token = temb[b] @ a.token_temb.weight.T + a.token_temb.bias  # (D,)
            bias = torch.zeros(h, N + 1, N + 1)
            bias[:, :N, :N] = B_pos
            return attention_by_hand(a, torch.cat([ln(win), token[None]]), bias)[:N]
        return attention_by_hand(a, ln(win), B_pos)  # mlp: plain attention

    x = x + over_windows(x, w, window)
    z = ln(x)
    if mode == "mlp":
        z = z + col(temb @ block.mlp_temb.weight.T + block.mlp_temb.bias)
    return x + mlp_by_hand(block.mlp, z)


def small_block(mode, fused=True, randomize=True):
    """A small block on two 4x8 maps (two 4x4 windows per image), time token of width 12 != D."""
    torch.manual_seed(0)
    block = make_block(mode, 16, 2, 4, mlp_ratio=2.0, temb_dim=12, fused=fused)
    assert type(block) is BLOCKS[mode] and block.time_mode == mode
    if randomize:
        with torch.no_grad():
            block.attn.relative_position_bias_table.normal_()  # so that a wrong bias layout shows
            if mode == "adaln":  # away from the zero start, so every term of adaLN is exercised
                for p in block.adaLN_modulation.parameters():
                    p.normal_(0, 0.3)
    return block, torch.randn(2, 4, 8, 16), torch.randn(2, 12)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", TIME_MODES)
def test_block_equals_by_hand(mode, fused):
    block, x, temb = small_block(mode, fused)
    torch.testing.assert_close(block(x, temb), block_by_hand(block, x, temb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", TIME_MODES)
def test_time_enters_only_through_its_parameters(mode):
    block, x, temb = small_block(mode)
    names = {n for n, _ in block.named_parameters() if "temb" in n or "adaLN" in n}
    assert names == {n for n, _ in block.named_parameters() if n.startswith(TIME_PARAMETERS[mode])}
    assert names, f"{mode}: no time parameters"
    # Per image: changing image 1's time token changes image 1 only (windows are image-major).
    temb2 = temb.clone()
    temb2[1] += torch.randn(12)
    out, out2 = block(x, temb), block(x, temb2)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1], atol=1e-4)


def test_bias_qkv_do_not_see_time_but_the_output_does():
    block, x, temb = small_block("bias")
    seen = []
    block.attn.qkv.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    out1, out2 = block(x, temb), block(x, temb + torch.randn(2, 12))
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)  # q, k, v from x alone
    assert not torch.allclose(out1, out2, atol=1e-4)  # time still acts, through the position bias


def test_bias_with_zeroed_time_table_is_plain_windowed_attention():
    block, x, temb = small_block("bias")
    with torch.no_grad():
        block.attn.bias_temb.weight.zero_()
        block.attn.bias_temb.bias.zero_()
    a = block.attn
    B_pos = table_bias(a.relative_position_bias_table, 4)  # (h, 16, 16), the time-free table only
    h = x + over_windows(x, 4, lambda b, win: attention_by_hand(a, ln(win), B_pos))
    torch.testing.assert_close(block(x, temb), h + mlp_by_hand(block.mlp, ln(h)), rtol=1e-5, atol=1e-5)


def test_mlp_with_zeroed_projection_ignores_time():
    block, x, temb = small_block("mlp")
    out = block(x, temb)
    assert not torch.allclose(out, block(x, temb + 1.0), atol=1e-4)
    with torch.no_grad():
        block.mlp_temb.weight.zero_()
        block.mlp_temb.bias.zero_()
    torch.testing.assert_close(block(x, temb), block(x, torch.randn(2, 12)), rtol=0, atol=0)


def test_adaln_zero_starts_as_the_identity():
    block, x, temb = small_block("adaln", randomize=False)
    assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    torch.testing.assert_close(block(x, temb), x, rtol=0, atol=0)  # every gate is zero


def test_invalid_time_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="tmsa, bias, mlp, token, adaln"):
        DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], time_mode="film"))
    with pytest.raises(ValueError, match="adaln"):
        make_block("adaLN", 16, 2, 4)


# ----------------------------------------------------------------------------
# Parameter counts: each mode replaces TMSA's qkv_temb (Dt*3D + 3D per block) by its own time parameters


def time_parameters_per_block(mode, D, heads, w, Dt):
    T = (2 * w - 1) ** 2 * heads  # entries of a relative position table
    return {"tmsa": Dt * 3 * D + 3 * D, "bias": Dt * T + T, "mlp": Dt * D + D, "token": Dt * D + D,
            "adaln": Dt * 6 * D + 6 * D}[mode]


@pytest.mark.parametrize("preset", ["cifar10", "fashion"])
@pytest.mark.parametrize("mode", TIME_MODES)
def test_parameter_count_difference_matches_formula(mode, preset):
    cfg = UNET_PRESETS[preset]
    expected = 0
    for s, D in enumerate(cfg.channels):
        w = min(cfg.window_size, cfg.img_resolution // 2**s)
        per_block = (time_parameters_per_block(mode, D, D // cfg.head_dim, w, cfg.temb_dim)
                     - time_parameters_per_block("tmsa", D, D // cfg.head_dim, w, cfg.temb_dim))
        expected += 2 * cfg.num_blocks[s] * per_block  # encoder and decoder
    got = count_parameters(dataclasses.replace(cfg, time_mode=mode)) - count_parameters(cfg)  # on meta
    assert got == expected


# ----------------------------------------------------------------------------
# Windows


def test_window_partition_counts():
    x = torch.zeros(3, 32, 32, 8)
    assert window_partition(x, 2).shape == (3 * 256, 4, 8)
    assert window_partition(x, 4).shape == (3 * 64, 16, 8)
    assert window_partition(x, 8).shape == (3 * 16, 64, 8)


@pytest.mark.parametrize("window_size,windows", [(2, 256), (8, 16)])
def test_unet_window_size_reaches_the_first_block(window_size, windows):
    torch.manual_seed(0)
    model = DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], window_size=window_size))
    shapes = []
    model.encoder[0][0].block.attn.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape))
    model(torch.randn(2, 3, 32, 32), torch.randn(2))
    assert shapes == [(2 * windows, window_size ** 2, 32)]  # 32x32 map, 32 channels at the first stage


# ----------------------------------------------------------------------------
# The U-Net with every mode; the default unchanged


@pytest.mark.parametrize("mode", TIME_MODES)
def test_unet_trains_one_step_in_every_mode(mode):
    torch.manual_seed(0)
    net = DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], img_resolution=16, time_mode=mode))
    torch.nn.init.normal_(net.head.weight, std=0.02)  # the zero-initialised head would block all gradients
    denoiser = EDMPrecond(net)
    images, augment = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 9)
    loss_of = lambda: edm_loss(denoiser, images, augment, generator=torch.Generator().manual_seed(0)).mean()  # noqa: E731
    loss = loss_of()
    loss.backward()
    for name, p in net.named_parameters():
        if mode != "adaln" or "adaLN" in name:  # adaLN-Zero: only the modulation learns at the first step
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{mode}: no gradient reaches {name}"
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    opt.step()
    assert loss_of().item() != loss.item()
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([0.1, 0.1]))
    assert out.shape == x.shape
    assert (out - net(x, torch.tensor([0.6, 0.6]))).abs().max() > 0  # the output sees time (adaLN: after a step)


def test_default_time_mode_is_tmsa_with_the_same_weights():
    with torch.device("meta"):
        default = DiffiTUNet(UNET_PRESETS["cifar10"]).state_dict()
        explicit = DiffiTUNet(dataclasses.replace(UNET_PRESETS["cifar10"], time_mode="tmsa")).state_dict()
    assert list(default) == list(explicit)
    block_keys = {k.split(".block.")[1] for k in default if ".block." in k}
    assert block_keys == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.qkv_temb.weight", "attn.qkv_temb.bias", "attn.proj.weight",
        "attn.proj.bias", "attn.relative_position_bias_table", "attn.relative_position_index",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    }
    # Same seed, same weights, same output: the mode adds no module and draws no random number in tmsa.
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    outs = []
    for cfg in (UNET_PRESETS["tiny"], dataclasses.replace(UNET_PRESETS["tiny"], time_mode="tmsa")):
        torch.manual_seed(0)
        model = DiffiTUNet(cfg)
        torch.nn.init.normal_(model.head.weight, std=0.02)
        outs.append(model(x, c))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)

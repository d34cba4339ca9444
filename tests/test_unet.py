"""Image-space DiffiT U-Net: shapes, parameter counts against a hand formula, gradients, conditioning,
window locality, and a tiny model overfitting 8 images through EDM."""

import dataclasses

import pytest
import torch

from minidiffit.diffusion import EDMPrecond, edm_loss
from minidiffit.unet import UNET_PRESETS, DiffiTUNet, UNetConfig, count_parameters


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], **overrides))
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero-initialised head would block all gradients
    return model


def expected_parameters(cfg: UNetConfig):
    """The parameter count written out by hand from the architecture description."""
    dt, C = cfg.temb_dim, cfg.channels
    S = len(C)

    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def linear(din, dout, bias=True):
        return din * dout + (dout if bias else 0)

    def resblock(c, res):
        w = min(cfg.window_size, res)
        hidden = int(c * cfg.mlp_ratio)
        return (2 * c + conv(c, c, 3)  # GN, Conv3x3
                + linear(c, 3 * c) + linear(dt, 3 * c) + linear(c, c)  # TMSA: qkv, qkv_temb, proj
                + (2 * w - 1) ** 2 * (c // cfg.head_dim)  # relative position bias table
                + linear(c, hidden) + linear(hidden, c))  # MLP (the LayerNorms have no parameters)

    n = linear(256, dt) + linear(dt, dt) + linear(cfg.augment_dim, dt, bias=False) * (cfg.augment_dim > 0)
    n += conv(cfg.in_channels, C[0], 3) + 2 * C[0] + conv(C[0], cfg.in_channels, 3)  # tokenizer, head GN + conv
    for s in range(S):
        n += 2 * cfg.num_blocks[s] * resblock(C[s], cfg.img_resolution // 2**s)  # encoder + decoder
    for s in range(S - 1):
        n += conv(C[s], C[s + 1], 3) + conv(C[s + 1], C[s], 3) + conv(2 * C[s], C[s], 1)  # down, up, merge
    return n


@pytest.mark.parametrize("name", list(UNET_PRESETS))
def test_parameter_count_matches_formula(name):
    n = count_parameters(name)
    print(f"{name}: {n:,} parameters")
    assert n == expected_parameters(UNET_PRESETS[name])


def test_preset_sizes_are_ordered():
    counts = {name: count_parameters(name) for name in UNET_PRESETS}
    assert counts["tiny"] < counts["small"] < counts["cifar10"] < counts["ffhq64"]


@pytest.mark.parametrize("name", ["cifar10", "ffhq64"])
def test_paper_presets_shapes_on_meta(name):
    cfg = UNET_PRESETS[name]
    with torch.device("meta"):
        model = DiffiTUNet(cfg)
        x = torch.empty(2, 3, cfg.img_resolution, cfg.img_resolution)
        out = model(x, torch.empty(2), torch.empty(2, 9))
    assert out.shape == x.shape and out.device.type == "meta"


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cpu_presets_shapes(name):
    torch.manual_seed(0)
    model = DiffiTUNet(UNET_PRESETS[name])
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.randn(2), torch.randn(2, 9)).shape == (2, 3, 32, 32)
    assert model(x, torch.randn(2)).shape == (2, 3, 32, 32)  # augment labels optional


def test_zero_initialised_head_gives_zero_output():
    torch.manual_seed(0)
    model = DiffiTUNet(UNET_PRESETS["tiny"])
    assert not model(torch.randn(2, 3, 32, 32), torch.randn(2)).any()


def test_gradients_reach_all_parameters():
    model = tiny_model()
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4), torch.randn(4, 9))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_output_depends_on_noise_and_augment_labels():
    model = tiny_model().eval()
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    out = model(x, c)
    assert not torch.allclose(out, model(x, c + 0.5))
    assert not torch.allclose(out, model(x, c, torch.ones(2, 9)))
    torch.testing.assert_close(out, model(x, c, torch.zeros(2, 9)))  # zero labels = no labels


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="img_resolution"):
        model(torch.randn(2, 3, 64, 64), torch.randn(2))
    with pytest.raises(ValueError, match="augment_labels"):
        model(torch.randn(2, 3, 32, 32), torch.randn(2), torch.randn(2, 4))
    with pytest.raises(ValueError, match="augment_dim=0"):
        tiny_model(augment_dim=0)(torch.randn(2, 3, 32, 32), torch.randn(2), torch.randn(2, 9))
    with pytest.raises(ValueError, match="head_dim"):
        DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], head_dim=24))


def test_window_attention_sees_only_its_window():
    model = tiny_model()
    block = model.encoder[0][0].block  # the DiffiTBlock of the first ResBlock, 4x4 windows on 32x32
    h, temb = torch.randn(1, 32, 32, 32), torch.randn(1, 64)
    h2 = h.clone()
    h2[0, 1, 2] += torch.randn(32)  # a token in the top-left window (not a constant: LayerNorm would remove it)
    diff = (block(h2, temb) - block(h, temb)).abs().sum(-1)[0]  # (32, 32)
    assert (diff[:4, :4] > 0).all()  # every token of that window sees the change ...
    diff[:4, :4] = 0
    assert not diff.any()  # ... and no token outside it


def test_tiny_model_overfits_eight_images():
    # A fixed set of (sigma, noise) draws: re-seeding the generator each step makes the task pure
    # memorisation of 8 (noisy input -> clean image) pairs, so the loss must fall well below its start.
    # The tiny preset at 16x16 keeps this fast; the loss falls ~10x by step 50 and ~100x by step 100.
    torch.manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=16, mode="bilinear")
    denoiser = EDMPrecond(DiffiTUNet(dataclasses.replace(UNET_PRESETS["tiny"], img_resolution=16)))
    opt = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = edm_loss(denoiser, images, generator=torch.Generator().manual_seed(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 10

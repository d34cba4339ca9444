"""Peer baselines from diffusers: the U-Net trains under EDMPrecond, the size matching holds, and diffusers' DiT
(with its time + label embedder shared, as DiT has it) has exactly DiT's parameter count."""

import pytest
import torch

pytest.importorskip("diffusers")

from minidiffit.base.runtime import num_parameters  # noqa: E402
from minidiffit.diffusion import EDMPrecond, edm_loss  # noqa: E402
from minidiffit.latent import LATENT_PRESETS  # noqa: E402
from minidiffit.tools.peers import DiffusersDiT, DiffusersUNet, diffusers_dit, unet2d_like  # noqa: E402
from minidiffit.unet import count_parameters  # noqa: E402


def dit_parameters(depth, dim, num_classes=1000, in_channels=4, patch_size=2, learn_sigma=True, freq_dim=256):
    """DiT's trainable parameter count summed from its layer shapes (models.py of facebookresearch/DiT)."""
    def linear(din, dout):
        return din * dout + dout

    out = 2 * in_channels if learn_sigma else in_channels
    embed = linear(in_channels * patch_size**2, dim)  # patch conv
    embed += linear(freq_dim, dim) + linear(dim, dim)  # t_embedder MLP
    embed += (num_classes + 1) * dim  # y_embedder table, with the null label row
    block = linear(dim, 3 * dim) + linear(dim, dim) + linear(dim, 4 * dim) + linear(4 * dim, dim) + linear(dim, 6 * dim)
    final = linear(dim, 2 * dim) + linear(dim, patch_size**2 * out)  # adaLN modulation, output projection
    return embed + depth * block + final  # the sin-cos pos_embed is fixed (requires_grad=False)


def test_dit_reference_count_matches_published():
    # DiT Table 1 / README: DiT-S/2 33M, DiT-B/2 130M, DiT-XL/2 675M parameters.
    assert abs(dit_parameters(12, 384) / 33e6 - 1) < 0.01
    assert abs(dit_parameters(12, 768) / 130e6 - 1) < 0.01
    assert abs(dit_parameters(28, 1152) / 675e6 - 1) < 0.01


def test_diffusers_dit_has_dits_parameter_count():
    with torch.device("meta"):  # counted, not allocated
        model = diffusers_dit("S/2")
    assert num_parameters(model) == dit_parameters(12, 384)
    assert abs(num_parameters(model) / 33e6 - 1) < 0.05


def test_diffusers_dit_call_adapter():
    torch.manual_seed(0)
    cfg = LATENT_PRESETS["tiny"]
    model = DiffusersDiT(cfg)
    x = torch.randn(2, 4, cfg.input_size, cfg.input_size)
    out = model(x, torch.tensor([10, 900]), torch.tensor([1, 2]))
    assert out.shape == (2, 8, cfg.input_size, cfg.input_size)
    # The time + label embedder is one module shared by every block.
    embs = {id(b.norm1.emb) for b in model.net.transformer_blocks}
    assert len(embs) == 1


def test_diffusers_unet_trains_under_edm_precond():
    torch.manual_seed(0)
    net = unet2d_like("tiny")
    torch.nn.init.normal_(net.net.conv_out.weight, std=0.02)  # the zero-initialised output would block all gradients
    denoiser = EDMPrecond(net)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert denoiser(x, torch.rand(4) + 0.1).shape == x.shape
    edm_loss(denoiser, x).mean().backward()
    for name, q in net.named_parameters():
        assert q.grad is not None and q.grad.abs().sum() > 0, name


def test_diffusers_unet_zero_start_and_no_augment_labels():
    torch.manual_seed(0)
    net = unet2d_like("tiny")
    x = torch.randn(2, 3, 32, 32)
    assert not net(x, torch.randn(2)).any()  # zero output conv: D(x; sigma) = c_skip x at the start
    with pytest.raises(ValueError, match="augment"):
        net(x, torch.randn(2), torch.zeros(2, 9))


def test_unet2d_like_matches_parameter_budget():
    for preset in ("fashion", "small"):
        with torch.device("meta"):
            peer = unet2d_like(preset)
        assert isinstance(peer, DiffusersUNet)
        assert abs(num_parameters(peer) / count_parameters(preset) - 1) < 0.1, preset
        assert peer.in_channels == (1 if preset == "fashion" else 3) and peer.img_resolution == 32

"""Latent DiffiT: parameter counts, the released state-dict layout, loading, guidance, embeddings."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from minidiffit.base.runtime import num_parameters
from minidiffit.latent import (GUIDANCE_PRESETS, LATENT_PRESETS, Guidance, LatentConfig, LatentDiffiT, default_guidance,
                               guidance_scale)
from minidiffit.tools.released import check_state_dict, config_from_state_dict, load_released, save_safetensors
from minidiffit.tmsa import timestep_embedding


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(name, **overrides):
    with torch.device("meta"):
        return LatentDiffiT(dataclasses.replace(LATENT_PRESETS[name], **overrides))


def tiny_model(seed=0, **overrides):
    """The tiny preset with every weight random (the zero-initialised output layer would hide bugs)."""
    torch.manual_seed(seed)
    model = LatentDiffiT(dataclasses.replace(LATENT_PRESETS["tiny"], **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.3)
    return model.eval()


def tiny_inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = LATENT_PRESETS["tiny"]
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return x, t, y


def expected_shapes(cfg):
    """The released layout (DESIGN.md Sec. 4), written out independently of the model code."""
    D, p, C, g = cfg.dim, cfg.patch_size, cfg.in_channels, cfg.input_size // cfg.patch_size
    hidden, out = int(D * cfg.mlp_ratio), p * p * 2 * C
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,), "pos_embed": (1, g * g, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, D),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.qkv_temb.weight": (3 * D, D), b + "attn.qkv_temb.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "attn.relative_position_bias_table": ((2 * g - 1) ** 2, cfg.num_heads),
            b + "attn.relative_position_index": (g * g, g * g),
            b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (D, hidden), b + "mlp.fc2.bias": (D,),
        })
    return shapes


def test_xl2_parameter_count_is_the_releases():
    model = meta_model("XL/2")
    assert num_parameters(model) == 561_035_232


@pytest.mark.parametrize("name", list(LATENT_PRESETS))
def test_parameter_count_matches_layout(name):
    model = meta_model(name)
    shapes = expected_shapes(model.cfg)
    trainable = {k: v for k, v in shapes.items() if k not in ("pos_embed",) and "relative_position_index" not in k}
    expected = sum(math.prod(s) for s in trainable.values())
    assert num_parameters(model) == expected


@pytest.mark.parametrize("input_size", [32, 64])
def test_xl2_state_dict_keys_and_shapes(input_size):
    model = meta_model("XL/2", input_size=input_size)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(model.cfg)
    assert got["pos_embed"] == ((1, 256, 1152) if input_size == 32 else (1, 1024, 1152))


def test_strict_loading_of_our_own_xl2_on_meta():
    saved = meta_model("XL/2").state_dict()
    model = meta_model("XL/2")
    check_state_dict(model, saved)
    result = model.load_state_dict(saved, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert config_from_state_dict(saved) == LATENT_PRESETS["XL/2"]
    assert config_from_state_dict(meta_model("XL/2", input_size=64).state_dict()).input_size == 64


def test_safetensors_round_trip_through_load_released(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model, path)
    loaded = load_released(path)
    assert loaded.cfg == model.cfg
    assert not loaded.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "pos_embed")
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x, t, y = tiny_inputs()
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_mismatch_error_names_the_keys(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    sd["blocks.0.attn.qkv_extra.weight"] = sd.pop("blocks.0.attn.qkv_temb.weight")
    sd["pos_embed"] = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError) as err:
        check_state_dict(model, sd)
    msg = str(err.value)
    assert "blocks.0.attn.qkv_temb.weight" in msg and "blocks.0.attn.qkv_extra.weight" in msg
    assert "pos_embed" in msg and "(1, 16, 64)" in msg and "(1, 4, 64)" in msg
    # The same error through the file loader, given an explicit model of another size.
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model, path)
    other = LatentDiffiT(dataclasses.replace(LATENT_PRESETS["tiny"], depth=3))
    with pytest.raises(ValueError, match="blocks.2.attn"):
        load_released(path, model=other)


def reference_forward(model, x, t, y):
    """The release's computation on tokens, written out with explicit loops over the layout."""
    cfg, sd = model.cfg, model.state_dict()
    B, C, H, W = x.shape
    p, D, h = cfg.patch_size, cfg.dim, cfg.num_heads
    g = H // p
    # Patches in (c, dy, dx) order, tokens row-major: the conv as a matrix product.
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    tok = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    mlp0 = timestep_embedding(t) @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"]
    c = F.silu(mlp0) @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]
    c = c + sd["y_embedder.embedding_table.weight"][y]
    rows, cols = torch.arange(g * g) // g, torch.arange(g * g) % g
    rel = (rows[:, None] - rows[None] + g - 1) * (2 * g - 1) + (cols[:, None] - cols[None] + g - 1)
    for i in range(cfg.depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        a = F.layer_norm(tok, (D,), eps=1e-6)
        qkv = a @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
        qkv = qkv + (c @ w["attn.qkv_temb.weight"].T + w["attn.qkv_temb.bias"])[:, None]
        q, k, v = qkv.reshape(B, g * g, 3, h, D // h).permute(2, 0, 3, 1, 4)
        bias = w["attn.relative_position_bias_table"][rel].permute(2, 0, 1)  # (h, N, N)
        attn = ((q @ k.transpose(-1, -2)) / math.sqrt(D // h) + bias).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, g * g, D)
        tok = tok + out @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        m = F.gelu(F.layer_norm(tok, (D,), eps=1e-6) @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"], approximate="tanh")
        tok = tok + m @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
    f = F.silu(F.layer_norm(tok, (D,), eps=1e-6)) @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    Co = f.shape[-1] // (p * p)
    return f.reshape(B, g, g, p, p, Co).permute(0, 5, 1, 3, 2, 4).reshape(B, Co, g * p, g * p)


@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_reference(fused):
    model = tiny_model(fused=fused)
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, reference_forward(model, x, t, y), rtol=1e-4, atol=1e-4)


def test_pos_embed_is_fixed_2d_sincos():
    model = LatentDiffiT(LATENT_PRESETS["tiny"])
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in [n for n, p in model.named_parameters() if p.requires_grad]
    D, g = model.cfg.dim, model.grid_size
    ref = torch.zeros(g * g, D, dtype=torch.float64)
    for n in range(g * g):
        row, col = divmod(n, g)
        for i in range(D // 4):
            w = 10000 ** (-i / (D / 4))
            ref[n, i], ref[n, D // 4 + i] = math.sin(col * w), math.cos(col * w)  # first half: the column
            ref[n, D // 2 + i], ref[n, 3 * D // 4 + i] = math.sin(row * w), math.cos(row * w)
    torch.testing.assert_close(model.pos_embed[0], ref.float())


def test_init_as_released():
    model = LatentDiffiT(LATENT_PRESETS["tiny"])
    assert (model.final_layer.linear.weight == 0).all() and (model.final_layer.linear.bias == 0).all()
    assert (model.blocks[0].attn.qkv_temb.bias == 0).all()
    x, t, y = tiny_inputs()
    assert (model(x, t, y) == 0).all()  # zero output layer: the untrained model predicts eps = 0, v = 0


def test_label_dropout_rate_and_force_drop():
    model = tiny_model().train()
    emb, null = model.y_embedder, model.y_embedder.embedding_table.weight[-1]
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    out = emb(y, generator=torch.Generator().manual_seed(1))
    dropped = (out == null).all(dim=1).float().mean().item()
    assert abs(dropped - 0.1) < 0.01  # binomial std 0.002
    model.eval()
    assert not (emb(y) == null).all(dim=1).any()  # no dropout at evaluation
    force = torch.arange(20000) % 2 == 0
    out = emb(y, force_drop=force)
    assert (out == null).all(dim=1).tolist() == force.tolist()


def test_guidance_schedule_values():
    g = GUIDANCE_PRESETS["256"]
    assert (g.scale, g.power) == (4.4, 4.0) and GUIDANCE_PRESETS["512"].scale == 1.49
    t = torch.tensor([0, 250, 500, 999, 1000])
    expected = [1 + 3.4 * (1 - math.cos(math.pi * (1 - s / 1000) ** 4)) / 2 for s in t.tolist()]
    torch.testing.assert_close(guidance_scale(g, t), torch.tensor(expected))
    assert guidance_scale(g, torch.tensor([0])).item() == pytest.approx(4.4)
    assert guidance_scale(g, torch.tensor([1000])).item() == pytest.approx(1.0)
    torch.testing.assert_close(guidance_scale(GUIDANCE_PRESETS["512"], t), torch.full((5,), 1.49))
    torch.testing.assert_close(guidance_scale(2.0, t), torch.full((5,), 2.0))
    with pytest.raises(ValueError, match="power-cosine"):
        guidance_scale(Guidance(schedule="linear"), t)


def test_guidance_channels():
    # The guided pass runs a doubled batch: equal to separate passes up to float32 reordering.
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model = tiny_model()
    x, t, y = tiny_inputs()
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    # Scale 1 is the conditional model.
    close(model.forward_with_cfg(x, t, y, 1.0), cond)
    close(model.forward_with_cfg(x, t, y, 1.0, channels=None), cond)
    # Released mode: channels 0..2 guided, 3..7 exactly the conditional output.
    for scale in (4.0, GUIDANCE_PRESETS["256"]):
        s = guidance_scale(scale, t).view(-1, 1, 1, 1)
        out = model.forward_with_cfg(x, t, y, scale)
        close(out[:, :3], uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]))
        close(out[:, 3:], cond[:, 3:])
    # All-channel mode: every eps channel guided, the variance channels conditional.
    out = model.forward_with_cfg(x, t, y, 4.0, channels=None)
    close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    close(out[:, 4:], cond[:, 4:])


def test_wrong_input_shape_is_explained():
    model = LatentDiffiT(LATENT_PRESETS["tiny"])
    with pytest.raises(ValueError, match="input_size"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        LatentDiffiT(LatentConfig(input_size=9, patch_size=2, dim=64, num_heads=2, depth=1))


def test_gradients_reach_every_trainable_parameter():
    model = tiny_model().train()
    x, t, y = tiny_inputs()
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_guidance_follows_the_release():
    assert default_guidance(LATENT_PRESETS["XL/2"]) is GUIDANCE_PRESETS["256"]
    assert default_guidance(dataclasses.replace(LATENT_PRESETS["XL/2"], input_size=64)) is GUIDANCE_PRESETS["512"]


def test_meta_then_to_empty_then_initialize_weights_is_whole():
    with torch.device("meta"):
        model = LatentDiffiT(LATENT_PRESETS["tiny"])
    model.to_empty(device="cpu")
    model.initialize_weights()
    fresh = LatentDiffiT(LATENT_PRESETS["tiny"])
    for name, tensor in fresh.state_dict().items():
        ours = model.state_dict()[name]
        if "relative_position_index" in name or name == "pos_embed" or name.startswith("final_layer"):
            assert torch.equal(ours, tensor), name  # constants and zeros
        else:
            assert torch.isfinite(ours).all() and ours.abs().max() < 10, name
    x, t, y = tiny_inputs()
    assert torch.isfinite(model(x, t, y)).all()


def test_fashion_preset():
    cfg = LATENT_PRESETS["fashion"]
    assert (cfg.input_size, cfg.in_channels, cfg.patch_size, cfg.num_classes) == (8, 4, 2, 10)  # 8x8x4, 16 tokens
    assert cfg.class_dropout_prob == 0.1 and cfg.learn_sigma
    # The release's rule knows 32 and 64; 8x8 latents get the 256 px schedule (the fashion run's constant 3 is a
    # sampling setting: latent_task.GUIDANCE, tests/test_latent_pipeline.py)
    assert default_guidance(cfg) is default_guidance(LATENT_PRESETS["tiny"]) is GUIDANCE_PRESETS["256"]
    torch.manual_seed(0)
    model = LatentDiffiT(cfg)
    assert model.y_embedder.embedding_table.weight.shape == (11, cfg.dim)  # 10 classes + the null row
    out = model.forward_with_cfg(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 9]), 3.0)
    assert out.shape == (2, 8, 8, 8)


@pytest.mark.parametrize("mode", ["bias", "mlp", "token", "adaln"])
def test_time_modes_build_the_latent_model(mode):
    """The ablation blocks (variants.py) in the latent model: other time parameters, the same skeleton, and
    adaLN-Zero's modulation zero after the xavier pass (DiT's init), so every block starts as the identity."""
    torch.manual_seed(0)
    model = LatentDiffiT(dataclasses.replace(LATENT_PRESETS["tiny"], time_mode=mode))
    tmsa = LatentDiffiT(LATENT_PRESETS["tiny"])
    outside = lambda m: {k for k in m.state_dict() if not k.startswith("blocks.")}  # noqa: E731
    assert outside(model) == outside(tmsa)
    assert all(type(b).time_mode == mode for b in model.blocks)
    x, t, y = tiny_inputs()
    assert model(x, t, y).shape == tmsa(x, t, y).shape
    if mode == "adaln":
        assert not any(b.adaLN_modulation[1].weight.any() for b in model.blocks)
        h = torch.randn(2, 4, 4, 64)
        torch.testing.assert_close(model.blocks[0](h, torch.randn(2, 64)), h, rtol=0, atol=0)

"""The VAE wrapper on a tiny random AutoencoderKL (no download): shapes, the 0.18215 scale, errors."""

import pytest
import torch

pytest.importorskip("diffusers", reason="the VAE needs the latent extra: pip install minidiffit[latent]")

from minidiffit.tools.vae import SD_VAE_SCALE, VAEConfig, load_vae, vae_shape  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return load_vae(VAEConfig(source="tiny"))


def test_tiny_vae_has_the_sd_layout(vae):
    cfg = vae.autoencoder.config
    # Same depth as SD's VAE (4 levels, 3 downsamplings -> 8x) and 4 latent channels; narrower and shallower.
    assert len(cfg.block_out_channels) == 4 and cfg.latent_channels == 4
    assert vae.scale == SD_VAE_SCALE == 0.18215


@pytest.mark.parametrize("size", [64, 256])
def test_encode_decode_shapes(vae, size):
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(images)
    assert z.shape == (1, 4, size // 8, size // 8)
    assert vae.decode(z).shape == (1, 3, size, size)


def test_scale_factor_is_applied(vae):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw = vae.autoencoder.encode(images).latent_dist
    torch.testing.assert_close(vae.encode(images, sample=False), raw.mean * SD_VAE_SCALE)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(vae.encode(images, generator=g1), raw.sample(generator=g2) * SD_VAE_SCALE)
    z = vae.encode(images, sample=False)
    torch.testing.assert_close(vae.decode(z), vae.autoencoder.decode(z / SD_VAE_SCALE).sample)


def test_tiny_vae_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = load_vae(VAEConfig(source="tiny")), load_vae(VAEConfig(source="tiny"))
    assert torch.equal(torch.rand(1), expected)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_minidiffit_vae_replaces_sds_vae_with_a_folder_or_the_tiny_one(vae, monkeypatch):
    """MINIDIFFIT_VAE has one meaning, read in one place (load_vae): what to load where SD's VAE is asked for."""
    monkeypatch.setenv("MINIDIFFIT_VAE", "tiny")
    for a, b in zip(load_vae(VAEConfig()).parameters(), vae.parameters()):  # SD's id -> the tiny random VAE
        assert torch.equal(a, b)
    from minidiffit.tools import latent_task

    cfg = latent_task.Config(preset="tiny")  # a run's VAE is named as it is; the variable acts only when loading
    assert latent_task.vae_source(cfg) == (VAEConfig().source, SD_VAE_SCALE)


def test_missing_local_vae_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFFIT_VAE", str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="MINIDIFFIT_VAE"):
        load_vae(VAEConfig())


def test_vae_tells_its_channels_and_downsampling(vae):
    assert (vae.image_channels, vae.latent_channels, vae.downsampling) == (3, 4, 8)
    assert vae_shape(vae=vae) == vae_shape(VAEConfig(source="tiny")) == (SD_VAE_SCALE, 3, 4, 8)
    assert vae_shape(VAEConfig()) == (SD_VAE_SCALE, 3, 4, 8)  # SD's, known without downloading it
    assert vae_shape(VAEConfig(scale=0.5))[0] == 0.5 and load_vae(VAEConfig(source="tiny", scale=0.5)).scale == 0.5
    assert vae_shape(vae=object()) == (SD_VAE_SCALE, 3, 4, 8)  # an encoder without the attributes: SD's shapes


def test_autoencoder_checkpoint_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFFIT_VAE", str(tmp_path))  # replaces Hugging Face ids, never a .pt path
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint.*python -m minidiffit autoencoder"):
        load_vae(VAEConfig(source=str(tmp_path / "ckpt.pt")))
    torch.save({"model": {}, "config": {"task": "edm"}, "step": 1}, tmp_path / "edm.pt")  # a diffusion run's
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"):
        load_vae(VAEConfig(source=str(tmp_path / "edm.pt")))
    torch.save({"model": {}, "config": {"kind": "autoencoder"}, "step": 1, "scale": None}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="no measured scale factor yet"):
        load_vae(VAEConfig(source=str(tmp_path / "half.pt")))

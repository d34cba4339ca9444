"""FID: the distance against closed forms and a direct scipy formula, streamed statistics, precision/recall on
constructed sets, our Inception against the TorchScript reference network, weight loading, and the CLI."""

import copy
import os
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from minidiffit import fid
from minidiffit.base import inception
from minidiffit.tools import evaluate
from minidiffit.base.data import to_uint8


def _random_stats(rng, d, n=None):
    """A mean and a well-conditioned random covariance (D, D)."""
    a = rng.normal(size=(d, n or 2 * d))
    return rng.normal(size=d), a @ a.T / a.shape[1] + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------
# Distance


def test_distance_of_a_set_to_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 32))
    mu, sigma = fid.feature_statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_distance_matches_direct_eigenvalue_formula():
    # Reference: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: sum of sqrt(eigvalsh).
    rng = np.random.default_rng(1)
    mu1, s1 = _random_stats(rng, 24)
    mu2, s2 = _random_stats(rng, 24)
    r1 = scipy.linalg.sqrtm(s1).real
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_distance_closed_form_diagonal_gaussians():
    # Diagonal covariances a, b: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_singular_product_retried_with_offset(monkeypatch):
    rng = np.random.default_rng(3)
    mu1, s1 = _random_stats(rng, 8)
    mu2, s2 = _random_stats(rng, 8)
    calls, real_sqrtm = [], scipy.linalg.sqrtm

    def sqrtm(m):  # the first call fails as sqrtm does on a singular product
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", sqrtm)
    with pytest.warns(UserWarning, match="singular"):
        d = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    offset = 1e-3 * np.eye(8)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    tr = np.trace(scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset)).real)
    assert d == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-10)


def test_imaginary_part_small_dropped_large_raises(monkeypatch):
    rng = np.random.default_rng(4)
    mu, s = _random_stats(rng, 6)
    root = scipy.linalg.sqrtm(s @ s).real
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: root + 1e-6j)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-6
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: root + 0.5j)
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(mu, s, mu, s)


def test_mismatched_statistics_raise():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="same feature network"):
        fid.frechet_distance(*_random_stats(rng, 4), *_random_stats(rng, 5))


# ----------------------------------------------------------------------------
# Statistics


def test_streamed_statistics_equal_whole_set():
    feats = np.random.default_rng(6).normal(loc=50.0, size=(1000, 20))  # large mean: tests the shifted sums
    stats = fid.FeatureStats()
    for chunk in np.split(feats, [1, 7, 300, 301, 640]):  # uneven batches, one of a single vector
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    assert stats.num == 1000 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
    mu_whole, sigma_whole = fid.feature_statistics(feats)
    np.testing.assert_allclose(mu, mu_whole, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_whole, rtol=1e-9, atol=1e-12)


def test_statistics_need_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_statistics(np.ones((1, 4)))


# ----------------------------------------------------------------------------
# Precision and recall


def _pr_brute_force(real, fake, k=3):
    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    precision = (cdist(fake, real, "sqeuclidean") <= radii(real)[None]).any(1).mean()
    recall = (cdist(real, fake, "sqeuclidean") <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_constructed_sets():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(100, 8))
    assert fid.precision_recall(a, a) == (1.0, 1.0)  # identical sets
    assert fid.precision_recall(a, a + 100.0) == (0.0, 0.0)  # disjoint, far apart
    # Fakes cover one of two far-apart real clusters: every fake is realistic, half the reals are missed.
    real = np.concatenate([a, rng.normal(size=(100, 8)) + 100.0])
    assert fid.precision_recall(real, a) == (1.0, 0.5)


def test_precision_recall_batched_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(300, 16)), rng.normal(loc=0.3, size=(250, 16)) * 1.2
    expected = _pr_brute_force(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both counts matter
    assert fid.precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)
    small = fid._rows
    monkeypatch.setattr(fid, "_rows", lambda n, m: small(n, m, budget=64 * m))  # 64-row blocks, a ragged last one
    assert fid.precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------
# Features: input formats and quantisation (with the tiny random network)


def test_features_input_layouts_and_quantisation():
    net = fid.get_network("tiny-random")
    g = torch.Generator().manual_seed(0)
    floats = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1  # a model's output in [-1, 1]
    u8 = to_uint8(floats)  # (N, 3, H, W)
    ref = fid.features(u8, net, batch_size=2)
    assert ref.shape == (5, net.feature_dim) and ref.dtype == np.float32
    same = dict(rtol=1e-5, atol=1e-6)  # float32 convolutions round differently for different batch sizes
    np.testing.assert_allclose(fid.features(floats, net), ref, **same)  # floats are quantised as PNGs would be
    np.testing.assert_allclose(fid.features(u8.permute(0, 2, 3, 1).numpy(), net), ref, **same)  # NHWC numpy
    np.testing.assert_allclose(fid.features([u8[:3], u8[3:]], net), ref, **same)  # an iterable of batches
    assert np.abs(fid.features(floats + 0.01, net) - ref).max() > 1e-3  # the check can see a change
    with pytest.raises(TypeError, match="uint8"):
        fid.features(u8.to(torch.int32), net)


def test_preprocess_resize_and_scale():
    img = torch.full((1, 3, 32, 32), 64, dtype=torch.uint8)
    x = inception.preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x, torch.full_like(x, (64 - 128) / 128))  # constant images stay constant
    ramp = torch.arange(32, dtype=torch.uint8).repeat(1, 3, 32, 1)  # (1, 3, 32, 32), value = column
    expected = torch.nn.functional.interpolate(ramp.float(), size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inception.preprocess(ramp), (expected - 128) / 128)


# ----------------------------------------------------------------------------
# The Inception network and its weights


def test_pytorch_fid_state_dict_loads(tmp_path):
    # pytorch-fid's file is torchvision's Inception3 state dict with a 1008-way `fc`; we keep all but `fc`.
    torch.manual_seed(0)
    state = inception.InceptionV3FID().state_dict()  # random conv weights; make the BN tensors random too
    state = {k: torch.rand_like(v) if ".bn." in k and v.is_floating_point() else v for k, v in state.items()}
    torch.save({**state, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, tmp_path / "w.pth")
    net = inception.load_inception(str(tmp_path / "w.pth"), fused=False)  # the weights as loaded, unfolded
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID Inception checkpoint"):
        inception.load_inception(str(tmp_path / "bad.pth"))


def test_offline_download_error_names_url_and_path_option(monkeypatch):
    monkeypatch.delenv("MINIDIFFIT_INCEPTION", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception()
    msg = str(err.value)
    assert inception.PYTORCH_FID_URL in msg and "path" in msg and "MINIDIFFIT_INCEPTION" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception.load_inception("/no/such/inception.pt")


def test_fused_inception_equals_readable():
    """fuse() folds each BatchNorm into its conv and switches to channels-last: the same features to rounding."""
    torch.manual_seed(0)
    net = inception.InceptionV3FID().eval()
    for m in net.modules():  # BatchNorm statistics far from the identity, so that a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        expected = net(x)
        fused = copy.deepcopy(net).fuse()
        got = fused(x)
    assert fused.channels_last and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_eager_inception_matches_torchscript():
    path = os.environ.get("MINIDIFFIT_INCEPTION")
    if not path or not inception._is_torchscript(path):
        pytest.skip("set MINIDIFFIT_INCEPTION to the TorchScript inception-2015-12-05 .pt file (.ci/run does, "
                    "from ../shared/data/weights) to compare our Inception with the reference network")
    scripted = torch.jit.load(path, map_location="cpu").eval()
    net = inception.load_inception(path)  # the fast path (fused); the readable one below
    with torch.no_grad():
        x = torch.randn(2, 3, 299, 299, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(inception.load_inception(path, fused=False)(x), scripted(x), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        expected = scripted(inception.preprocess(images))  # the reference takes preprocessed input
        x = torch.randn(1, 3, 299, 299, generator=g)  # and any input, not only upsampled 32 px images
        torch.testing.assert_close(net(x), scripted(x), rtol=1e-5, atol=1e-5)
    got = fid.features(images, net)
    assert got.shape == (1, 2048)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# The command line, end to end with the tiny network


def _write_pngs(folder, images):  # images uint8 (N, H, W, 3)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")


def test_cli_reference_and_evaluation_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(9)
    real = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-60, 60, size=real.shape), 0, 255).astype(np.uint8)
    _write_pngs(tmp_path / "real" / "class0", real)  # ImageFolder layout for --data=folder
    _write_pngs(tmp_path / "fake", fake)
    ref = tmp_path / "ref.npz"
    evaluate.main(["ref", "--data=folder", f"--data_dir={tmp_path / 'real'}", f"--out={ref}",
              "--network=tiny-random", "--save_features=true"])  # fmt: skip
    results = tmp_path / "results.txt"
    got = evaluate.main([f"--samples={tmp_path / 'fake'}", f"--ref={ref}", "--network=tiny-random", "--num=20",
                    f"--results={results}", "--tag=nfe=35"])  # fmt: skip
    out = capsys.readouterr().out
    net = fid.get_network("tiny-random")
    real_f, fake_f = fid.features(real, net), fid.features(fake[:20], net)
    expected = fid.frechet_distance(*fid.feature_statistics(fake_f), *fid.feature_statistics(real_f))
    assert got == pytest.approx(expected, rel=1e-5) and got > 0
    assert f"FID {got:.4f}" in out and "samples 20" in out and "NOT a real FID" in out and str(ref) in out
    p, r = fid.precision_recall(real_f, fake_f)
    assert f"precision {p:.4f}  recall {r:.4f}" in out
    line = results.read_text().splitlines()
    assert len(line) == 1 and f"FID {got:.4f}" in line[0] and line[0].endswith("nfe=35")
    for args, message in (([f"--ref={ref}", "--network=tiny-random", "--num=100"], "holds only 24"),
                          (["--sample_count=3"], "valid keys")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([f"--samples={tmp_path / 'fake'}"] + args)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_edm_and_adm_reference_formats(tmp_path, capsys):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    net = fid.get_network("tiny-random")
    mu, sigma = fid.feature_statistics(fid.features(images, net))
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # EDM: mu, sigma only
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3])  # ADM
    edm = evaluate.load_reference(tmp_path / "edm.npz")
    assert edm["images"] is None and np.array_equal(edm["mu"], mu)
    assert np.array_equal(evaluate.load_reference(tmp_path / "adm.npz")["images"], images)
    for ref in ("edm.npz", "adm.npz"):
        d = evaluate.main([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / ref}", "--network=tiny-random"])
        assert abs(d) < 1e-6  # the same images on both sides
    assert "precision 1.0000  recall 1.0000" in capsys.readouterr().out  # ADM's images give precision/recall
    np.savez(tmp_path / "bad.npz", means=mu)
    with pytest.raises(ValueError, match="expected `mu` and `sigma`"):
        evaluate.load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'wide.npz'}", "--network=tiny-random"])
    assert e.value.code == 2 and "same --network" in capsys.readouterr().err


def test_grey_images_are_scored_as_rgb_and_statistics_files_compare_directly(tmp_path, capsys):
    rng = np.random.default_rng(11)
    grey = rng.integers(0, 256, size=(12, 32, 32, 1), dtype=np.uint8)
    net = fid.get_network("tiny-random")
    rgb_feats = fid.features(np.repeat(grey, 3, axis=-1), net)  # what a grey PNG opened as RGB gives
    # the same pixels; float rounding differs with the memory layout (the RGB copy arrives NHWC-strided)
    assert torch.equal(fid.as_uint8_nchw(grey), fid.as_uint8_nchw(np.repeat(grey, 3, axis=-1)))
    np.testing.assert_allclose(fid.features(grey, net), rgb_feats, rtol=1e-5, atol=1e-6)  # NHWC with C = 1
    np.testing.assert_allclose(fid.features(torch.from_numpy(grey).permute(0, 3, 1, 2), net), rgb_feats, rtol=1e-5, atol=1e-6)
    # the floor's form: statistics against statistics, no images on either side
    other = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    a, b = fid.feature_statistics(rgb_feats), fid.feature_statistics(fid.features(other, net))
    evaluate.save_reference(tmp_path / "a.npz", *a, num=12)
    evaluate.save_reference(tmp_path / "b.npz", *b, num=12)
    got = evaluate.main([f"--samples={tmp_path / 'a.npz'}", f"--ref={tmp_path / 'b.npz'}", "--network=tiny-random"])
    assert got == pytest.approx(fid.frechet_distance(*a, *b), rel=1e-9) and got > 0
    assert "samples 12" in capsys.readouterr().out

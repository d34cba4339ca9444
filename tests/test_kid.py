"""KID (fid.kernel_inception_distance) against a direct computation, and the property it is used for: unbiased."""

import itertools

import numpy as np
import pytest

from minidiffit.fid import kernel_inception_distance, kid_subset


def direct_mmd2(x, y):
    """MMD^2 by its definition, pair by pair: mean k over distinct pairs within x, within y, minus twice across."""
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return within - 2 * across


def test_kid_subset_equals_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(7, 5))
    assert kid_subset(x, y) == pytest.approx(direct_mmd2(x, y), rel=1e-12)


def test_kid_is_the_mean_and_spread_of_its_subsets():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(40, 6)), rng.normal(0.5, 1.0, size=(30, 6))
    mean, std = kernel_inception_distance(real, fake, num_subsets=5, subset_size=8, seed=3)
    draw = np.random.default_rng(3)
    values = [direct_mmd2(real[draw.choice(40, 8, replace=False)], fake[draw.choice(30, 8, replace=False)]) for _ in range(5)]
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values), rel=1e-10)
    assert std > 0  # the subsets differ: at most half of the smaller set each
    assert kernel_inception_distance(real, fake, num_subsets=5, subset_size=1000, seed=3)[0] != mean  # m capped at 15


def test_kid_is_unbiased_where_the_plug_in_estimate_is_not():
    """Two samples of one distribution: KID averages to zero (within its standard error); the biased (V-statistic)
    estimate, the diagonal kept, is positive every time. A shifted distribution is far above both."""
    rng = np.random.default_rng(2)
    same, biased = [], []
    for _ in range(200):
        x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        same.append(kid_subset(x, y))
        k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se
    assert min(biased) > 0
    shifted = [kid_subset(rng.normal(size=(20, 8)), rng.normal(0.5, 1, size=(20, 8))) for _ in range(50)]
    assert np.mean(shifted) > 10 * se


def test_kid_needs_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        kernel_inception_distance(np.zeros((3, 4)), np.zeros((10, 4)))


def test_the_fid_command_prints_kid_beside_fid_and_in_the_results_line(tmp_path, capsys):
    """`python -m minidiffit fid` on samples against a reference with features: KID from the same features."""
    import re

    from minidiffit.base.data import load_dataset
    from minidiffit.fid import features, get_network
    from minidiffit.tools import evaluate

    ref = tmp_path / "ref.npz"
    evaluate.main(["ref", "--data=synthetic", f"--out={ref}", "--num=40", "--network=tiny-random", "--save_features=true"])
    images = load_dataset("synthetic", num=60, seed=7).images[20:60]  # (40, 3, 32, 32) uint8, other images
    np.savez(tmp_path / "s.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    results = tmp_path / "results.txt"
    capsys.readouterr()
    evaluate.main([f"--samples={tmp_path / 's.npz'}", f"--ref={ref}", "--network=tiny-random", f"--results={results}"])
    line = capsys.readouterr().out.splitlines()[0]
    kid, std = map(float, re.search(r"KID ([-\d.]+) \+- ([\d.]+)", line).groups())
    net = get_network("tiny-random")
    want = kernel_inception_distance(np.load(ref)["features"], features(images, net))
    assert (kid, std) == pytest.approx(want, abs=1e-5)
    assert "KID" in results.read_text()

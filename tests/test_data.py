"""Datasets: synthetic determinism, the image-folder reader against the pixels written, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffit.base import data
from minidiffit.base.data import folder_dataset, load_dataset, synthetic_dataset, to_float, to_uint8


def test_synthetic_is_deterministic_and_in_range():
    a, b = synthetic_dataset(num=20, seed=3), synthetic_dataset(num=20, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, synthetic_dataset(num=20, seed=4).images)
    x, y = a.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    torch.testing.assert_close(a[5][0], x[1], rtol=0, atol=0)
    assert a[5][1] == 5 and y.tolist() == [0, 5]


def test_uint8_float_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).min() == -1 and to_float(x).max() == 1


def _write_folder(root, sizes=((8, 8),) * 3):
    rng = np.random.default_rng(0)
    written = {}
    for k, (cls, size) in enumerate(zip(["cat", "ant", "cat"], sizes)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
        Image.fromarray(arr).save(root / cls / f"{k}.png")
        written[(cls, f"{k}.png")] = arr
    return written


def test_folder_dataset_reads_the_pixels_written(tmp_path):
    written = _write_folder(tmp_path)
    ds = folder_dataset(tmp_path)
    assert ds.classes == ["ant", "cat"] and len(ds) == 3
    # sorted: ant/1.png, cat/0.png, cat/2.png
    expected = [written[("ant", "1.png")], written[("cat", "0.png")], written[("cat", "2.png")]]
    assert torch.equal(ds.images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [0, 1, 1]
    # --data=cifar10 with a folder copy reads the folder (no download)
    assert torch.equal(load_dataset("cifar10", str(tmp_path)).images, ds.images)


def test_folder_sizes_must_match_or_be_resized(tmp_path):
    _write_folder(tmp_path, sizes=((8, 8), (8, 8), (12, 10)))
    with pytest.raises(ValueError, match="differ in size.*when a resolution is given"):
        folder_dataset(tmp_path)
    assert folder_dataset(tmp_path, resolution=8).images.shape == (3, 3, 8, 8)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data_dir="):
        load_dataset("folder", str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="1 subfolders but no images.*--data_dir="):
        load_dataset("folder", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs --data_dir"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10"):
        load_dataset("mnist")

    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="could not load or download cifar10.*--data_dir="):
        load_dataset("cifar10", str(tmp_path / "cache"))
    assert data.DEFAULT_CACHE.endswith("minidiffit")

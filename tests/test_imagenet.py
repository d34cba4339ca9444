"""ImageNet data: ADM's center crop against closed forms, the class-folder reader, prepare's shards and resume."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffit.base.data import center_crop
from minidiffit.tools.imagenet import ImageFolder, LatentShardDataset, PrepareConfig, main, make_synthetic_imagefolder, prepare
from minidiffit.tools.vae import LatentVAE, tiny_autoencoder



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------
# The crop


def _gradient(width, height, ax=0.1, ay=0.1, c=20.0):
    """uint8 RGB image of f(x, y) = ax x + ay y + c at pixel (x, y), and f itself."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    f = ax * xx + ay * yy + c
    return Image.fromarray(np.repeat(np.round(f)[..., None], 3, axis=2).astype(np.uint8)), f


def _centres(n_out, n_in):
    """Where output pixel centres of an n_in -> n_out resize sit in input pixel coordinates."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def test_crop_512_square_is_a_2x2_box_mean():
    # 512 >= 2 * 256: one box halving to 256 x 256, the bicubic step is then the identity.
    image, _ = _gradient(512, 512, ax=0.2, ay=0.25, c=3.0)
    pixels = np.asarray(image).astype(np.float64)
    crop = center_crop(image, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    # Independent computation: the mean of each 2x2 block. PIL resamples rows, then columns, rounding
    # (half up) to 8 bits in between, so the exact reference rounds twice; the plain mean is within 0.75.
    rows = np.floor(pixels.reshape(512, 256, 2, 3).mean(axis=2) + 0.5)
    expected = np.floor(rows.reshape(256, 2, 256, 3).mean(axis=1) + 0.5)
    np.testing.assert_array_equal(crop, expected)
    assert np.abs(crop - pixels.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))).max() <= 0.75


@pytest.mark.parametrize("width,height,chain_w,chain_h,left,top", [
    # 1200x900: one halving (900 >= 512, 450 < 512), then bicubic to short side 256: 600x450 -> 341x256.
    (1200, 900, [1200, 600, 341], [900, 450, 256], (341 - 256) // 2, 0),
    # 300x700 portrait: no halving, bicubic 300x700 -> 256x597, crop rows 170..425.
    (300, 700, [300, 256], [700, 597], 0, (597 - 256) // 2),
    # 200x160: smaller than the target, bicubic upsampling to 320x256.
    (200, 160, [200, 320], [160, 256], 32, 0),
])
def test_crop_of_a_linear_ramp_matches_closed_form(width, height, chain_w, chain_h, left, top):
    # A resize filter that is symmetric and sums to one maps a linear ramp to the ramp evaluated at the
    # output pixel's centre, so the expected crop is known in closed form away from the borders.
    image, _ = _gradient(width, height, ax=0.09, ay=0.11)
    crop = center_crop(image, 256).astype(np.float64)
    assert crop.shape == (256, 256, 3)
    x = np.arange(left, left + 256, dtype=np.float64)
    y = np.arange(top, top + 256, dtype=np.float64)
    for n_in, n_out in zip(chain_w[-2::-1], chain_w[:0:-1]):  # walk the chain back to the original pixels
        x = np.interp(x, np.arange(n_out), _centres(n_out, n_in))
    for n_in, n_out in zip(chain_h[-2::-1], chain_h[:0:-1]):
        y = np.interp(y, np.arange(n_out), _centres(n_out, n_in))
    expected = 0.09 * x[None, :] + 0.11 * y[:, None] + 20.0
    m = 4  # the filters' support at the image border is cut and renormalised: compare the inside only
    rows = slice(m, 256 - m) if top == 0 else slice(None)  # a cropped-away side has no border to skip
    cols = slice(m, 256 - m) if left == 0 else slice(None)
    inner = (rows, cols)
    assert np.abs(crop[..., 0][inner] - expected[inner]).max() < 1.5
    assert (crop[..., 0] == crop[..., 2]).all()


def test_crop_large_photo_uses_repeated_box_halving():
    # 2100x1100 at 256: 1100 >= 512 -> 1050x550, 550 >= 512 -> 525x275, then bicubic to 489x256.
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1100, 2100, 3), dtype=np.uint8))
    half = noise.resize((1050, 550), Image.BOX).resize((525, 275), Image.BOX)
    expected = np.asarray(half.resize((489, 256), Image.BICUBIC))[:, (489 - 256) // 2:][:, :256]
    np.testing.assert_array_equal(center_crop(noise, 256), expected)
    assert center_crop(noise.convert("L"), 128).shape == (128, 128)  # the crop keeps the mode (read_image converts)


# ----------------------------------------------------------------------------
# The class-folder reader


def test_imagefolder_labels_extensions_and_errors(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "train", num_classes=3, per_class=2, size=40)
    Image.new("RGB", (50, 40), (10, 200, 30)).save(root / "n00000001" / "extra.JPEG", format="JPEG")
    (root / "n00000002" / "notes.txt").write_text("not an image")
    data = ImageFolder(root, image_size=32, output="uint8")
    assert data.classes == ["n00000000", "n00000001", "n00000002"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert len(data) == 7
    pixels, label = data[4]  # n00000001's third file in sorted order: n00000001_1.png
    assert label == 1 and pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    assert data.paths[4].endswith("n00000001/n00000001_1.png")
    with Image.open(data.paths[4]) as image:
        np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), center_crop(image, 32))
    as_float, _ = ImageFolder(root, image_size=32)[4]
    torch.testing.assert_close(as_float, pixels.float() / 127.5 - 1)
    assert as_float.min() >= -1 and as_float.max() <= 1

    with pytest.raises(FileNotFoundError, match="does not exist.*train/n01440764") as error:
        ImageFolder(tmp_path / "nowhere")
    assert "--data_dir" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders.*one subfolder per class"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "empty" / "n01440764").mkdir()
    with pytest.raises(FileNotFoundError, match="1 subfolders but no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="output="):
        ImageFolder(root, output="int")


def test_synthetic_imagefolder_is_deterministic(tmp_path):
    a = make_synthetic_imagefolder(tmp_path / "a", num_classes=2, per_class=3, size=16, seed=1)
    b = make_synthetic_imagefolder(tmp_path / "b", num_classes=2, per_class=3, size=16, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ----------------------------------------------------------------------------
# prepare: sharded latents of both flips


class CountingVAE:
    """A LatentVAE's posterior mean (deterministic), counting the images encoded; `fail_after` calls, then a kill."""

    def __init__(self, encoder, fail_after=None):
        self.encoder, self.fail_after, self.calls, self.images = encoder, fail_after, 0, 0

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(x)
        return self.encoder.encode(x, sample=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 12 images at 48 px -> 32 px crops -> 4x4x4 latents; shards of 5 give 5, 5, 2 (a short last one).
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("data") / "train", num_classes=3, per_class=4, size=48)


@pytest.fixture(scope="module")
def encoder():
    return LatentVAE(tiny_autoencoder(seed=0)).eval()


def _cfg(folder, out, **changes):
    base = dict(data_dir=str(folder), out=str(out), image_size=32, vae="tiny", batch=2, shard_size=5, dtype="float32",
                sample_posterior=False, num_workers=0, device="cpu")
    return PrepareConfig(**{**base, **changes})


def _shards(out):
    return {p.name: torch.load(p, weights_only=True) for p in sorted(out.glob("shard_*.pt"))}


@pytest.fixture(scope="module")
def prepared(folder, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    vae = CountingVAE(encoder)
    manifest = prepare(_cfg(folder, out), vae=vae)
    assert vae.images == 2 * 12  # every image once, and once mirrored
    return out, manifest


def test_prepare_latents_equal_direct_encoding_of_both_flips(folder, encoder, prepared):
    out, manifest = prepared
    assert manifest["complete"] and json.loads((out / "manifest.json").read_text())["complete"]
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["num_images"] == 12 and manifest["num_classes"] == 3 and manifest["scale_factor"] == 0.18215
    assert manifest["latent_shape"] == [2, 4, 4, 4] and manifest["image_size"] == 32 and manifest["vae"] == "tiny"
    shards = _shards(out)
    latents = torch.cat([s["latents"] for s in shards.values()])  # (12, 2, 4, 4, 4)
    labels = torch.cat([s["labels"] for s in shards.values()])
    assert latents.shape == (12, 2, 4, 4, 4) and labels.dtype == torch.int64
    images = ImageFolder(folder, image_size=32)
    for i in range(12):
        x, y = images[i]
        assert labels[i] == y
        direct = encoder.encode(torch.stack([x, x.flip(-1)]), sample=False)  # (2, 4, 4, 4): as is, mirrored
        torch.testing.assert_close(latents[i], direct, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(latents[:, 0], latents[:, 1], atol=1e-3)  # the flips really differ


def test_prepare_float16_storage_and_seeded_posterior_samples(folder, encoder, prepared, tmp_path):
    out32, _ = prepared
    prepare(_cfg(folder, tmp_path / "half", dtype="float16"), vae=encoder)
    half, full = _shards(tmp_path / "half"), _shards(out32)
    for name in full:
        assert half[name]["latents"].dtype == torch.float16
        torch.testing.assert_close(half[name]["latents"], full[name]["latents"].half(), atol=2e-3, rtol=0)
    # Posterior samples: seeded per batch, so another run (here rank 1 of 2 alone) writes identical shards.
    state = torch.random.get_rng_state()
    prepare(_cfg(folder, tmp_path / "s1", sample_posterior=True), vae=encoder)
    prepare(_cfg(folder, tmp_path / "s2", sample_posterior=True), vae=encoder, rank=1, world_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # prepare leaves the caller's random state alone
    s1, s2 = _shards(tmp_path / "s1"), _shards(tmp_path / "s2")
    assert list(s2) == ["shard_00001.pt"]
    torch.testing.assert_close(s1["shard_00001.pt"]["latents"], s2["shard_00001.pt"]["latents"], atol=0, rtol=0)
    for name in full:
        assert (s1[name]["latents"] - full[name]["latents"]).abs().max() > 1e-3  # a sample, not the mean


def test_prepare_resumes_after_a_kill_and_skips_when_done(folder, encoder, prepared, tmp_path):
    out = tmp_path / "latents"
    killed = CountingVAE(encoder, fail_after=4)  # shard 0 takes 3 batches (2+2+1); dies in shard 1
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(folder, out), vae=killed)
    assert sorted(p.name for p in out.glob("shard_*.pt")) == ["shard_00000.pt"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    (out / "shard_00001.pt.tmp999").write_bytes(b"half a shard")  # what a kill inside torch.save leaves
    with pytest.raises(ValueError, match="incomplete|partly"):
        LatentShardDataset(out)

    resumed = CountingVAE(encoder)
    manifest = prepare(_cfg(folder, out), vae=resumed)
    assert manifest["complete"]
    assert resumed.images == 2 * (5 + 2)  # shards 1 and 2 only
    reference = _shards(prepared[0])
    for name, shard in _shards(out).items():
        torch.testing.assert_close(shard["latents"], reference[name]["latents"])

    again = CountingVAE(encoder)
    prepare(_cfg(folder, out), vae=again)
    assert again.calls == 0  # the manifest says done: nothing re-encoded

    with pytest.raises(ValueError, match="different settings.*image_size"):
        prepare(_cfg(folder, out, image_size=16), vae=encoder)


def test_prepare_ranks_write_disjoint_shards(folder, encoder, tmp_path):
    out = tmp_path / "latents"
    rank1 = CountingVAE(encoder)
    manifest = prepare(_cfg(folder, out), vae=rank1, rank=1, world_size=2)
    assert sorted(p.name for p in out.glob("shard_*.pt")) == ["shard_00001.pt"] and not manifest["complete"]
    assert rank1.images == 2 * 5
    rank0 = CountingVAE(encoder)
    manifest = prepare(_cfg(folder, out), vae=rank0, rank=0, world_size=2)
    assert rank0.images == 2 * (5 + 2) and manifest["complete"]  # shards 0 and 2; then rank 0 marks it done
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_prepare_takes_the_latent_shape_and_scale_from_the_vae(folder, tmp_path):
    """Our autoencoder (downsampling 4, its own scale) on 32 px crops: 4x8x8 latents, not SD's 4x4x4."""
    from minidiffit.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderVAE

    torch.manual_seed(0)
    rgb = AutoencoderVAE(Autoencoder(AutoencoderConfig(image_channels=3, channels=(8, 8, 8))).eval(), scale=0.7)
    manifest = prepare(_cfg(folder, tmp_path / "ae"), vae=rgb)
    assert manifest["latent_shape"] == [2, 4, 8, 8] and manifest["scale_factor"] == 0.7 and manifest["image_size"] == 32
    latents = torch.cat([s["latents"] for s in _shards(tmp_path / "ae").values()])  # (12, 2, 4, 8, 8)
    x, _ = ImageFolder(folder, image_size=32)[3]
    torch.testing.assert_close(latents[3], rgb.encode(torch.stack([x, x.flip(-1)]), sample=False), atol=1e-5, rtol=1e-4)
    # --num: the first images only, in the same shards
    manifest = prepare(_cfg(folder, tmp_path / "num", num=7), vae=rgb)
    assert manifest["num_images"] == 7 and [s["count"] for s in manifest["shards"]] == [5, 2]
    torch.testing.assert_close(_shards(tmp_path / "num")["shard_00000.pt"]["latents"], latents[:5], atol=0, rtol=0)
    with pytest.raises(ValueError, match="--num=13 but .* holds only 12 images"):
        prepare(_cfg(folder, tmp_path / "more", num=13), vae=rgb)
    gray = AutoencoderVAE(Autoencoder(AutoencoderConfig()).eval(), scale=1.0)  # Fashion-MNIST's: 1 channel
    with pytest.raises(ValueError, match="takes 1-channel images.*gives 3x32x32"):
        prepare(_cfg(folder, tmp_path / "gray"), vae=gray)
    assert not (tmp_path / "gray").exists()  # refused before anything is written


def test_prepare_config_checks_the_data_and_image_size():
    base = dict(data_dir="d", out="o")
    PrepareConfig(**base, data="fashion_mnist").validate()  # the default image_size: unused, accepted
    PrepareConfig(**base, vae="runs/ae/ckpt.pt", image_size=36).validate()  # an autoencoder's factor: checked by prepare
    for changes, message in [(dict(data="synthetic"), "--data=synthetic: choose folder, cifar10 or fashion_mnist"),
                             (dict(data="fashion_mnist", image_size=32), "applies to --data=folder only"),
                             (dict(image_size=36), "a positive multiple of 8"), (dict(num=-1), "--num >= 0")]:
        with pytest.raises(ValueError, match=message):
            PrepareConfig(**base, **changes).validate()


# ----------------------------------------------------------------------------
# The training dataset over the shards


def test_latent_shard_dataset(folder, prepared):
    out, _ = prepared
    stored = torch.cat([s["latents"] for s in _shards(out).values()])
    labels = ImageFolder(folder, image_size=32).labels.tolist()
    data = LatentShardDataset(out)
    assert len(data) == 12 and data.num_classes == 3
    torch.manual_seed(0)
    seen = set()
    for i in range(12):
        for _ in range(4):
            latent, label = data[i]
            assert latent.shape == (4, 4, 4) and latent.dtype == torch.float32 and label == labels[i]
            flip = [k for k in (0, 1) if torch.equal(latent, stored[i, k])]
            assert len(flip) == 1
            seen.add(flip[0])
    assert seen == {0, 1}  # both stored flips get served
    fixed = LatentShardDataset(out, random_flip=False)
    assert all(torch.equal(fixed[i][0], stored[i, 0]) for i in range(12))
    batch, y = next(iter(torch.utils.data.DataLoader(data, batch_size=12, shuffle=False)))
    assert batch.shape == (12, 4, 4, 4) and y.tolist() == labels
    with pytest.raises(IndexError):
        data[12]
    # The batched path train.py uses: same latents as item by item, both flips served, labels in order.
    order = torch.tensor([11, 0, 5, 3, 10, 7])
    x, y = fixed.get_batch(order)
    torch.testing.assert_close(x, stored[order, 0].float(), atol=0, rtol=0)
    assert y.dtype == torch.int64 and y.tolist() == [labels[i] for i in order]
    x, _ = data.get_batch(torch.arange(12).repeat(4))  # (48, 4, 4, 4)
    flips = [[k for k in (0, 1) if torch.equal(x[j], stored[j % 12, k])] for j in range(48)]
    assert all(len(f) == 1 for f in flips) and {f[0] for f in flips} == {0, 1}
    assert "12 latents 4x4x4, 3 classes" in repr(data)


def test_latent_shard_dataset_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="minidiffit imagenet prepare"):
        LatentShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        LatentShardDataset(tmp_path)
    # A manifest whose counts disagree with its shard list.
    src, _ = prepared
    manifest = json.loads((src / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "num_images": 13}))
    with pytest.raises(ValueError, match="corrupt.*num_images"):
        LatentShardDataset(tmp_path)
    # Shards missing, then a shard of the wrong shape.
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="3 shards that are missing"):
        LatentShardDataset(tmp_path)
    for name in ("shard_00000.pt", "shard_00001.pt"):
        os.link(src / name, tmp_path / name)
    torch.save({"latents": torch.zeros(2, 2, 4, 8, 8), "labels": torch.zeros(2, dtype=torch.long), "start": 10},
               tmp_path / "shard_00002.pt")
    data = LatentShardDataset(tmp_path)
    assert data[0][0].shape == (4, 4, 4)
    with pytest.raises(ValueError, match="manifest expects"):
        data[11]


def test_command_line(folder, tmp_path, capsys):
    main(["synthetic", f"--out={tmp_path / 'syn'}", "--num_classes=2", "--per_class=1", "--size=16"])
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 2
    args = ["prepare", f"--data_dir={folder}", f"--out={tmp_path / 'lat'}", "--vae=tiny", "--image_size=32",
            "--num_workers=0", "--device=cpu", "--batch=8"]
    main(args)
    assert "done: 12 images in 1 shards" in capsys.readouterr().out
    main(args)
    assert "already encoded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(args + ["--bach=4"])
    assert e.value.code == 2 and "unknown config key 'bach'" in capsys.readouterr().err


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    from minidiffit.base.runtime import atomic_write

    path = tmp_path / "manifest.json"
    path.write_text("old")

    def killed(f):  # writes half a file, then dies
        f.write(b"ha")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, killed)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

"""Image datasets for training: CIFAR-10 (torchvision download), a local image folder, a synthetic set.

Every dataset yields `(image, label)` with the image a float CHW tensor in [-1, 1] (EDM's data range,
EDM Sec. 5 / App. F.1), and keeps the whole set in memory as one uint8 (N, C, H, W) tensor, `.images`,
because CIFAR-10 is only 150 MB and the training loop then gathers a batch with one indexing op.
`load_dataset(name, root)` is the one entry point; `python -m minidiffit.train --data=... --data_dir=...`
calls it. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "minidiffit")  # torchvision download target
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def to_float(images):
    """uint8 images (..., C, H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images):
    """float images in [-1, 1] -> uint8 0..255, rounded as a saved PNG would be (FID depends on this step)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory image set: `.images` uint8 (N, C, H, W), `.labels` int64 (N,), `.classes` names."""

    def __init__(self, images, labels, classes=None, source=""):
        assert images.dtype == torch.uint8 and images.ndim == 4, f"want uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels.to(torch.int64)  # (N,)
        self.classes = list(classes) if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]
        self.source = source  # where the images came from, for logs

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i]), int(self.labels[i])

    def get_batch(self, indices):
        """indices (B,) -> (float images (B, C, H, W) in [-1, 1], labels (B,)); the training loop's fast path."""
        return to_float(self.images[indices]), self.labels[indices]

    def __repr__(self):
        N, C, H, W = self.images.shape
        return f"ImageDataset({N} images, {C}x{H}x{W}, {len(self.classes)} classes, from {self.source})"


# ----------------------------------------------------------------------------
# Synthetic: deterministic, learnable, no download (FAST mode and tests)


def synthetic_dataset(num=1024, resolution=32, seed=0):
    """Coloured discs on a two-colour gradient; image i depends only on (seed, i), label = i % 10.

    Choice: simple structure (smooth background + one sharp-edged disc) so that a tiny model's samples
    visibly improve within a few hundred steps on a CPU.
    """
    rng = np.random.default_rng(seed)
    colors = rng.uniform(0, 1, size=(num, 3, 3))  # background top, background bottom, disc colour
    centers = rng.uniform(0.25, 0.75, size=(num, 2)) * resolution
    radii = rng.uniform(0.12, 0.3, size=num) * resolution
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64) + 0.5
    t = (yy / resolution)[None, None]  # (1, 1, H, W) vertical ramp
    img = colors[:, 0, :, None, None] * (1 - t) + colors[:, 1, :, None, None] * t  # (N, 3, H, W)
    disc = ((yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2) < radii[:, None, None] ** 2
    img = np.where(disc[:, None], colors[:, 2, :, None, None], img)
    images = torch.from_numpy(np.round(img * 255).astype(np.uint8))
    return ImageDataset(images, torch.arange(num) % 10, source=f"synthetic(num={num}, seed={seed})")


# ----------------------------------------------------------------------------
# A local image folder, ImageFolder layout: root/<class name>/<image file>


def _folder_files(root):
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    return classes, files


def folder_dataset(root, resolution=None):
    """All images under root/<class>/ in memory; `resolution` center-crops and resizes them (else all must match)."""
    from PIL import Image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass --data_dir=<folder with one subfolder per class>, or --data=cifar10 to download CIFAR-10")
    classes, files = _folder_files(root)
    if not files:
        raise FileNotFoundError(
            f"no images under {root} (expected {root}/<class name>/<image>.png, as torchvision's ImageFolder reads it); "
            f"pass --data_dir=<such a folder>, or --data=cifar10 to download CIFAR-10")
    arrays = []
    for f, _ in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if resolution is not None and im.size != (resolution, resolution):
                s = min(im.size)  # center crop to a square, then resize (ADM/EDM dataset-tool style)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
            arrays.append(np.asarray(im))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images under {root} differ in size {sorted(sizes)[:3]}...; pass resolution=<pixels> to crop and resize them")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    labels = torch.tensor([c for _, c in files])
    return ImageDataset(images, labels, classes, source=str(root))


def looks_like_image_folder(root):
    """True when root has at least one class subfolder holding an image file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return False
    for d in root.iterdir():
        if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()):
            return True
    return False


# ----------------------------------------------------------------------------
# CIFAR-10 through torchvision (download on first use)


def cifar10_dataset(root=None, train=True, download=True):
    """CIFAR-10 training (or test) set. `root` may be an ImageFolder copy of it or torchvision's cache dir."""
    if root is not None and looks_like_image_folder(root):
        return folder_dataset(root)
    import torchvision

    root = Path(root or DEFAULT_CACHE).expanduser()
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except Exception as e:  # offline, blocked, or a corrupt partial download
        raise RuntimeError(
            f"could not load or download CIFAR-10 into {root} ({type(e).__name__}: {e}). Fix: download it on a machine "
            f"with internet (torchvision.datasets.CIFAR10(root, download=True)) and pass --data_dir=<that root>, "
            f"or pass --data_dir=<an image folder with one subfolder per class>") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageDataset(images, torch.tensor(ds.targets), ds.classes, source=f"torchvision CIFAR-10 in {root}")


DATASETS = ("cifar10", "folder", "synthetic")


def load_dataset(name, root=None, **kwargs):
    """name in DATASETS -> ImageDataset. kwargs go to the loader (num/seed for synthetic, resolution for folder)."""
    if name == "cifar10":
        return cifar10_dataset(root, **kwargs)
    if name == "folder":
        if root is None:
            raise ValueError("--data=folder needs --data_dir=<folder with one subfolder per class>")
        return folder_dataset(root, **kwargs)
    if name == "synthetic":
        return synthetic_dataset(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")

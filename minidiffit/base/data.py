"""Image datasets for training: CIFAR-10, Fashion-MNIST (torchvision), a local image folder, a synthetic set.

Every dataset yields `(image, label)` with the image a float CHW tensor in [-1, 1] (EDM's data range,
EDM Sec. 5 / App. F.1), and keeps the whole set in memory as one uint8 (N, C, H, W) tensor, `.images`,
because CIFAR-10 is only 150 MB and the training loop then gathers a batch with one indexing op.
`load_dataset(name, root)` is the one entry point; `python -m minidiffit train --data=... --data_dir=...`
calls it. The image-folder reader here (listing, decoding, cropping) is also the one ImageNet's latents
are made with (imagenet.py). Introduced in notebooks/05_train_cifar10.ipynb.
"""

import math
import os
from pathlib import Path

import numpy as np
import torch

from .runtime import atomic_write, fingerprint

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "minidiffit")  # torchvision download target
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")  # lower-cased: .JPEG counts


def to_float(images):
    """uint8 images (..., C, H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images, mode="round"):
    """float images in [-1, 1] -> uint8 0..255 as a saved PNG would be (FID depends on this step).

    mode "round": round((x + 1) * 127.5), ours and EDM's. "truncate": the fraction dropped, as a plain
    `.to(torch.uint8)` cast of (x + 1) * 127.5 does (the released-weights path; see sample.py).
    """
    x = (images.float() + 1) * 127.5
    if mode not in ("round", "truncate"):
        raise ValueError(f"quantisation {mode!r}: choose round or truncate")
    return (x.round() if mode == "round" else x.floor()).clamp(0, 255).to(torch.uint8)


def save_png(array, path):
    """uint8 (H, W, C) -> PNG, atomically (a killed sampler never leaves a half-written image)."""
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(f, format="PNG"))


def save_grid(images, path, nrow=None):
    """float images (N, C, H, W) in [-1, 1] -> one PNG grid (rounded to uint8 as saved samples are)."""
    x = to_uint8(images.cpu())  # (N, C, H, W)
    N, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    canvas = torch.zeros(C, math.ceil(N / nrow) * H, nrow * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    save_png(canvas.permute(1, 2, 0).numpy(), path)


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory image set: `.images` uint8 (N, C, H, W), `.labels` int64 (N,), `.classes` names."""

    def __init__(self, images, labels, classes=None, source=""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"want uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
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

    def fingerprint(self):
        """What a checkpoint records of its data: count, classes and a hash of every pixel and label."""
        return fingerprint(len(self), self.classes, [self.images.cpu().numpy().tobytes(), self.labels.cpu().numpy().tobytes()])

    def __repr__(self):
        N, C, H, W = self.images.shape
        return f"ImageDataset({N} images, {C}x{H}x{W}, {len(self.classes)} classes, from {self.source})"


# ----------------------------------------------------------------------------
# Synthetic: deterministic, learnable, no download (FAST mode and tests)


def synthetic_dataset(num=1024, resolution=32, seed=0, channels=3):
    """Coloured discs on a two-colour gradient; image i depends only on (seed, i), label = i % 10.

    Choice: simple structure (smooth background + one sharp-edged disc) so that a tiny model's samples
    visibly improve within a few hundred steps on a CPU. channels=1 keeps the first channel (gray).
    """
    rng = np.random.default_rng(seed)
    colors = rng.uniform(0, 1, size=(num, 3, 3))  # background top, background bottom, disc colour
    centers = rng.uniform(0.25, 0.75, size=(num, 2)) * resolution
    radii = rng.uniform(0.12, 0.3, size=num) * resolution
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64) + 0.5
    t = (yy / resolution)[None, None]  # (1, 1, H, W) vertical ramp
    img = colors[:, 0, :, None, None] * (1 - t) + colors[:, 1, :, None, None] * t  # (N, 3, H, W)
    disc = ((yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2) < radii[:, None, None] ** 2
    img = np.where(disc[:, None], colors[:, 2, :, None, None], img)[:, :channels]
    images = torch.from_numpy(np.round(img * 255).astype(np.uint8))
    return ImageDataset(images, torch.arange(num) % 10, source=f"synthetic(num={num}, seed={seed})")


# ----------------------------------------------------------------------------
# Image folders, ImageFolder layout: root/<class name>/<image file>. One reader, two crops.

LAYOUT_HINT = ("expected one subfolder per class holding image files, as torchvision's ImageFolder and ImageNet's "
               "train split (.../train/n01440764/n01440764_10026.JPEG): pass --data_dir=<that folder>")


def list_image_folder(root):
    """(classes, paths, labels) of root/<class>/<image>: classes are the sorted visible folder names -> 0..K-1,
    files sorted by class then name (a fixed order). Hidden folders and files (temporaries) are skipped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; {LAYOUT_HINT}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f.name for f in os.scandir(root / name)
                       if f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith("."))
        paths += [str(root / name / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        flat = any(f.name.lower().endswith(IMAGE_EXTENSIONS) for f in os.scandir(root))
        found = ("images directly in it, not in class subfolders (move them into root/<class>/)" if flat else
                 f"{len(classes)} subfolders but no images in them" if classes else "no class subfolders")
        raise FileNotFoundError(f"image folder {root} has {found}; {LAYOUT_HINT}")
    return classes, paths, labels


def center_crop(image, size):
    """PIL image -> (size, size, C) uint8 array, cropped the way ADM made its ImageNet reference batches.

    FID compares our samples with ADM's reference statistics, so training images must be cut the same
    way: a different resize filter shifts FID by more than the gaps between the models we compare.
    """
    from PIL import Image

    # 1. Halve with a box filter (each output pixel = mean of a 2x2 block) while the short side is at least
    #    twice the target: cheap on large photos and free of aliasing.
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    # 2. Bicubic resize so the short side is exactly `size`; the long side rounds to the nearest pixel.
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    # 3. Keep the central size x size square (offsets round down).
    top, left = (image.height - size) // 2, (image.width - size) // 2
    return np.asarray(image)[top:top + size, left:left + size]  # (size, size, C)


def read_image(path, size=None, mode="RGB"):
    """An image file -> uint8 (H, W, C) array, ADM-center-cropped to `size` when given and not already that size.
    A corrupt or truncated file is a one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size, size):
                return center_crop(image, size)
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
        raise ValueError(f"cannot read image {path} ({e}); it is corrupt or truncated: delete or replace it") from None


def folder_dataset(root, resolution=None):
    """All images under root/<class>/ in memory, RGB; `resolution` center-crops and resizes them (else all must match)."""
    root = Path(root).expanduser()
    classes, paths, labels = list_image_folder(root)
    arrays = [read_image(p, resolution) for p in paths]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images under {root} differ in size {sorted(sizes)[:3]}...; they are cropped to one size only "
                         f"when a resolution is given (the training task passes its preset's)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    return ImageDataset(images, torch.tensor(labels), classes, source=str(root))


def looks_like_image_folder(root):
    """True when root has at least one visible class subfolder holding an image file."""
    try:
        return bool(list_image_folder(root)[1])
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------
# torchvision's CIFAR-10 and Fashion-MNIST (downloaded on first use)


def _torchvision(name, root, train, download):
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    root = Path(root or DEFAULT_CACHE).expanduser()
    try:
        return cls(str(root), train=train, download=download), root
    except Exception as e:  # offline, blocked, or a corrupt partial download
        raise FileNotFoundError(
            f"could not load or download {name} into {root} ({type(e).__name__}: {str(e)[:100]}). Fix: download it on a "
            f"machine with internet (torchvision.datasets.{cls.__name__}(root, download=True)) and pass --data_dir=<that "
            f"root>, or pass --data_dir=<an image folder with one subfolder per class>") from None


def cifar10_dataset(root=None, train=True, download=True, resolution=None):
    """CIFAR-10 training (or test) set. `root` may be an ImageFolder copy of it or torchvision's cache dir."""
    if root is not None and looks_like_image_folder(root):
        return folder_dataset(root, resolution)
    if root is not None and Path(root).expanduser().is_dir() and any(
            f.name.lower().endswith(IMAGE_EXTENSIONS) for f in os.scandir(Path(root).expanduser())):
        list_image_folder(root)  # images but no class subfolders: say so, rather than download CIFAR-10 into it
    ds, root = _torchvision("cifar10", root, train, download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageDataset(images, torch.tensor(ds.targets), ds.classes, source=f"torchvision CIFAR-10 in {root}")


def fashion_mnist_dataset(root=None, train=True, download=True, resolution=None):
    """Fashion-MNIST (DESIGN.md Sec. 2b): 28x28 grayscale padded to 32x32 with the background (0 = -1 after
    scaling), so windows of 4 and the 32/16/8 stages divide evenly; 10 labelled classes."""
    ds, root = _torchvision("fashion_mnist", root, train, download)
    images = torch.nn.functional.pad(ds.data, (2, 2, 2, 2))[:, None]  # (N, 28, 28) -> (N, 1, 32, 32) uint8
    return ImageDataset(images.contiguous(), ds.targets, ds.classes, source=f"torchvision FashionMNIST in {root}")


DATASETS = ("cifar10", "fashion_mnist", "folder", "synthetic")


def load_dataset(name, root=None, **kwargs):
    """name in DATASETS -> ImageDataset. kwargs go to the loader (num/seed/channels for synthetic, resolution
    for folders, train for the torchvision sets)."""
    if name == "cifar10":
        return cifar10_dataset(root, **kwargs)
    if name == "fashion_mnist":
        return fashion_mnist_dataset(root, **kwargs)
    if name == "folder":
        if root is None:
            raise ValueError("--data=folder needs --data_dir=<folder with one subfolder per class>")
        return folder_dataset(root, **kwargs)
    if name == "synthetic":
        return synthetic_dataset(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")

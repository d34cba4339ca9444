"""ImageNet for the latent model: ADM's center crop, an ImageFolder reader, latents encoded once into shards.

DiffiT's ImageNet-256/512 results (DiffiT Sec. 4, App. I.2) train a latent model on Stable Diffusion VAE
latents, as DiT does. `prepare` encodes every image once (both horizontal flips) so training never runs
the VAE; `LatentShardDataset` serves those latents to the training loop. The laptop tier (DESIGN.md 2b): the
same on Fashion-MNIST with our autoencoder.py. Introduced in notebooks/09_imagenet256.ipynb. Command line:
    python -m minidiffit imagenet prepare --data_dir=IMAGENET/train --out=LATENTS [--vae=...] [--key=value]
    python -m minidiffit imagenet prepare --data=fashion_mnist --data_dir=ROOT --vae=runs/fashion/ae/ckpt.pt --out=LATENTS
    python -m minidiffit imagenet synthetic --out=DIR   (a tiny class-folder set for FAST runs and tests)
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..base.config import check, run_command
from ..base.data import list_image_folder, load_dataset, read_image, to_float
from ..base.runtime import atomic_write, barrier, fingerprint, init_process, progress_bar, select_device, write_json
from .vae import VAEConfig, load_vae, vae_shape

MANIFEST = "manifest.json"
FORMAT = "minidiffit-latents/1"  # bumped whenever the shard layout changes

# ----------------------------------------------------------------------------
# Class-folder images

class ImageFolder(torch.utils.data.Dataset):
    """Images in class subfolders -> (image (3, size, size), label). Classes are the sorted folder names -> 0..K-1.

    `output="float"` gives float32 in [-1, 1] (what the VAE takes), `"uint8"` the raw cropped pixels.
    Attributes: `classes` (folder names), `paths` and `labels` (numpy arrays, one entry per image).
    """

    def __init__(self, root, image_size=256, output="float"):
        if output not in ("float", "uint8"):
            raise ValueError(f"output={output!r}: choose 'float' (in [-1, 1]) or 'uint8'")
        self.root, self.image_size, self.output = Path(root), image_size, output
        self.classes, paths, labels = list_image_folder(root)  # sorted by class, then file name: a fixed order
        # numpy arrays rather than 1.28M Python strings: DataLoader workers that merely read Python objects
        # touch their reference counts and so copy the pages, once per worker.
        self.paths, self.labels = np.array(paths), np.array(labels, dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        pixels = torch.from_numpy(read_image(self.paths[i], self.image_size).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        if self.output == "float":
            pixels = to_float(pixels)  # (3, H, W) float32 in [-1, 1]
        return pixels, int(self.labels[i])


@dataclass
class SyntheticConfig:
    out: str = ""  # folder to write the class subfolders of PNGs into
    num_classes: int = 3  # class folders
    per_class: int = 4  # images per class
    size: int = 64  # image height (widths vary from size to 1.5 size)
    seed: int = 0  # numpy seed

    def validate(self):
        check(self.out, "synthetic needs --out=DIR")
        check(min(self.num_classes, self.per_class, self.size) > 0, "--num_classes, --per_class and --size must be > 0")


def make_synthetic_imagefolder(root, num_classes=3, per_class=4, size=64, seed=0):
    """Write a small deterministic class-folder set of PNGs (for FAST mode and tests); returns `root`.

    Each class has its own colour and stripe direction so a model can tell them apart; widths vary
    (size .. 1.5 size) so the crop has something to cut. File names follow ImageNet's pattern.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(40, 215, size=3)
        for i in range(per_class):
            width = size + (i % 3) * size // 4
            yy, xx = np.mgrid[0:size, 0:width]
            angle = np.pi * c / max(num_classes, 1)
            stripes = 40 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / (8 + i))
            pixels = colour + stripes[..., None] + rng.normal(0, 8, size=(size, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"n{c:08d}_{i}.png")
    return root


# ----------------------------------------------------------------------------
# prepare: encode the whole set once into sharded latents


@dataclass
class PrepareConfig:
    data: str = "folder"  # folder: class folders, ADM crop, RGB (ImageNet); or cifar10, fashion_mnist (train split, as data.py)
    data_dir: str = ""  # ImageFolder root (ImageNet: .../train with the 1000 n*/ class folders), or torchvision's root
    out: str = ""  # output folder for manifest.json and shard_00000.pt ...
    # A torchvision set is encoded at its stored size (the manifest's image_size): it takes only the default 256.
    image_size: int = 256  # ADM center crop size (--data=folder): 256 -> latents 4x32x32, 512 -> 4x64x64
    vae: str = "stabilityai/sd-vae-ft-ema"  # Hugging Face id, diffusers folder, "tiny" (random, tests), autoencoder ckpt.pt
    num: int = 0  # encode the first num images only (0 = all): small trials and tests
    batch: int = 64  # images per VAE call (each goes through twice: as is and flipped)
    shard_size: int = 2048  # images per shard file (2048 x 2 x 4x32x32 fp16 = 32 MiB at 256 px)
    dtype: str = "float16"  # float16 or float32. Choice: fp16 halves the disk (ImageNet-256: 21.0 GB, not 42.0)
    sample_posterior: bool = True  # store a posterior sample (True) or the posterior mean (False)
    seed: int = 0  # posterior samples are seeded per batch from (seed, first image index): reruns agree
    num_workers: int = 8  # DataLoader processes decoding and cropping JPEGs
    device: str = ""  # "" picks cuda:LOCAL_RANK when CUDA is available, else cpu

    def validate(self):
        check(self.data in ("folder", "cifar10", "fashion_mnist"), f"--data={self.data}: choose folder, cifar10 or fashion_mnist")
        check(self.data_dir and self.out, "prepare needs --data_dir=IMAGEFOLDER (or a torchvision root) and --out=LATENT_DIR")
        check(self.dtype in ("float16", "float32"), f"--dtype={self.dtype}: choose float16 or float32")
        check(self.image_size > 0 and (self.image_size % 8 == 0 or self.vae.endswith(".pt")),  # an autoencoder: see prepare
              f"--image_size={self.image_size}: a positive multiple of 8 (the VAE downsamples 8x)")
        check(self.data == "folder" or self.image_size == 256, f"--image_size={self.image_size}: {self.data} images are "
              "encoded at their stored size; --image_size applies to --data=folder only")
        check(min(self.batch, self.shard_size) > 0 and min(self.num_workers, self.num) >= 0,
              "--batch and --shard_size must be > 0, --num_workers and --num >= 0")


def _dataset(cfg):
    """(dataset of (uint8 (C, H, W), label), class names) of cfg.data: its first cfg.num images (0: all)."""
    if cfg.data == "folder":  # uint8 here too: 4x less to copy to the GPU
        data = images = ImageFolder(cfg.data_dir, cfg.image_size, output="uint8")
    else:  # in memory, uint8 (N, C, H, W)
        data = load_dataset(cfg.data, cfg.data_dir, train=True)
        images = torch.utils.data.TensorDataset(data.images, data.labels)
    if cfg.num > len(images):
        raise ValueError(f"--num={cfg.num} but {cfg.data_dir} holds only {len(images)} images; pass --num={len(images)} or fewer")
    return torch.utils.data.Subset(images, range(cfg.num or len(images))), data.classes


def _plan(cfg, n, classes, size, vae):
    """The manifest without its progress fields: what a resumed run must agree with. `vae`: vae.vae_shape's."""
    scale_factor, _, channels, down = vae  # (scale, image channels, latent channels, downsampling)
    shards = [{"file": f"shard_{s:05d}.pt", "start": start, "count": min(cfg.shard_size, n - start)}
              for s, start in enumerate(range(0, n, cfg.shard_size))]
    return {"format": FORMAT, "data": cfg.data, "num_images": n, "num_classes": len(classes), "classes": list(classes),
            "image_size": size, "latent_shape": [2, channels, size // down, size // down], "flips": ["none", "horizontal"],
            "dtype": cfg.dtype, "vae": cfg.vae, "scale_factor": scale_factor,
            "posterior": "sample" if cfg.sample_posterior else "mean", "seed": cfg.seed,
            "shard_size": cfg.shard_size, "shards": shards}


def _write_manifest(out, plan, complete):
    write_json(out / MANIFEST, {**plan, "complete": complete})


def read_manifest(out):
    """Load and sanity-check `out`/manifest.json; a clear error when it is missing or not ours."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out)!r}: make the latents first with "
                                f"`python -m minidiffit imagenet prepare --data_dir=IMAGENET/train --out={out}`")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        # Real checks, not asserts: `python -O` must not let a foreign manifest through.
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT!r}")
        if sum(s["count"] for s in shards) != manifest["num_images"]:
            raise ValueError("shard counts do not add up to num_images")
        if len(manifest["classes"]) != manifest["num_classes"]:
            raise ValueError("num_classes differs from the class list")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is corrupt or from another version ({error!r}); delete the folder and run "
                         "`python -m minidiffit imagenet prepare` again") from None
    return manifest


def prepare(cfg: PrepareConfig, vae=None, rank=0, world_size=1):
    """Encode `cfg.data_dir` into `cfg.out`; returns the manifest. Resumable and shardable over ranks.

    `vae`: a `vae.LatentVAE` (or AutoencoderVAE), or any object with `encode(x (B,3,H,W) in [-1,1]) -> (B,4,H/8,W/8)`
    scaled latents; loaded from `cfg.vae` (which the manifest records, with the scale) when None. Rank r writes
    shards s % world_size == r, skipping those on disk: a killed run restarts at its first missing shard.
    """
    out = Path(cfg.out)
    dataset, classes = _dataset(cfg)
    shape = vae_shape(VAEConfig(source=cfg.vae), vae)  # (scale, image channels, latent channels, downsampling)
    channels, size, _ = dataset[0][0].shape  # of the first image (C, H, W): all have it
    if channels != shape[1] or size % shape[3]:
        raise ValueError(f"the VAE {cfg.vae!r} takes {shape[1]}-channel images with sides divisible by {shape[3]}, "
                         f"but --data={cfg.data} gives {channels}x{size}x{size}; pick a VAE made for these images")
    plan = _plan(cfg, len(dataset), classes, size, shape)
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        changed = [k for k in plan if old.get(k) != plan[k]]
        if changed:
            raise ValueError(f"{out} holds latents made with different settings ({', '.join(changed)} differ); "
                             "use another --out or delete that folder")
        if old["complete"]:
            _log(rank, f"{out}: all {plan['num_images']} images already encoded, nothing to do")
            return old
    else:
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            _write_manifest(out, plan, complete=False)
    barrier()

    mine = range(rank, len(plan["shards"]), world_size)  # rank r owns shards r, r + world_size, ...
    todo = [s for s in mine if not (out / plan["shards"][s]["file"]).exists()]
    if todo:
        device = select_device(cfg.device)
        if vae is None:
            vae = load_vae(VAEConfig(source=cfg.vae), device)
        # A LatentVAE or AutoencoderVAE honours cfg.sample_posterior; any other encoder (tests) is called as encode(x).
        encode = functools.partial(vae.encode, sample=cfg.sample_posterior) if hasattr(vae, "scale") else vae.encode
        _log(rank, f"encoding {len(todo)} of this rank's {len(mine)} shards on {device} (the rest exist)")
        # Seeding per batch below must not leave the caller's random state changed.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _encode_shards(cfg, plan, todo, dataset, encode, device, out, rank)

    barrier()
    missing = [s["file"] for s in plan["shards"] if not (out / s["file"]).exists()]
    if rank == 0:
        if missing:  # only when ranks ran unsynchronised (no process group) and some have not finished
            _log(rank, f"{len(missing)} shards still missing (e.g. {missing[0]}); the manifest stays incomplete")
        else:
            _write_manifest(out, plan, complete=True)
            _log(rank, f"done: {plan['num_images']} images in {len(plan['shards'])} shards under {out}")
    return {**plan, "complete": not missing}


def _encode_shards(cfg, plan, todo, dataset, encode, device, out, rank):
    """Encode the shards numbered `todo`, each image as is and mirrored, writing each shard when it is full."""
    # Batches never straddle two shards, so a shard is written as soon as its last batch is encoded.
    batches = [(s, list(range(b, min(b + cfg.batch, shard["start"] + shard["count"]))))
               for s in todo for shard in [plan["shards"][s]]
               for b in range(shard["start"], shard["start"] + shard["count"], cfg.batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[b for _, b in batches], pin_memory=device.type == "cuda",
                                         num_workers=cfg.num_workers if cfg.data == "folder" else 0)  # else: in memory
    parts, bar = [], progress_bar(total=sum(len(b) for _, b in batches), desc="prepare", unit="img", enabled=rank == 0)
    for (s, indices), (x, y) in zip(batches, loader):
        x = to_float(x.to(device, non_blocking=True))  # (B, C, H, W) in [-1, 1]
        # Choice: store one posterior sample, as fast-DiT's feature extraction does (DiT, encoding on the
        # fly, drew a fresh one each step), seeded from the batch's first index so that a resumed or
        # multi-GPU run writes the same numbers. The SD VAE's posterior is narrow next to the spread of its
        # means, so one frozen sample loses little; --sample_posterior=false stores the mean instead.
        torch.manual_seed(cfg.seed * 10_000_019 + indices[0])
        # Choice: both horizontal flips are stored (DiT flips at random while training; fast-DiT keeps one
        # random flip per image, halving that augmentation); the dataset picks one of the two per item.
        z = encode(torch.cat([x, x.flip(-1)]))  # (2B, 4, h, w): the images, then their mirror images
        z = torch.stack(z.chunk(2), dim=1)  # (B, 2, 4, h, w): index 1 along dim 1 is the flipped image
        parts.append((z.to("cpu", getattr(torch, cfg.dtype)), y))
        shard = plan["shards"][s]
        if indices[-1] == shard["start"] + shard["count"] - 1:  # last batch of shard s: write it
            latents, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).long()
            record = {"latents": latents, "labels": labels, "start": shard["start"]}
            atomic_write(out / shard["file"], lambda f: torch.save(record, f))
            parts = []
            with bar.external_write_mode():  # the line goes above the bar
                _log(rank, f"wrote {shard['file']} ({shard['count']} images)", every_rank=True)
        bar.update(len(indices))
    bar.close()


def _log(rank, text, every_rank=False):
    if rank == 0 or every_rank:
        print(f"[imagenet rank {rank}] {text}", flush=True)


# ----------------------------------------------------------------------------
# Training data: the stored latents


class LatentShardDataset(torch.utils.data.Dataset):
    """The latents `prepare` wrote -> (latent (4, h, w) float32, label), one of the two stored flips at random.

    Shards are opened lazily with torch.load(mmap=True): the operating system pages in what is read, so
    ImageNet's 21 GB of latents need not fit in memory, and DataLoader workers share the page cache.
    """

    def __init__(self, root, random_flip=True):
        self.root, self.random_flip = Path(root), random_flip
        self.manifest = read_manifest(self.root)
        if not self.manifest["complete"]:
            raise ValueError(f"{self.root} is only partly encoded; rerun the same `python -m minidiffit imagenet "
                             "prepare` command to finish it")
        missing = [s["file"] for s in self.manifest["shards"] if not (self.root / s["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.root}: manifest lists {len(missing)} shards that are missing "
                                    f"(e.g. {missing[0]}); delete {MANIFEST} and rerun prepare to rebuild them")
        self.shard_size = self.manifest["shard_size"]
        self.num_classes = self.manifest["num_classes"]
        self._shards = {}  # shard number -> (latents, labels), opened on first use

    def __len__(self):
        return self.manifest["num_images"]

    def _shard(self, s):
        if s not in self._shards:
            info = self.manifest["shards"][s]
            path = self.root / info["file"]
            try:
                record = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                latents, labels = record["latents"], record["labels"]
            except Exception as error:
                raise ValueError(f"{path} is unreadable ({error}); delete it and rerun prepare to rebuild it") from None
            expected = (info["count"], *self.manifest["latent_shape"])
            found = (tuple(latents.shape), tuple(labels.shape), record["start"])
            if found != (expected, (info["count"],), info["start"]):
                raise ValueError(f"{path} holds latents {tuple(latents.shape)} from image {record['start']}, but the "
                                 f"manifest expects {expected} from image {info['start']}; delete it and rerun prepare")
            self._shards[s] = (latents, labels)
        return self._shards[s]

    def __repr__(self):
        shape = "x".join(map(str, self.manifest["latent_shape"][1:]))
        return f"LatentShardDataset({len(self)} latents {shape}, {self.num_classes} classes, {self.root})"

    def fingerprint(self):
        """What a checkpoint records of its data: the count, the classes, and a hash of the manifest's plan
        (shards, VAE, scale, crop, seed): other latents of the same images are other data."""
        plan = {k: v for k, v in self.manifest.items() if k != "complete"}
        return fingerprint(len(self), self.manifest["classes"], json.dumps(plan, sort_keys=True))

    def get_batch(self, indices):
        """(B,) indices -> (latents (B, 4, h, w) float32, labels (B,) int64): train.py's batched path.

        The flip of each item is drawn from torch's global generator, which the training loop seeds per
        micro-batch before calling this, so flips too are a function of (seed, step, micro-batch)."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < len(self)):
            raise IndexError(f"indices out of range for {len(self)} latents")
        flips = torch.randint(2, indices.shape) if self.random_flip else torch.zeros_like(indices)  # (B,)
        x = torch.empty(len(indices), *self.manifest["latent_shape"][1:])  # (B, 4, h, w)
        y = torch.empty(len(indices), dtype=torch.long)
        shard_of = indices // self.shard_size
        for s in shard_of.unique().tolist():  # one gather per shard the batch touches
            rows = (shard_of == s).nonzero().squeeze(1)
            latents, labels = self._shard(s)
            x[rows] = latents[indices[rows] % self.shard_size, flips[rows]].float()
            y[rows] = labels[indices[rows] % self.shard_size]
        return x, y

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        latents, labels = self._shard(i // self.shard_size)
        flip = int(torch.randint(2, ())) if self.random_flip else 0
        latent = latents[i % self.shard_size, flip].to(torch.float32, copy=True)  # (4, h, w), not a view of the file
        return latent, int(labels[i % self.shard_size])


# ----------------------------------------------------------------------------
# Command line

@dataclass
class ReferenceConfig:
    data_dir: str = ""  # image folder with class subfolders
    out: str = ""  # npz to write
    image_size: int = 256  # ADM center crop size
    num: int = 0  # first num images (0 = all)

    def validate(self):
        check(self.data_dir and self.out, "reference needs --data_dir=IMAGEFOLDER and --out=REF.npz")
        check(self.num >= 0 and self.image_size > 0, "--num must be >= 0 and --image_size > 0")


def write_reference_batch(data_dir, out, image_size=256, num=0):
    """An ADM-style reference npz (`arr_0` uint8 N x H x W x 3, ADM's center crop) from an image folder.

    For FAST runs and tests, where ADM's ImageNet reference batch is out of reach; fid.py treats both alike.
    """
    folder = ImageFolder(data_dir, image_size, output="uint8")
    if num > len(folder):
        raise ValueError(f"--num={num} but {data_dir} holds only {len(folder)} images; pass --num={len(folder)} or fewer")
    n = num or len(folder)
    arr = np.stack([folder[i][0].permute(1, 2, 0).numpy() for i in range(n)])  # (N, H, W, 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: np.savez(f, arr_0=arr, arr_1=folder.labels[:n]))
    return out


def run_prepare(cfg):
    rank, world, _, _ = init_process()  # torchrun: one process per GPU, each encoding its own shards
    return prepare(cfg, rank=rank, world_size=world)


def run_synthetic(c):
    make_synthetic_imagefolder(c.out, c.num_classes, c.per_class, c.size, c.seed)
    print(f"wrote {c.num_classes * c.per_class} images in {c.num_classes} class folders under {c.out}")


def main(argv=None):
    reference = lambda c: print(f"wrote {write_reference_batch(c.data_dir, c.out, c.image_size, c.num)}")  # noqa: E731
    run_command("minidiffit imagenet", __doc__, {"prepare": (lambda a: PrepareConfig(), run_prepare),
                                                 "synthetic": (lambda a: SyntheticConfig(), run_synthetic),
                                                 "reference": (lambda a: ReferenceConfig(), reference)}, argv)


if __name__ == "__main__":
    main()

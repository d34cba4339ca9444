"""`python -m minidiffit fid`: FID, precision and recall of a folder or npz of samples against reference statistics.

The mathematics is in `minidiffit/fid.py` (features, statistics, Frechet distance, precision/recall); this module
reads and writes the files around it: reference statistics (ours, EDM's, ADM's reference batches), samples as a
folder of images or an npz, and one results line per evaluation. Introduced in notebooks/06_fid.ipynb.
"""

import dataclasses
import datetime
from pathlib import Path

import numpy as np

from ..base.config import check, run_command
from ..base.data import IMAGE_EXTENSIONS, load_dataset, read_image
from ..base.runtime import atomic_write, progress_bar, select_device
from ..fid import (FeatureStats, feature_statistics, features, frechet_distance, get_network,
                   kernel_inception_distance, precision_recall)


# ----------------------------------------------------------------------------
# Reference statistics files. Ours and EDM's hold `mu`, `sigma`; ADM's reference batches
# (e.g. VIRTUAL_imagenet256_labeled.npz) hold `mu`, `sigma` of the same pool features plus the images `arr_0`
# (and spatial-feature `mu_s`, `sigma_s` for sFID, which we ignore). Their mu/sigma were computed by the
# original TensorFlow code, whose resize to 299 differs slightly from ours: FIDs against them can differ
# from ADM's own evaluator in the first decimal.


def save_reference(path, mu, sigma, **meta):
    """Write {mu, sigma, meta...} (meta: num, network, data, optionally features) as an npz, no pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()}))


def _read_npz(path, what, names, hint=""):
    """(all keys, {name: array} for the `names` it holds) of an npz, or a one-line error naming the file when it
    is missing, empty, truncated, corrupt, pickled or not an npz at all."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} not found{hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return z.files, {k: z[k] for k in names if k in z.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, a bad CRC, pickled-data ValueError, OSError
        raise ValueError(f"{what} {path} is not a readable .npz ({type(e).__name__}: {str(e)[:100]}); it is corrupt, "
                         f"truncated or not an npz: make it again") from None


def load_reference(path):
    """Reference npz -> dict with mu, sigma (float64 or None), images (uint8 NHWC or None), features, num."""
    keys, z = _read_npz(path, "reference statistics", ("mu", "sigma", "arr_0", "features", "num"),
                        f"; build one with `python -m minidiffit fid ref --data=cifar10 --out={path}`")
    ref = {"mu": z["mu"].astype(np.float64) if "mu" in z else None,
           "sigma": z["sigma"].astype(np.float64) if "sigma" in z else None,
           "images": z.get("arr_0"),  # ADM's reference batch
           "features": z.get("features"),  # ours, with --save_features
           "num": int(z["num"]) if "num" in z else None}  # fmt: skip
    if (ref["mu"] is None) != (ref["sigma"] is None) or (ref["mu"] is None and ref["images"] is None):
        raise ValueError(f"{path} has keys {sorted(keys)}; expected `mu` and `sigma` (ours, EDM's) "
                         f"or `arr_0` images (ADM's reference batch)")
    return ref


# ----------------------------------------------------------------------------
# Reading samples: a folder of image files (sample.py's 00000.png ..., any depth) or an npz with `arr_0`.


def image_batches(path, batch_size=100, num=0):
    """(list of uint8 (B, 3, H, W) batches as a generator, number of images). num > 0 takes the first num."""
    path = Path(path)
    if path.suffix == ".npz":
        keys, z = _read_npz(path, "samples", ("arr_0",))
        if "arr_0" not in z:
            raise ValueError(f"{path} has keys {keys}; expected samples as `arr_0` uint8 (N, H, W, 3)")
        items = z["arr_0"]
        load = lambda chunk: chunk  # noqa: E731
    elif path.is_dir():
        # Skipped, never samples: hidden files (runtime.atomic_write's temporaries, editor or OS litter) and the
        # NAME.tmp.png temporaries that sample.py wrote before it used atomic_write.
        items = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
                       and not f.name.lower().endswith(".tmp" + f.suffix.lower()))

        def load(chunk):
            images = [read_image(f) for f in chunk]  # a corrupt file is a one-line error naming it
            if len({a.shape for a in images}) > 1:
                raise ValueError(f"images in {path} differ in size ({chunk[0].name} is {images[0].shape[:2]}); FID needs "
                                 f"one size: make all samples with one model and settings")
            return np.stack(images)
    else:
        raise FileNotFoundError(f"samples {path} is neither a folder of images nor an .npz file; "
                                f"make samples with `python -m minidiffit sample --ckpt=... --out={path}`")
    if num > len(items):
        raise ValueError(f"asked for --num={num} but {path} holds only {len(items)} images")
    n = num or len(items)
    if n == 0:
        raise ValueError(f"no images found in {path}")
    items = items[:n]  # so the last batch reads no file beyond the first n
    def batches():
        size = None  # every batch must have the first one's size, or FID would depend on where batches split
        for i in range(0, n, batch_size):
            batch = load(items[i : i + batch_size])
            size = size or batch.shape[1:]
            if batch.shape[1:] != size:
                raise ValueError(f"samples in {path} differ in size ({tuple(size)} and {tuple(batch.shape[1:])} from "
                                 f"image {i} on); FID needs one size: make all samples with one model and settings")
            yield batch

    return batches(), n


# ----------------------------------------------------------------------------
# Command line


@dataclasses.dataclass
class EvalConfig:
    samples: str = ""  # folder of image files (sorted by name), .npz with `arr_0` uint8 (N, H, W, C), or statistics (a `ref` npz)
    ref: str = ""  # reference npz: ours (from `ref`), EDM's (mu, sigma) or ADM's (mu, sigma, arr_0)
    num: int = 0  # use the first num samples (0 = all); printed beside the FID
    network: str = ""  # FID network file (.pt TorchScript or pytorch-fid .pth); "" = $MINIDIFFIT_INCEPTION or download; "tiny-random" = test net, NOT a real FID
    batch: int = 100  # images per network forward pass
    pr: bool = True  # also precision/recall (k=3) when the ref holds features or images
    kid: bool = True  # also KID (mean and std over subsets) when the ref holds features or images
    results: str = ""  # append one line (FID, samples, ref, network, tag) to this file
    tag: str = ""  # free text for the result line, e.g. "ckpt=runs/x/ckpt.pt nfe=35"
    device: str = ""  # "" = cuda when available, else cpu

    def validate(self):
        check(self.samples and self.ref, "evaluation needs --samples=DIR_OR_NPZ and --ref=REF.npz")
        check(self.num >= 0 and self.batch > 0, "--num must be >= 0 and --batch > 0")


@dataclasses.dataclass
class RefConfig:
    data: str = "cifar10"  # dataset for minidiffit.base.data.load_dataset: cifar10 | fashion_mnist | folder | synthetic
    data_dir: str = ""  # its root ("" = torchvision's download cache for cifar10 / fashion_mnist)
    split: str = "train"  # train or test (the torchvision sets; a folder has one split)
    out: str = ""  # where to write the npz {mu, sigma, num, network, data}
    num: int = 0  # use the first num images (0 = all; CIFAR-10 train has 50k)
    network: str = ""  # as for evaluation; the same network must be used for both sides
    batch: int = 100  # images per network forward pass
    save_features: bool = False  # also store the features (N, D) float32, for precision/recall (400 MB at 50k)
    device: str = ""  # "" = cuda when available, else cpu

    def validate(self):
        check(self.out, "ref needs --out=REF.npz")
        check(self.num >= 0 and self.batch > 0, "--num must be >= 0 and --batch > 0")
        check(self.split in ("train", "test"), f"--split={self.split}: choose train or test")


def _network(cfg):
    device = select_device(cfg.device)  # TF32 does not reach FID: features() runs the network in full float32
    return get_network(cfg.network, device=device), device


def build_reference(cfg):
    split = {"train": cfg.split == "train"} if cfg.data in ("cifar10", "fashion_mnist") else {}
    ds = load_dataset(cfg.data, root=cfg.data_dir or None, **split)
    images = ds.images[: cfg.num or None]  # (N, 3, H, W) uint8
    if cfg.num > len(ds.images):
        raise ValueError(f"asked for --num={cfg.num} but {cfg.data} has only {len(ds.images)} images")
    net, device = _network(cfg)
    feats = features(images, net, cfg.batch)
    mu, sigma = feature_statistics(feats)
    extra = {"features": feats} if cfg.save_features else {}
    save_reference(cfg.out, mu, sigma, num=len(feats), network=net.source, data=f"{cfg.data}:{ds.source}", **extra)
    print(f"wrote {cfg.out}: statistics of {len(feats)} images of {ds.source} ({cfg.data}), "
          f"network {net.source}, device {device}")


def evaluate(cfg):
    ref = load_reference(cfg.ref)
    net, device = _network(cfg)
    if cfg.samples.endswith(".npz") and "arr_0" not in _read_npz(cfg.samples, "samples", ())[0]:
        # statistics against statistics (e.g. the real-vs-real floor: `ref` of the train split vs the test split)
        other = load_reference(cfg.samples)
        mean_cov, n, fake = (other["mu"], other["sigma"]), other["num"], other["features"]
    else:
        batches, n = image_batches(cfg.samples, cfg.batch, cfg.num)
        stats, kept = FeatureStats(), []
        with progress_bar(total=n, desc="FID features", unit="img") as bar:
            for batch in batches:
                f = features(batch, net, cfg.batch, bar=False)
                stats.update(f)
                kept.append(f)
                bar.update(len(f))
        mean_cov, fake = stats.mean_cov(), np.concatenate(kept)
    if ref["mu"] is None or ((cfg.pr or cfg.kid) and ref["features"] is None and ref["images"] is not None):
        ref["features"] = features(ref["images"], net, cfg.batch)  # ADM's reference batch: its images
        if ref["mu"] is None:
            ref["mu"], ref["sigma"] = feature_statistics(ref["features"])
    if ref["mu"].shape != (net.feature_dim,):
        raise ValueError(f"{cfg.ref} holds {ref['mu'].shape[0]}-d statistics but the network {net.source} gives "
                         f"{net.feature_dim}-d features; build the reference with the same --network")
    fid = frechet_distance(*mean_cov, ref["mu"], ref["sigma"])
    line = f"FID {fid:.4f}"
    if cfg.kid and ref["features"] is not None and fake is not None:  # the same features, an unbiased distance
        kid, kid_std = kernel_inception_distance(ref["features"], fake)
        line += f"  KID {kid:.5f} +- {kid_std:.5f}"
    line += f"  samples {n} ({cfg.samples})  ref {cfg.ref}" + (f" ({ref['num']} images)" if ref["num"] else "")
    if cfg.pr and ref["features"] is not None and fake is not None:
        p, r = precision_recall(ref["features"], fake, device=device)
        line += f"  precision {p:.4f}  recall {r:.4f}"
    line += f"  network {Path(net.source).name if Path(net.source).is_file() else net.source}"  # no machine paths
    print(line + f"\ndevice {device}")
    if cfg.results:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(cfg.results, "a") as f:
            f.write(f"{stamp}  {line}" + (f"  {cfg.tag}" if cfg.tag else "") + "\n")
    return fid


def main(argv=None):
    doc = __doc__ + ("\n    python -m minidiffit fid --samples=DIR_OR_NPZ --ref=REF.npz [--num=N]   FID of samples"
                     "\n    python -m minidiffit fid ref --data=cifar10 --out=REF.npz            reference statistics"
                     "\nNetwork: --network=PATH or $MINIDIFFIT_INCEPTION, else pytorch-fid's weights are downloaded.")
    return run_command("minidiffit fid", doc, {"": (lambda a: EvalConfig(), evaluate),
                                              "ref": (lambda a: RefConfig(), build_reference)}, argv)


if __name__ == "__main__":
    main()

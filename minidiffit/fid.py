"""FID, precision and recall: Inception features -> Gaussian statistics -> Frechet distance.

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the
pool features of two image sets (DiffiT Sec. 5 reports it on 50k samples, as EDM and ADM do). Split as EDM
splits it: statistics (float64, streamed in batches) and distance (scipy's sqrtm, pytorch-fid's guards).
Precision/recall are Kynkaanniemi et al. 2019 (k = 3), as ADM's evaluator reports them. The network is in
inception.py. Introduced in notebooks/06_fid.ipynb; `python -m minidiffit.fid --help` for the CLI.
"""

import contextlib
import dataclasses
import datetime
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .config import check, run_command
from .data import IMAGE_EXTENSIONS, load_dataset, read_image, to_uint8
from .inception import InceptionV3FID, TinyFeatureNet, load_inception, preprocess
from .runtime import atomic_write

__all__ = ["InceptionV3FID", "load_inception", "get_network", "features", "FeatureStats", "feature_statistics",
           "frechet_distance", "precision_recall", "load_reference", "save_reference", "image_batches", "main"]

# ----------------------------------------------------------------------------
# Features. Quantisation: FID is defined on images as saved (uint8). A model's float output must be rounded
# to 0..255 exactly as a PNG writer would (`data.to_uint8`: round, clamp) before the network sees it;
# feeding floats directly measures a different distribution and shifts FID.


def get_network(name="", device="cpu"):
    """"tiny-random" -> TinyFeatureNet (tests, FAST notebooks; NOT a real FID); else load_inception(name or None)."""
    if name == "tiny-random":
        return TinyFeatureNet().to(device)
    return load_inception(name or None, device=device)


@contextlib.contextmanager
def _full_float32():
    """Turn off TF32 on CUDA while the network runs: FID is defined in float32 and TF32 convolutions move it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def as_uint8_nchw(images):
    """uint8 (N, H, W, C) or (N, C, H, W) array/tensor, or float (N, C, H, W) in [-1, 1], C = 3 or 1 ->
    uint8 (N, 3, H, W). Grayscale (C = 1) is replicated to RGB, as a grey PNG opened in RGB mode is
    (DESIGN.md 2b: Fashion-MNIST FIDs)."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (N, H, W, C) or (N, C, H, W), got shape {tuple(images.shape)}")
    if images.is_floating_point():
        if images.shape[1] not in (1, 3):
            raise ValueError(f"float images must be (N, 3 or 1, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        images = to_uint8(images)  # the quantisation step: as a saved PNG would be
    elif images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}")
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # NHWC (numpy / PNG convention) -> NCHW
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"need 3 (RGB) or 1 (grey) channels, got shape {tuple(images.shape)}")
    return images


@torch.no_grad()
def features(images, net, batch_size=100):
    """Network features of `images` (one array/tensor, see as_uint8_nchw, or an iterable of such batches).

    Returns float32 numpy (N, feature_dim). Runs on the network's device, in float32 (never bf16/TF32).
    """
    device = next(net.parameters()).device
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    out = []
    with _full_float32():
        for batch in images:
            x = as_uint8_nchw(batch).to(device)
            for i in range(0, len(x), batch_size):
                out.append(net(preprocess(x[i : i + batch_size], net.input_size)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.feature_dim), np.float32)


# ----------------------------------------------------------------------------
# Statistics, in float64: a 2048x2048 covariance summed over 50k images loses digits in float32, and the
# distance subtracts nearly equal traces, so FID's last digits would be noise.


class FeatureStats:
    """Streaming mean and covariance: `update` with batches of features, equal to the whole set's.

    Choice: sums are taken around a shift (the first batch's mean) so that sum(x x^T) - N mu mu^T does not
    cancel catastrophically when features have a large mean.
    """

    def __init__(self):
        self.num = 0
        self.shift = self.sum = self.sum_sq = None

    def update(self, feats):  # (B, D)
        x = np.asarray(feats, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.sum_sq = np.zeros((len(self.shift), len(self.shift)))
        x = x - self.shift
        self.num += len(x)
        self.sum += x.sum(axis=0)
        self.sum_sq += x.T @ x  # (D, D)

    def mean_cov(self):
        """(mu (D,), sigma (D, D)), float64; sigma with the unbiased 1/(N-1), as np.cov."""
        if self.num < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.num}")
        m = self.sum / self.num
        sigma = (self.sum_sq - self.num * np.outer(m, m)) / (self.num - 1)
        return self.shift + m, sigma


def feature_statistics(feats):
    """features (N, D) -> (mu (D,), sigma (D, D)) in float64: the Gaussian fit."""
    stats = FeatureStats()
    stats.update(feats)
    return stats.mean_cov()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)).

    sqrt(S1 S2) by scipy.linalg.sqrtm, as pytorch-fid/EDM/ADM. Two numerical guards (pytorch-fid's): a product
    so near singular that sqrtm returns inf/nan is retried with eps*I added to both covariances; a small
    imaginary part from round-off (the true root of a product of PSD matrices has real eigenvalues) is
    dropped, a large one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; were both computed with the same feature network?")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # with N < D samples the product is singular by construction; the
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # guards below handle it (pytorch-fid: disp=False)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
            offset = np.eye(len(mu1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its
# points, radius = distance to the k-th nearest neighbour in the same set. Precision = fraction of fake
# points inside the real manifold; recall = fraction of real points inside the fake manifold.
# As ADM's evaluator: squared Euclidean distances, k = 3, a point on a ball's boundary counts as inside.


def _sq_distances(a, b):  # (n, D), (m, D) -> (n, m), float64, clamped at 0 against round-off
    return (a.pow(2).sum(1)[:, None] - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def _rows(n, m, budget=10_000_000):  # rows per block so a (rows, m) float64 block stays ~80 MB
    return max(1, min(n, budget // max(m, 1)))


def _knn_radii(x, k):  # (N, D) -> (N,): squared distance to the k-th nearest other point
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    step = _rows(len(x), len(x))
    # kthvalue counts the point itself (distance 0) as the first: the k-th neighbour is the (k+1)-th value
    return torch.cat([_sq_distances(x[i : i + step], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), step)])


def _inside(points, centers, radii):  # (N,) bool: is each point within some center's ball?
    step = _rows(len(points), len(centers))
    return torch.cat([(_sq_distances(points[i : i + step], centers) <= radii[None]).any(1)
                      for i in range(0, len(points), step)])  # fmt: skip


def precision_recall(real_feats, fake_feats, k=3, device=None):
    """(precision, recall) of fake features against real ones, both (N, D); distances in float64, batched.

    device: where the distances are computed (None = cuda when available): 50k x 50k distances of 2048-d
    features are ~10^13 flops, GPU work; a few thousand points are fine on the CPU.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64, device=device)
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


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
                        f"; build one with `python -m minidiffit.fid ref --data=cifar10 --out={path}`")
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
                                f"make samples with `python -m minidiffit.sample --ckpt=... --out={path}`")
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
    results: str = ""  # append one line (FID, samples, ref, network, tag) to this file
    tag: str = ""  # free text for the result line, e.g. "ckpt=runs/x/ckpt.pt nfe=35"
    device: str = ""  # "" = cuda when available, else cpu

    def validate(self):
        check(self.samples and self.ref, "evaluation needs --samples=DIR_OR_NPZ and --ref=REF.npz")
        check(self.num >= 0 and self.batch > 0, "--num must be >= 0 and --batch > 0")


@dataclasses.dataclass
class RefConfig:
    data: str = "cifar10"  # dataset for minidiffit.data.load_dataset: cifar10 | fashion_mnist | folder | synthetic
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
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        for batch in batches:
            f = features(batch, net, cfg.batch)
            stats.update(f)
            kept.append(f)
        mean_cov, fake = stats.mean_cov(), np.concatenate(kept)
    if ref["mu"] is None or (cfg.pr and ref["features"] is None and ref["images"] is not None):
        ref["features"] = features(ref["images"], net, cfg.batch)  # ADM's reference batch: its images
        if ref["mu"] is None:
            ref["mu"], ref["sigma"] = feature_statistics(ref["features"])
    if ref["mu"].shape != (net.feature_dim,):
        raise ValueError(f"{cfg.ref} holds {ref['mu'].shape[0]}-d statistics but the network {net.source} gives "
                         f"{net.feature_dim}-d features; build the reference with the same --network")
    fid = frechet_distance(*mean_cov, ref["mu"], ref["sigma"])
    line = f"FID {fid:.4f}  samples {n} ({cfg.samples})  ref {cfg.ref}" + (f" ({ref['num']} images)" if ref["num"] else "")
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
    doc = __doc__ + ("\n    python -m minidiffit.fid --samples=DIR_OR_NPZ --ref=REF.npz [--num=N]   FID of samples"
                     "\n    python -m minidiffit.fid ref --data=cifar10 --out=REF.npz            reference statistics"
                     "\nNetwork: --network=PATH or $MINIDIFFIT_INCEPTION, else pytorch-fid's weights are downloaded.")
    return run_command("minidiffit.fid", doc, {"": (lambda a: EvalConfig(), evaluate),
                                              "ref": (lambda a: RefConfig(), build_reference)}, argv)


if __name__ == "__main__":
    main()

"""FID, KID, precision and recall: Inception features -> Gaussian statistics -> Frechet distance.

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the
pool features of two image sets (DiffiT Sec. 5 reports it on 50k samples, as EDM and ADM do). Split as EDM
splits it: statistics (float64, streamed in batches) and distance (scipy's sqrtm, pytorch-fid's guards).
KID (Binkowski et al. 2018) is an unbiased kernel distance on the same features, with a spread over subsets.
Precision/recall are Kynkaanniemi et al. 2019 (k = 3), as ADM's evaluator reports them. The network is in
inception.py. Introduced in notebooks/06_fid.ipynb; files and the command line
(`python -m minidiffit fid --help`) are in tools/evaluate.py.
"""

import contextlib
import warnings

import numpy as np
import scipy.linalg
import torch

from .base.data import to_uint8
from .base.inception import InceptionV3FID, TinyFeatureNet, load_inception, preprocess
from .base.runtime import progress_bar

__all__ = ["InceptionV3FID", "load_inception", "get_network", "features", "FeatureStats", "feature_statistics",
           "frechet_distance", "kernel_inception_distance", "precision_recall"]

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
def features(images, net, batch_size=100, bar=True):
    """Network features of `images` (one array/tensor, see as_uint8_nchw, or an iterable of such batches).

    Returns float32 numpy (N, feature_dim). Runs on the network's device, in float32 (never bf16/TF32).
    `bar`: a progress bar on a terminal (runtime.progress_bar); callers that feed batches one at a time keep their own.
    """
    device = next(net.parameters()).device
    # Choice: on a CPU the network sees at most 10 images at a time: Inception's activations at batch 100
    # (~0.5 GB per layer at 147 x 147) overflow the caches; 10 ran 1.4x the img/s of 100 on 2 cores
    # (benchmarks/fid_speed.py). Same features.
    step = batch_size if device.type == "cuda" else min(batch_size, 10)
    total = len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else None
    if total is not None:
        images = [images[i : i + batch_size] for i in range(0, total, batch_size)]
    out = []
    with _full_float32(), progress_bar(total=total, desc="FID features", unit="img", enabled=bar) as progress:
        for batch in images:
            x = as_uint8_nchw(batch).to(device)
            for i in range(0, len(x), step):
                out.append(net(preprocess(x[i : i + step], net.input_size)).float().cpu().numpy())
            progress.update(len(x))
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
# KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): the squared maximum mean discrepancy between the
# two feature sets under the cubic polynomial kernel k(x, y) = (x . y / D + 1)^3, estimated without bias (the
# diagonal of the within-set sums left out), so it is about zero for two samples of one distribution at any N;
# FID's estimate is biased upwards at small N. As StyleGAN2-ADA, clean-fid and torch-fidelity compute it: the
# mean over random subsets of m points per set, and their standard deviation, which says how far the number moves.


def kid_subset(x, y):
    """Unbiased MMD^2 of feature sets x, y (both (m, D), float64 numpy) under the cubic polynomial kernel."""
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3  # (m, m) each
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(real_feats, fake_feats, num_subsets=100, subset_size=1000, seed=0):
    """(mean, std) of KID over `num_subsets` random subsets of m points drawn from each set without replacement.

    m = min(subset_size, half the smaller set)."""
    real, fake = np.asarray(real_feats, dtype=np.float64), np.asarray(fake_feats, dtype=np.float64)
    # Choice: at most half of the smaller set per subset, so the subsets differ and their spread means something
    # (clean-fid and torch-fidelity take 1000, which at our N = 500 would be one subset, the whole set, 100 times).
    m = min(subset_size, min(len(real), len(fake)) // 2)
    if m < 2:
        raise ValueError(f"KID needs at least 4 points per set, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    values = [kid_subset(real[rng.choice(len(real), m, replace=False)], fake[rng.choice(len(fake), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))

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

"""FID's real-vs-real floor: CIFAR-10 training images against test images, N vs N, with the real network.

    .venv/bin/python benchmarks/fid_real_vs_real.py --npz=../shared/data/cifar10/cifar10_jpeg_q75.npz \
        --network=../shared/data/weights/inception-2015-12-05-fid.pt --num=1000 [--cache=runs/fid_floor]

Reads the development copy's npz layout (see ../shared/data/README.md: JPEG bytes + offsets, sorted by
class), so it takes random subsets (seed 0). Features are cached in --cache after every chunk, so a
killed run resumes and a larger --num reuses the smaller run's work. Prints FID at a few N up to --num:
FID is biased upwards at small N, so the number is a floor for this N only, never a published figure.
"""

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minidiffit.fid import feature_statistics, frechet_distance
from minidiffit.base.inception import load_inception, preprocess

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--npz", required=True, help="CIFAR-10 npz in the development copy's layout")
p.add_argument("--network", default=None, help="Inception file (TorchScript or pytorch-fid .pth); default: download")
p.add_argument("--num", type=int, default=1000, help="images per split")
p.add_argument("--cache", default="runs/fid_floor", help="folder for the cached features (train.npy, test.npy)")
args = p.parse_args()

z = np.load(args.npz)
rng = np.random.default_rng(0)  # the npz is sorted by class: random subsets, the same on every run
order = {"train": rng.permutation(len(z["train_y"])), "test": rng.permutation(len(z["test_y"]))}
cache = Path(args.cache)
cache.mkdir(parents=True, exist_ok=True)
feats = {s: list(np.load(cache / f"{s}.npy")) if (cache / f"{s}.npy").exists() else [] for s in order}


def decode(split, idx):
    buf, off = z[f"{split}_jpeg"], z[f"{split}_offsets"]
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in idx])


net = None
t0, chunk = time.time(), 50
for split in order:
    while len(feats[split]) < args.num:
        net = net or load_inception(args.network)
        start = len(feats[split])
        imgs = torch.from_numpy(decode(split, order[split][start:min(start + chunk, args.num)])).permute(0, 3, 1, 2)
        with torch.no_grad():
            feats[split].extend(net(preprocess(imgs)).numpy())  # (B, 2048)
        np.save(cache / f"{split}.npy", np.stack(feats[split]))
        print(f"{split}: {len(feats[split])}/{args.num} images, {time.time() - t0:.0f}s", flush=True)

a, b = np.stack(feats["train"][: args.num]), np.stack(feats["test"][: args.num])
for n in sorted({250, 500, args.num} & set(range(2, args.num + 1))):
    fid = frechet_distance(*feature_statistics(a[:n]), *feature_statistics(b[:n]))
    print(f"CIFAR-10 train vs test, {n} vs {n} images (random subsets, seed 0): FID {fid:.2f}")

"""recipe_recon.py CKPT OUT.npz DATA_DIR N: the autoencoder's reconstructions of the first N Fashion-MNIST test images,
saved as samples (arr_0, uint8 N x H x W x C) for `python -m minidiffit fid`: the floor of the latent route."""

import sys

import numpy as np
import torch

from minidiffit.autoencoder import load_autoencoder, reconstruct
from minidiffit.base.data import load_dataset

ckpt, out, data_dir, num = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, _ = load_autoencoder(ckpt)
images = load_dataset("fashion_mnist", root=data_dir or None, train=False).images[:num]  # (N, C, H, W) uint8
with torch.no_grad():
    recon = reconstruct(model, images)
np.savez(out, arr_0=recon.permute(0, 2, 3, 1).numpy())
print(f"wrote {out}: reconstructions of {len(recon)} test images")

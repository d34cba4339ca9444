"""Development only: unpack ../shared/data/cifar10/cifar10_jpeg_q75.npz into an ImageFolder of PNGs.

    .venv/bin/python .ci/unpack_cifar10.py [--npz=...] [--out=data/cifar10_train] [--split=train]

The package never reads ../shared; it reads the folder this writes (`--data=cifar10 --data_dir=<out>`).
The images are the mirror's quality-75 JPEGs decoded once (see ../shared/data/README.md): real
CIFAR-10, JPEG-degraded, so FIDs against them are not comparable with published numbers.
"""

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--npz", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/cifar10_jpeg_q75.npz"))
p.add_argument("--out", default="data/cifar10_train")
p.add_argument("--split", default="train", choices=["train", "test"])
a = p.parse_args()

z = np.load(a.npz)
buf, offsets, labels, names = z[f"{a.split}_jpeg"], z[f"{a.split}_offsets"], z[f"{a.split}_y"], z["label_names"]
out = Path(a.out)
done = out / ".complete"
if done.exists():
    print(f"{out} already unpacked")
    raise SystemExit
for n in names:
    (out / str(n)).mkdir(parents=True, exist_ok=True)
for i in range(len(labels)):
    im = Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
    im.save(out / str(names[labels[i]]) / f"{i:05d}.png")  # PNG: lossless from here on
done.write_text(f"{len(labels)} images\n")
print(f"wrote {len(labels)} PNGs under {out}")

"""Sample a trained run: N images from the EMA weights, image i from seed i (EDM's convention).

    python -m minidiffit.sample --ckpt=runs/x/ckpt.pt --num_samples=50000 --out=runs/x/samples --steps=18
    torchrun --nproc_per_node=8 -m minidiffit.sample --ckpt=... --num_samples=50000 --out=samples.npz
    torchrun --nproc_per_node=8 -m minidiffit.sample --weights=diffit_256.safetensors --steps=250 --out=samples.npz

--out is a directory (PNGs 00000.png ..., resumable: existing files are skipped), a .npz (`arr_0`
uint8 N x H x W x C, the layout FID tools read) or a .png (one grid). Ranks take strided indices.
The sampler is the training task's (EDM Heun, EDM Algorithm 1, for "edm"). Notebook 05 uses it.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import parse_overrides, run_command
from .data import to_float, to_uint8
from .train import build_from_checkpoint, get_task, init_process, save_grid


@dataclass
class SampleConfig:
    ckpt: str = ""  # checkpoint written by minidiffit.train (runs/x/ckpt.pt)
    # Not `num`: torchrun would take `--num=` for an abbreviation of its own `--numa-binding` and refuse it.
    num_samples: int = 50_000  # number of images; image i uses seed i
    out: str = "samples"  # a directory of PNGs, a .npz (arr_0 uint8 NHWC) or a .png grid
    steps: int = 0  # sampler steps; 0: the run's own (EDM Heun 18 = 35 network evaluations; latent 250 respaced)
    batch: int = 256  # images per forward pass on one rank
    ema: bool = True  # sample the EMA weights (as EDM and the paper evaluate); False: the raw weights
    weights: str = ""  # instead of --ckpt: released latent DiffiT weights (diffit_256.safetensors, nvidia/DiffiT)


def generate_images(model, cfg, indices, steps=18, batch=256):
    """float images (len(indices), C, H, W) in [-1, 1]; image i from seed indices[i] only, any batching."""
    task = get_task(cfg.task)
    chunks = []
    for start in range(0, len(indices), batch):
        seeds = torch.as_tensor(indices[start:start + batch], dtype=torch.int64)
        chunks.append(task.generate(model, seeds, cfg, steps).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def png_name(i):
    return f"{i:05d}.png"


def _part_path(out, rank, world):
    """Where rank `rank` of `world` leaves its images for rank 0 to merge into the .npz `out`."""
    return out.with_name(f"{out.name}.part{rank}of{world}.npy")


def sample(scfg, log=None):
    rank, world, device, log = init_process(log)
    out = Path(scfg.out)
    kind = "npz" if out.suffix == ".npz" else "grid" if out.suffix == ".png" else "dir"
    if kind == "grid" and world > 1:  # checked before loading and sampling, not after all the images are made
        raise ValueError("a .png grid is a single-process output; run without torchrun or use a directory/.npz")
    if scfg.weights:  # a released checkpoint: the latent task without a training run (latent_task.py)
        from .latent_task import released_model

        model, cfg = released_model(scfg.weights, device)
        source = f"released weights {scfg.weights}"
    elif not scfg.ckpt:
        raise ValueError("pass --ckpt=<runs/x/ckpt.pt> (or --weights=<released .safetensors>)")
    else:
        model, cfg, ckpt = build_from_checkpoint(scfg.ckpt, use_ema=scfg.ema, device=device)
        source = f"{'EMA' if scfg.ema else 'raw'} weights of {scfg.ckpt}, step {ckpt['step']}"
    steps = scfg.steps or cfg.sample_steps
    mine = list(range(rank, scfg.num_samples, world))  # strided: rank r makes images r, r + world, ...
    if kind == "dir":
        out.mkdir(parents=True, exist_ok=True)
        mine = [i for i in mine if not (out / png_name(i)).exists()]  # resume: skip what is there
    log(f"sampling {scfg.num_samples} images ({source}), "
        f"{steps} steps, batch {scfg.batch} x {world} ranks -> {out}")
    if kind == "dir" and rank == 0:
        log(f"  rank 0 has {len(mine)} images to make (existing PNGs are skipped)")
    chunks = []  # npz / grid: uint8 batches, so 50k ImageNet images stay ~10 GB rather than ~40 GB of floats
    for start in range(0, len(mine), scfg.batch):
        idx = mine[start:start + scfg.batch]
        x = to_uint8(generate_images(model, cfg, idx, steps, scfg.batch))  # (b, C, H, W) uint8
        if kind == "dir":
            for i, arr in zip(idx, x.permute(0, 2, 3, 1).numpy()):
                _save_png(arr, out / png_name(i))
        else:
            chunks.append(x)
        log(f"  {start + len(idx)}/{len(mine)} images on rank 0")
    if kind != "dir":
        # A rank with no images (--num_samples < ranks) saves an empty (0, 1, 1, 1) part; it broadcasts into the merge.
        x = torch.cat(chunks) if chunks else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)  # (n, C, H, W)
        if kind == "grid":
            save_grid(to_float(x), out)
        else:
            part = _part_path(out, rank, world)
            np.save(part, x.permute(0, 2, 3, 1).numpy())  # (n, H, W, C)
            if world > 1:
                dist.barrier()
            if rank == 0:
                parts = [_part_path(out, r, world) for r in range(world)]
                arrays = [np.load(p) for p in parts]
                arr = np.empty((scfg.num_samples,) + arrays[0].shape[1:], dtype=np.uint8)
                for r, a in enumerate(arrays):
                    arr[r::world] = a  # undo the striding: image i at row i
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".tmp.npz")
                # ADM's layout: class-conditional tasks also store each image's label as arr_1
                label_fn = getattr(get_task(cfg.task), "labels", None)
                extra = {"arr_1": np.asarray(label_fn(model, np.arange(scfg.num_samples), cfg))} if label_fn else {}
                np.savez(tmp, arr_0=arr, **extra)
                os.replace(tmp, out)
                for p in parts:
                    p.unlink()
    if world > 1:
        dist.barrier()
    log(f"wrote {out}")
    return out


def _save_png(arr, path):
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp.png")  # a killed run never leaves a half-written PNG behind
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp)
    os.replace(tmp, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_command("minidiffit.sample", __doc__, SampleConfig, lambda a: sample(parse_overrides(SampleConfig(), a)), argv)


if __name__ == "__main__":
    main()

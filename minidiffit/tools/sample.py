"""Sample a trained run: N images from the EMA weights, image i from seed i (EDM's convention).

    python -m minidiffit sample --ckpt=runs/x/ckpt.pt --num_samples=50000 --out=runs/x/samples --steps=18
    torchrun --nproc_per_node=8 -m minidiffit sample --ckpt=... --num_samples=50000 --out=samples.npz
    torchrun --nproc_per_node=8 -m minidiffit sample --weights=diffit_256.safetensors --steps=250 --out=samples.npz

--out is a directory (PNGs 00000.png ..., resumable: existing files are skipped; its `source.json` binds it
to the checkpoint and settings that made it, so another model cannot continue it), a .npz (`arr_0` uint8
N x H x W x C, the layout FID tools read) or a .png (one grid); an existing .npz or .png is replaced only
with --overwrite=true. Ranks take strided indices. The sampler is the training task's (EDM Heun, EDM
Algorithm 1, for "edm"; guided ancestral sampling for "latent") unless --sampler picks a faster one
(dpm++2m: DPM-Solver++(2M), one network evaluation per step). Introduced in notebooks/05_train_cifar10.ipynb.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..base.config import check, run_command
from ..base.data import save_grid, save_png, to_float, to_uint8
from ..base.runtime import atomic_write, barrier, init_process, progress_bar, write_json
from .tasks import build_from_checkpoint, get_task


@dataclass
class SampleConfig:
    ckpt: str = ""  # checkpoint written by minidiffit.train (runs/x/ckpt.pt)
    # Not `num`: torchrun would take `--num=` for an abbreviation of its own `--numa-binding` and refuse it.
    num_samples: int = 50_000  # number of images; image i uses seed i
    out: str = "samples"  # a directory of PNGs, a .npz (arr_0 uint8 NHWC) or a .png grid
    steps: int = 0  # sampler steps; 0: the run's own (EDM Heun 18 = 35 network evaluations; latent 250 respaced)
    sampler: str = ""  # "": the task's own; edm: heun, dpm++2m, euler, stochastic; latent: ancestral, ddim, dpm++2m
    batch: int = 256  # images per forward pass on one rank
    ema: bool = True  # sample the EMA weights (as EDM and the paper evaluate); False: the raw weights
    weights: str = ""  # instead of --ckpt: released latent DiffiT weights (diffit_256.safetensors, nvidia/DiffiT)
    # Choice: "" rounds (ours, EDM's) for a --ckpt and truncates for --weights, the cast the released
    # sample.py applies; half a grey level moves FID, so the released numbers are reproduced with theirs.
    quantize: str = ""  # float -> uint8: round, truncate, or "" (round; truncate for --weights)
    overwrite: bool = False  # replace an existing .npz / .png output (a PNG folder is resumed, never replaced)
    guidance: float = 0.0  # latent task: constant guidance scale (1 = none; 0: the run's, latent_task.run_guidance)
    nrow: int = 0  # .png grid: images per row (0 = square); 10 with 10 classes puts class c in column c

    def validate(self):
        check(bool(self.ckpt) != bool(self.weights), "pass one of --ckpt=<runs/x/ckpt.pt> or --weights=<released .safetensors>")
        check(self.num_samples > 0 and self.batch > 0 and self.steps >= 0, "--num_samples and --batch must be > 0, --steps >= 0")
        check(self.quantize in ("", "round", "truncate"), f"--quantize={self.quantize}: choose round or truncate")
        check(self.guidance == 0 or self.guidance >= 1, f"--guidance={self.guidance}: a scale >= 1 (1 = no guidance), or 0 for the default")
        check(Path(self.out).suffix.lower() in ("", ".npz", ".png"),
              f"--out={self.out}: write a folder (PNGs), a .npz or a .png grid")


def generate_images(model, cfg, indices, steps=18, batch=256, **options):
    """float images (len(indices), C, H, W) in [-1, 1]; image i from seed indices[i] only, any batching.
    `options` go to the task's generate (`sampler=`; the latent task's `guidance=`)."""
    task = get_task(cfg.task)
    chunks = []
    for start in range(0, len(indices), batch):
        seeds = torch.as_tensor(indices[start:start + batch], dtype=torch.int64)
        chunks.append(task.generate(model, seeds, cfg, steps, **options).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def png_name(i):
    return f"{i:05d}.png"


def _part_path(out, rank, world):
    """Where rank `rank` of `world` leaves its images for rank 0 to merge into the .npz `out`."""
    return out.with_name(f".{out.name}.part{rank}of{world}.npy")


def _bind_folder(out, source):
    """A PNG folder is continued only by the model and settings that began it (recorded in source.json)."""
    path = out / "source.json"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out={out} is a file; PNG samples go into a folder (or name a .npz or .png)")
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
            old = None
        if not isinstance(old, dict):
            raise ValueError(f"{path} is not a source record of minidiffit.tools.sample (corrupt, or another tool's); "
                             f"delete the folder {out} to start again, or pass another --out")
        if old != source:
            diff = ", ".join(f"{k}: {old.get(k)!r} there vs {source.get(k)!r} now" for k in source if old.get(k) != source[k])
            raise ValueError(f"{out} holds samples of another model or settings ({diff}); pass another --out, "
                             f"or delete the folder to start again")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, source)
    # PNG writes that a kill interrupted: runtime.atomic_write's hidden .NAME.PID.tmp, older versions' NAME.tmp.png
    for tmp in [*out.glob(".*.tmp"), *out.glob("*.tmp.png")]:
        tmp.unlink(missing_ok=True)


def sample(scfg, log=None):
    rank, world, device, log = init_process(log)
    out = Path(scfg.out)
    kind = {".npz": "npz", ".png": "grid"}.get(out.suffix.lower(), "dir")
    if kind == "grid" and world > 1:  # checked before loading and sampling, not after all the images are made
        raise ValueError("a .png grid is a single-process output; run without torchrun or use a directory/.npz")
    if kind != "dir" and out.exists() and not scfg.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite=true to replace it, or another --out")
    if scfg.weights:  # a released checkpoint: the latent task without a training run (latent_task.py)
        from .latent_task import released_model

        model, cfg = released_model(scfg.weights, device)
        source = {"weights": str(Path(scfg.weights).resolve())}
    else:
        model, cfg, ckpt = build_from_checkpoint(scfg.ckpt, use_ema=scfg.ema, device=device)
        source = {"ckpt": str(Path(scfg.ckpt).resolve()), "step": ckpt["step"], "ema": scfg.ema}
    steps = scfg.steps or cfg.sample_steps
    quantize = scfg.quantize or ("truncate" if scfg.weights else "round")
    options = {"guidance": scfg.guidance} if scfg.guidance else {}
    if options and cfg.task != "latent":
        raise ValueError(f"--guidance is the latent task's (class-conditional) setting; this is a {cfg.task!r} model")
    samplers = get_task(cfg.task).SAMPLERS
    if scfg.sampler and scfg.sampler not in samplers:
        raise ValueError(f"--sampler={scfg.sampler}: unknown for the {cfg.task!r} task; choose one of {', '.join(samplers)}")
    if scfg.sampler:
        options["sampler"] = scfg.sampler
    source.update(steps=steps, quantize=quantize, **options)
    mine = list(range(rank, scfg.num_samples, world))  # strided: rank r makes images r, r + world, ...
    if kind == "dir":
        if rank == 0:
            _bind_folder(out, source)
        barrier()
        mine = [i for i in mine if not (out / png_name(i)).exists()]  # resume: skip what is there
    log(f"sampling {scfg.num_samples} images ({source}), batch {scfg.batch} x {world} ranks -> {out}")
    if kind == "dir" and rank == 0:
        log(f"  rank 0 has {len(mine)} images to make (existing PNGs are skipped)")
    chunks = []  # npz / grid: uint8 batches, so 50k ImageNet images stay ~10 GB rather than ~40 GB of floats
    bar, done = progress_bar(total=len(mine), desc="sample", unit="img", enabled=rank == 0), 0
    try:
        for start in range(0, len(mine), scfg.batch):
            idx = mine[start:start + scfg.batch]
            x = to_uint8(generate_images(model, cfg, idx, steps, scfg.batch, **options), quantize)  # (b, C, H, W) uint8
            if kind == "dir":
                for i, arr in zip(idx, x.permute(0, 2, 3, 1).numpy()):
                    save_png(arr, out / png_name(i))
            else:
                chunks.append(x)
            done = start + len(idx)
            bar.update(len(idx))
            with bar.external_write_mode():
                log(f"  {done}/{len(mine)} images on rank 0")
    except KeyboardInterrupt:
        kept = ("its PNGs are kept: the same command makes the rest" if kind == "dir" else
                f"nothing was written to {out}: the same command starts again")
        raise KeyboardInterrupt(f"interrupted after {done} of {len(mine)} images; {kept}") from None
    finally:
        bar.close()
    if kind == "grid":
        save_grid(to_float(torch.cat(chunks)), out, nrow=scfg.nrow or None)
    elif kind == "npz":
        _write_npz(out, chunks, rank, world, scfg.num_samples, get_task(cfg.task), model, cfg)
    barrier()
    log(f"wrote {out}")
    return out


def _write_npz(out, chunks, rank, world, num, task, model, cfg):
    """Each rank leaves its (strided) images in a part file; rank 0 merges them into one npz, image i at row i."""
    # A rank with no images (--num_samples < ranks) saves an empty (0, 1, 1, 1) part; it broadcasts into the merge.
    x = torch.cat(chunks) if chunks else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)  # (n, C, H, W)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(out, rank, world)
    atomic_write(part, lambda f: np.save(f, x.permute(0, 2, 3, 1).numpy()))  # (n, H, W, C)
    if world > 1:
        dist.barrier()
    if rank == 0:
        parts = [_part_path(out, r, world) for r in range(world)]
        arrays = [np.load(p) for p in parts]
        arr = np.empty((num,) + arrays[0].shape[1:], dtype=np.uint8)
        for r, a in enumerate(arrays):
            arr[r::world] = a  # undo the striding: image i at row i
        # ADM's layout: class-conditional tasks also store each image's label as arr_1
        labels = getattr(task, "labels", None)
        extra = {"arr_1": np.asarray(labels(model, np.arange(num), cfg))} if labels else {}
        atomic_write(out, lambda f: np.savez(f, arr_0=arr, **extra))
        for p in parts:
            p.unlink()


def main(argv=None):
    run_command("minidiffit sample", __doc__, {"": (lambda a: SampleConfig(), sample)}, argv)


if __name__ == "__main__":
    main()

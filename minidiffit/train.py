"""The training loop: EDM's recipe for the image-space DiffiT (DiffiT Sec. 4.1, App. I.1; EDM App. F.1).

    python -m minidiffit.train --preset=small --data=cifar10 --out=runs/x [--key=value ...]
    torchrun --nproc_per_node=8 -m minidiffit.train --preset=cifar10 --data=cifar10 --out=runs/cifar10

One loop for every model: what differs between models (build it, its per-sample loss, how it samples)
sits in a `Task` in the `TASKS` table, keyed by `--task` (see "Adding a task" below). Adam with lr
warm-up, an EMA with EDM's half-life ramp, DDP through torchrun, atomic checkpoints and exact resume.
Introduced in notebooks/05_train_cifar10.ipynb.
"""

import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import parse_overrides, run_command
from .data import to_uint8


@dataclass
class TrainConfig:
    task: str = "edm"  # which entry of TASKS builds the model, computes the loss and samples
    preset: str = "small"  # model preset (UNET_PRESETS for "edm"): tiny, small, cifar10, ffhq64
    dropout: float | None = None  # overrides the preset's dropout when set (None: the preset's value)
    data: str = "cifar10"  # dataset: cifar10 (torchvision download or an image folder copy), folder, synthetic
    data_dir: str | None = None  # dataset root: an ImageFolder, or torchvision's cache (default ~/.cache/minidiffit)
    num_data: int = 1024  # size of the synthetic dataset (--data=synthetic only)
    out: str = "runs/train"  # run directory: ckpt.pt, metrics.jsonl, grid_*.png
    iters: int = 200_000  # optimizer steps to train for (DiffiT App. I.1: 200k on CIFAR-10)
    minutes: float = 0.0  # wall-clock budget summed over resumes; stops cleanly with a checkpoint (0 = none)
    batch: int = 512  # global batch, split across ranks and accumulation rounds (EDM CIFAR-10: 512)
    accum: int = 1  # gradient accumulation rounds per step (a smaller per-GPU batch, same step)
    lr: float = 1e-3  # Adam learning rate after warm-up (EDM CIFAR-10: 1e-3; FFHQ-64: 2e-4)
    betas: tuple = (0.9, 0.999)  # Adam betas (EDM)
    eps: float = 1e-8  # Adam epsilon (EDM)
    warmup_kimg: float = 10_000  # linear lr warm-up over this many thousand images (EDM: 10 Mimg)
    ema_halflife_kimg: float = 500  # EMA half-life in thousands of images (EDM: 0.5 Mimg)
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of the images seen so far (EDM; 0 = no ramp)
    augment_p: float = 0.12  # EDM non-leaky augmentation probability (CIFAR-10: 0.12; 0 = off)
    seed: int = 0  # seeds the model init, the data order and every batch's noise
    ckpt_every: int = 5000  # steps between checkpoints (one is also written at the end)
    log_every: int = 100  # steps between progress lines
    grid: int = 64  # images in the sample grid written with each checkpoint (0 = no grid)
    sample_steps: int = 18  # Heun steps for the grid (18 = 35 network evaluations, EDM CIFAR-10)
    bf16: bool = True  # bf16 autocast (CUDA only; CPU always trains in float32)
    compile: bool = True  # torch.compile the training model (CUDA only)


# Settings that may change when a run resumes: how long, how often, where, how fast. Every other field
# defines the run; a checkpoint made with a different value is refused (see check_resumable).
RESUMABLE_KEYS = ("out", "data_dir", "iters", "minutes", "accum", "ckpt_every", "log_every", "grid", "sample_steps", "bf16", "compile")


# ----------------------------------------------------------------------------
# Tasks: the model-specific parts. Adding a task ("latent", ...) adds a Task; the loop stays as it is.
#
#   build_model(cfg) -> nn.Module                 the module trained and averaged (EMA), on the CPU
#   loss(model, x, y, cfg) -> (B,)                per-sample loss on a batch; model may be DDP/compiled
#   generate(model, seeds, cfg, steps) -> (N,C,H,W) float in [-1, 1]; image i from seed seeds[i] only
#   load_data(cfg) -> dataset with get_batch(indices) -> (x, y) (or __getitem__ -> (x, y))
#   defaults: {field: value} TrainConfig defaults for this task (lr, batch, ...); the command line wins
#
# The loop seeds torch's global RNG per micro-batch before calling loss(), so a task draws its noise
# from the global RNG (no generator argument) and stays resumable and rank-count independent.
# Register with TASKS["name"] = lambda: <module>.TASK (lazy, so importing train.py stays light).


@dataclass
class Task:
    build_model: Callable  # (cfg) -> nn.Module
    loss: Callable  # (model, x (B,...), y (B,), cfg) -> (B,) per-sample loss
    generate: Callable  # (model, seeds (N,) int64, cfg, num_steps) -> (N, C, H, W) float in [-1, 1]
    load_data: Callable  # (cfg) -> dataset
    defaults: dict = dataclasses.field(default_factory=dict)  # TrainConfig values this task starts from


def seeded_noise(seeds, shape, device="cpu"):
    """Image i's initial noise from its own generator seeded with seeds[i] (EDM's per-image seeds).

    Drawn on the CPU, so a seed gives the same image on any device, batch size or rank.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


TASKS = {
    "edm": lambda: importlib.import_module(f"{__package__}.edm_task").TASK,  # image-space DiffiT, EDM (CIFAR-10, FFHQ-64)
    "latent": lambda: importlib.import_module(f"{__package__}.latent_task").TASK,  # latent DiffiT, ImageNet (ADM diffusion)
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


# ----------------------------------------------------------------------------
# The schedule: lr warm-up and EMA (EDM training_loop, written from its formulas)


def learning_rate(cfg, cur_nimg):
    """lr * min(images seen / warm-up images, 1) (EDM: 10 Mimg warm-up); no warm-up when warmup_kimg <= 0."""
    if cfg.warmup_kimg <= 0:
        return cfg.lr
    return cfg.lr * min(cur_nimg / (cfg.warmup_kimg * 1000), 1)


def ema_beta(cur_nimg, batch, halflife_kimg=500, rampup=0.05):
    """Per-step EMA decay whose half-life is min(halflife, rampup * images seen) images (EDM).

    beta = 0.5 ** (batch / halflife_nimg): after `halflife_nimg` images an old weight counts half. The
    ramp keeps the average short early on, so the EMA is never dominated by the random initialisation.
    """
    halflife_nimg = halflife_kimg * 1000
    if rampup:  # None or 0: a constant half-life (a fixed beta, e.g. DiT's 0.9999)
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


@torch.no_grad()
def ema_update(ema, model, beta):
    """ema <- beta * ema + (1 - beta) * model (buffers copied)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------
# Data order: stateless given the step, so resuming reads exactly the batches the killed run would have


class DataOrder:
    """Epoch e visits the dataset in a permutation seeded by (seed, e); step s reads the global batch
    at positions s*B .. (s+1)*B - 1 of those concatenated epochs. Every rank computes the same global
    batch and takes its own slice."""

    def __init__(self, num, seed):
        self.num, self.seed, self._cache = num, seed, {}

    def permutation(self, epoch):
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.num, generator=torch.Generator().manual_seed(_derive_seed(self.seed, 1, epoch)))}
        return self._cache[epoch]

    def batch(self, step, batch):  # -> (batch,) int64 dataset indices
        start, parts = step * batch, []
        while batch > 0:
            epoch, pos = divmod(start, self.num)
            take = min(batch, self.num - pos)
            parts.append(self.permutation(epoch)[pos:pos + take])
            start, batch = start + take, batch - take
        return torch.cat(parts)

    def state(self, step, batch):
        epoch, position = divmod(step * batch, self.num)
        return {"epoch": epoch, "position": position, "seed": self.seed, "num": self.num}


def _derive_seed(*words):
    """Independent 63-bit seeds from tuples of ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def get_batch(data, indices):
    if hasattr(data, "get_batch"):
        return data.get_batch(indices)
    items = [data[int(i)] for i in indices]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([y for _, y in items])


# ----------------------------------------------------------------------------
# Checkpoints: atomic, complete, refused when they belong to another run


def rng_states():
    # Saved and restored for completeness; exactness does not depend on them, because the loop reseeds
    # torch per micro-batch and the data order is a function of (seed, epoch).
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_checkpoint(obj, path):
    """torch.save to path.tmp, then os.replace: a crash mid-write leaves the previous checkpoint whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, map_location="cpu"):
    # weights_only=False: our own files hold numpy/python RNG states and a config dict, not just tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def config_from_dict(d):
    """TrainConfig from a checkpoint's config dict (tuples come back as lists from some writers)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def check_resumable(saved, cfg, path):
    """Refuse a checkpoint that was made with different run-defining settings."""
    saved = dataclasses.asdict(config_from_dict(saved))
    ours = dataclasses.asdict(cfg)
    diff = [k for k in ours if k not in RESUMABLE_KEYS and saved.get(k) != ours[k]]
    if diff:
        what = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {ours[k]!r}" for k in diff)
        raise ValueError(f"checkpoint {path} belongs to a different run ({what}). Pass the same settings to resume it, "
                         f"or --out=<a new directory> to start a new run.")


def build_from_checkpoint(path, use_ema=True, device="cpu"):
    """(model with the EMA (or raw) weights, TrainConfig, checkpoint) from a ckpt.pt; sample.py uses it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python -m minidiffit.train --out=<dir>` (it writes <dir>/ckpt.pt)")
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    model = get_task(cfg.task).build_model(cfg)
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


def save_grid(images, path, nrow=None):
    """float images (N, C, H, W) in [-1, 1] -> one PNG grid (uint8 as saved samples are)."""
    from PIL import Image

    x = to_uint8(images.cpu())  # (N, C, H, W)
    N, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    canvas = torch.zeros(C, rows * H, nrow * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        canvas[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)


# ----------------------------------------------------------------------------
# The loop


def init_process(log=None):
    """(rank, world size, device, log) of this process, for train and sample alike.

    Reads torchrun's environment ((0, 1) without it), joins the process group when there are several
    ranks (NCCL on CUDA, gloo on the CPU) and turns on TF32 on CUDA. `log` becomes a no-op on ranks > 0
    (only rank 0 talks) and `print` when None.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:  # Choice: TF32 matmuls/convs; DESIGN.md Sec. 6 speed settings, CUDA only
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if rank != 0:
        log = lambda *a: None  # noqa: E731
    elif log is None:
        log = lambda *a: print(*a, flush=True)  # noqa: E731
    return rank, world, device, log


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(cfg, log=None):
    """Train (or resume) the run in cfg.out until cfg.iters steps or cfg.minutes; returns the final step."""
    task = get_task(cfg.task)
    rank, world, device, log = init_process(log)
    cuda = device.type == "cuda"
    if cfg.batch % (world * cfg.accum):
        raise ValueError(f"--batch={cfg.batch} must divide into {world} ranks x {cfg.accum} accumulation rounds")
    micro = cfg.batch // (world * cfg.accum)  # images per forward pass on one rank

    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = task.build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cuda)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(ckpt["config"], cfg, ckpt_path)
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {ckpt_path} does not fit the model built from the same settings (has the model code changed?): {str(e)[:300]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        step, elapsed = ckpt["step"], ckpt["elapsed_s"]
        set_rng_states(ckpt["rng"])
        log(f"resumed {ckpt_path} at step {step} ({step * cfg.batch / 1000:.1f} kimg, {_fmt_time(elapsed)} trained)")
    # Choice: --minutes is a budget for the whole run, summed over resumes (saved as elapsed_s), so a killed
    # 30-minute run that is restarted trains for what is left, and rerunning a finished one does nothing.
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf

    def finished():
        return step >= cfg.iters or elapsed >= budget

    if finished():
        log(f"{out}: already done (step {step}/{cfg.iters}, {_fmt_time(elapsed)} of budget {cfg.minutes:g} min); nothing to do")
        return step

    data = task.load_data(cfg)
    if cuda and hasattr(data, "images") and data.images.numel() < 2**31:
        # Choice: small datasets live on the GPU as uint8, so a batch is one gather, no loader workers.
        data.images, data.labels = data.images.to(device), data.labels.to(device)
    order = DataOrder(len(data), cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"task {cfg.task}, preset {cfg.preset} ({n_params / 1e6:.2f}M params), data {data}, device {device} x {world}, "
        f"batch {cfg.batch} = {world} ranks x {cfg.accum} rounds x {micro}, bf16 {cfg.bf16 and cuda}, compile {cfg.compile and cuda}")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cfg.compile and cuda:
        train_model = torch.compile(train_model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.bf16 and cuda) else contextlib.nullcontext()

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.time() - elapsed  # so that time.time() - t_start is the training time summed over resumes
    t_log, step_log, loss_sum, loss_n, ckpt_loss, ckpt_n = time.time(), step, 0.0, 0, 0.0, 0
    while not finished():
        cur_nimg = step * cfg.batch  # images seen before this step: EDM sets lr and EMA from it (lr = 0 at step 0)
        lr = learning_rate(cfg, cur_nimg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        indices = order.batch(step, cfg.batch)  # (batch,) the global batch, identical on every rank
        step_loss = torch.zeros((), device=device)
        for a in range(cfg.accum):
            j = rank * cfg.accum + a  # this micro-batch's place in the global batch
            x, y = get_batch(data, indices[j * micro:(j + 1) * micro])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Choice: noise, sigma, augmentation and dropout depend on (seed, step, micro-batch) only, so a
            # resumed run is bit-identical and N ranks equal one rank accumulating N micro-batches.
            torch.manual_seed(_derive_seed(cfg.seed, 2, step, j))
            sync = contextlib.nullcontext() if (world == 1 or a == cfg.accum - 1) else train_model.no_sync()
            with sync:
                with autocast:
                    loss = task.loss(train_model, x, y, cfg)  # (micro,)
                # mean over this rank's images; DDP then averages the ranks -> mean over the global batch
                (loss.float().sum() / (micro * cfg.accum)).backward()
            step_loss += loss.detach().float().sum()
        for p in model.parameters():
            if p.grad is not None:  # EDM: a rare inf/nan gradient is zeroed rather than poisoning Adam
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        beta = ema_beta(cur_nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup)
        ema_update(ema, model, beta)
        step += 1

        if world > 1:  # one small all-reduce: the loss for logs, and rank 0's clock for the budget
            buf = torch.stack([step_loss, torch.tensor(float(time.time() - t_start) if rank == 0 else 0.0, device=device)])
            dist.all_reduce(buf)
            step_loss, elapsed = buf[0], float(buf[1])
        else:
            elapsed = time.time() - t_start
        loss_value = float(step_loss) / cfg.batch
        loss_sum, loss_n, ckpt_loss, ckpt_n = loss_sum + loss_value, loss_n + 1, ckpt_loss + loss_value, ckpt_n + 1

        if step % cfg.log_every == 0 or finished():
            now = time.time()
            ips = (step - step_log) * cfg.batch / max(now - t_log, 1e-9)
            eta = min((cfg.iters - step) * cfg.batch / max(ips, 1e-9), budget - elapsed)
            log(f"step {step}/{cfg.iters} | loss {loss_sum / loss_n:.4f} | {ips:.1f} img/s | kimg {step * cfg.batch / 1000:.1f} "
                f"| lr {lr:.2e} | elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(max(eta, 0))}")
            t_log, step_log, loss_sum, loss_n = now, step, 0.0, 0
        if step % cfg.ckpt_every == 0 or finished():
            if rank == 0:
                t0 = time.time()
                save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                 "step": step, "elapsed_s": elapsed, "config": dataclasses.asdict(cfg),
                                 "data_state": order.state(step, cfg.batch), "rng": rng_states()}, ckpt_path)
                record = {"step": step, "kimg": step * cfg.batch / 1000, "loss": ckpt_loss / max(ckpt_n, 1), "lr": lr,
                          "ema_beta": beta, "elapsed_s": round(elapsed, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                if cfg.grid > 0:
                    ema_rng = torch.get_rng_state()  # sampling must not disturb anything the loop uses
                    images = task.generate(ema, torch.arange(cfg.grid), cfg, cfg.sample_steps)
                    torch.set_rng_state(ema_rng)
                    record["grid"] = str(out / f"grid_{step:07d}.png")
                    save_grid(images, record["grid"])
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log(f"checkpoint {ckpt_path} at step {step}" + (f", grid {record['grid']}" if cfg.grid else "") + f" ({time.time() - t0:.1f}s)")
            ckpt_loss, ckpt_n = 0.0, 0
            if world > 1:
                dist.barrier()
    log(f"done: step {step}, {step * cfg.batch / 1000:.1f} kimg, {_fmt_time(elapsed)} trained; {ckpt_path}")
    return step


def config_from_args(argv):
    """TrainConfig from `--key=value` arguments: the task's own defaults first, then the command line."""
    task = parse_overrides(TrainConfig(), [a for a in argv if a.startswith("--task=")]).task
    return parse_overrides(dataclasses.replace(TrainConfig(task=task), **get_task(task).defaults), argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_command("minidiffit.train", __doc__, TrainConfig, lambda a: train(config_from_args(a)), argv)


if __name__ == "__main__":
    main()

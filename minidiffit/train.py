"""The training loop: EDM's recipe for the image-space DiffiT, DiT's for the latent one (DiffiT Sec. 4, App. I).

One loop for every task (minidiffit/tools/tasks.py: edm, latent, autoencoder), in three named steps that notebook
05 calls one by one: `setup` (build or resume), `train_step` (one optimizer step: accumulation, Adam, EMA) and
`save_state` (grid, log line, atomic checkpoint); `train` runs them, then the task's `finish` if it has one.
Adam with lr warm-up, an EMA with EDM's half-life ramp, DDP through torchrun, exact resume, divergence stops,
a lock on the run directory, Ctrl-C that says where it stopped. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .base.data import save_grid
from .base.runtime import (atomic_write, check_resumable, check_same_data, derive_seed, finite, init_process, load_checkpoint,
                           load_weights, num_parameters, progress_bar, run_lock, save_checkpoint)

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
    A half-life of 0 gives beta 0: no average, the EMA is a copy of the weights.
    """
    if halflife_kimg <= 0:
        return 0.0
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
            self._cache = {epoch: torch.randperm(self.num, generator=torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch)))}
        return self._cache[epoch]

    def batch(self, step, batch):  # -> (batch,) int64 dataset indices
        start, parts = step * batch, []
        while batch > 0:
            epoch, pos = divmod(start, self.num)
            take = min(batch, self.num - pos)
            parts.append(self.permutation(epoch)[pos:pos + take])
            start, batch = start + take, batch - take
        return torch.cat(parts)


def get_batch(data, indices):
    if hasattr(data, "get_batch"):
        return data.get_batch(indices)
    items = [data[int(i)] for i in indices]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([y for _, y in items])


# ----------------------------------------------------------------------------
# The three steps


class Diverged(ValueError):
    """The loss or the weights stopped being finite: the run stops, its last checkpoint is its last good one."""


@dataclass
class Run:
    """Everything a training run holds between steps."""
    cfg: object  # the task's Config
    task: object  # the task module (edm_task, latent_task, autoencoder_task)
    model: nn.Module  # the weights the optimizer updates
    ema: nn.Module  # their exponential moving average (what is sampled and evaluated)
    optimizer: torch.optim.Optimizer
    data: object  # the dataset (get_batch(indices) -> (x, y))
    step: int = 0  # optimizer steps taken
    elapsed: float = 0.0  # training seconds, summed over resumes
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    train_model: nn.Module = None  # model, maybe wrapped in DDP and torch.compile
    log: object = print
    bad_steps: int = 0  # steps in a row with a non-finite loss

    @property
    def out(self):
        return Path(self.cfg.out)

    @property
    def micro(self):  # images per forward pass on one rank
        return self.cfg.batch // (self.world * self.cfg.accum)


def _rng_states():
    # Saved for completeness; exactness does not depend on them, because the loop reseeds torch per
    # micro-batch and the data order is a function of (seed, epoch).
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def fast_path(flag, device):
    """A bf16 / compile setting on `device`: True or False as given, None (the default) on CUDA only."""
    return device.type == "cuda" if flag is None else flag


def _check_out(cfg):
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise NotADirectoryError(f"--out={cfg.out} is a file; a run directory is needed (it holds ckpt.pt and grids)")


def setup(task, cfg, log=None):
    """Build the run of `task` with settings `cfg` (model, EMA, optimizer, data), resuming cfg.out/ckpt.pt when
    it exists. A task is a module with build_model, loss, generate, load_data (minidiffit/tools/edm_task.py).

    Refuses a checkpoint of another run (other settings, or other data: its fingerprint), before any work."""
    _check_out(cfg)
    rank, world, device, log = init_process(log)
    cuda = device.type == "cuda"
    if cfg.batch % (world * cfg.accum):
        raise ValueError(f"--batch={cfg.batch} must divide into {world} ranks x {cfg.accum} accumulation rounds")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = task.build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cuda)
    data = task.load_data(cfg)
    run = Run(cfg, task, model, ema, optimizer, data, rank=rank, world=world, device=device, log=log)
    path = run.out / "ckpt.pt"
    if rank == 0:  # writes that a kill interrupted (runtime.atomic_write's temporaries): never read, only litter
        for tmp in run.out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    if path.exists():
        ckpt = load_checkpoint(path)
        missing = [k for k in ("ema", "optimizer", "elapsed_s") if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {path} has no {', '.join(missing)}: it holds weights to sample, not a training "
                             f"state to resume; pass --out=<a new directory> to start a new run")
        check_resumable(ckpt["config"], cfg, path)
        check_same_data(ckpt.get("data"), data.fingerprint(), path)
        load_weights(model, ckpt["model"], path)
        load_weights(ema, ckpt["ema"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
        run.step, run.elapsed = ckpt["step"], ckpt["elapsed_s"]
        if rank == 0:
            _truncate_metrics(run.out / "metrics.jsonl", run.step)
        log(f"resumed {path} at step {run.step} ({run.step * cfg.batch / 1000:.1f} kimg, {_fmt_time(run.elapsed)} trained)")
    if cuda and hasattr(data, "images") and data.images.numel() < 2**31:
        # Choice: small datasets live on the GPU as uint8, so a batch is one gather, no loader workers.
        data.images, data.labels = data.images.to(device), data.labels.to(device)
    run.train_model = model
    if world > 1:
        run.train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if fast_path(cfg.compile, device):
        run.train_model = torch.compile(run.train_model)
    return run


def train_step(run, order):
    """One optimizer step on the global batch `order.batch(step)`; returns its mean loss (all ranks).

    # Choice: every random draw of a micro-batch (the dataset's flips, noise, sigma or t, augmentation,
    # dropout) comes from torch's generator seeded by (seed, step, micro-batch) only, so a resumed run is
    # bit-identical and N ranks equal one rank accumulating N micro-batches.
    """
    cfg, micro = run.cfg, run.micro
    cur_nimg = run.step * cfg.batch  # images seen before this step: EDM sets lr and EMA from it (lr = 0 at step 0)
    for g in run.optimizer.param_groups:
        g["lr"] = learning_rate(cfg, cur_nimg)
    indices = order.batch(run.step, cfg.batch)  # (batch,) the global batch, identical on every rank
    bf16 = fast_path(cfg.bf16, run.device)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    step_loss = torch.zeros((), device=run.device)
    for a in range(cfg.accum):
        j = run.rank * cfg.accum + a  # this micro-batch's place in the global batch
        torch.manual_seed(derive_seed(cfg.seed, 2, run.step, j))
        x, y = get_batch(run.data, indices[j * micro:(j + 1) * micro])
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sync = contextlib.nullcontext() if (run.world == 1 or a == cfg.accum - 1) else run.train_model.no_sync()
        with sync:
            with autocast:
                loss = run.task.loss(run.train_model, x, y, cfg)  # (micro,)
            # mean over this rank's images; DDP then averages the ranks -> mean over the global batch
            (loss.float().sum() / (micro * cfg.accum)).backward()
        step_loss += loss.detach().float().sum()
    for p in run.model.parameters():
        if p.grad is not None:  # EDM: a rare inf/nan gradient is zeroed rather than poisoning Adam
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    ema_update(run.ema, run.model, ema_beta(cur_nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup))
    run.step += 1
    if run.world > 1:
        dist.all_reduce(step_loss)
    loss_value = float(step_loss) / cfg.batch
    run.bad_steps = 0 if math.isfinite(loss_value) else run.bad_steps + 1
    if run.bad_steps >= cfg.max_bad_steps:
        raise Diverged(f"the loss was not finite for {run.bad_steps} steps in a row (step {run.step}): the run diverged "
                       f"(is --lr={cfg.lr:g} too high?). {_last_good(run)}")
    return loss_value


def _last_good(run):
    path = run.out / "ckpt.pt"
    if path.exists():
        return (f"The last good checkpoint, {path}, is kept as it was: start a new run from scratch with other settings "
                f"(--out=<a new directory>)")
    return "No checkpoint was written."


def _all_finite(module):
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def save_state(run, record):
    """Write the grid, the metrics line and then the checkpoint (rank 0; atomic; never a non-finite one).

    The log line goes first: a kill between the two leaves a line for a step the checkpoint has not reached,
    which the resumed run drops (_truncate_metrics) and writes again, identical, when it gets there."""
    if not (_all_finite(run.model) and _all_finite(run.ema)):
        raise Diverged(f"the weights are no longer finite at step {run.step}: the run diverged (is --lr={run.cfg.lr:g} "
                       f"too high?). {_last_good(run)}")
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.cfg.grid > 0:
            with torch.random.fork_rng(devices=[]):  # sampling must not disturb anything the loop uses
                images = run.task.generate(run.ema, torch.arange(run.cfg.grid), run.cfg, run.cfg.sample_steps)
            record["grid"] = str(run.out / f"grid_{run.step:07d}.png")
            save_grid(images, record["grid"])
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        save_checkpoint({"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
                         "step": run.step, "elapsed_s": run.elapsed, "config": dataclasses.asdict(run.cfg),
                         "data": run.data.fingerprint(), "rng": _rng_states()}, run.out / "ckpt.pt")
    if run.world > 1:
        dist.barrier()


def _truncate_metrics(path, step):
    """Drop the log lines of steps after `step` (written before a checkpoint that a kill then prevented), and a
    last line cut short (a kill or a full disk while appending); rewritten atomically."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _metrics_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _metrics_step(line):  # the step of a metrics line; inf (dropped) for a line that is not a whole record
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------
# The loop


def train(task, cfg, log=None):
    """Train (or resume) `task`'s run in cfg.out until cfg.iters steps or cfg.minutes, then run the task's
    `finish(run)` if it has one (the autoencoder measures its latent scale there); returns the final step.

    cfg.out is locked meanwhile (runtime.run_lock): a second run on it is refused, naming this one's pid. A run
    that ends with a non-finite loss raises Diverged and writes no checkpoint; Ctrl-C raises a KeyboardInterrupt
    whose message says where the run stopped (config.run_command prints it as one line, exit code 130)."""
    _check_out(cfg)
    # Rank 0 locks for every rank (setup has not joined the process group yet: torchrun's RANK says which we are);
    # the lock comes first, so a refused run reads nothing and deletes none of the live run's temporaries.
    with run_lock(cfg.out) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext():
        run = setup(task, cfg, log)
        _loop(run)
        if hasattr(run.task, "finish") and run.rank == 0:  # after-training work: rank 0, on the saved weights
            run.task.finish(run)
        if run.world > 1:
            dist.barrier()
    return run.step


def _loop(run):
    cfg, log = run.cfg, run.log
    # Choice: --minutes is a budget for the whole run, summed over resumes (saved as elapsed_s), so a killed
    # 30-minute run that is restarted trains for what is left, and rerunning a finished one does nothing.
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf

    def finished():
        return run.step >= cfg.iters or run.elapsed >= budget

    if finished():
        log(f"{run.out}: already done (step {run.step}/{cfg.iters}, {_fmt_time(run.elapsed)} of budget {cfg.minutes:g} min); nothing to do")
        return
    order = DataOrder(len(run.data), cfg.seed)
    n_params = num_parameters(run.model)
    preset = f", preset {cfg.preset}" if hasattr(cfg, "preset") else ""
    log(f"task {cfg.task}{preset} ({n_params / 1e6:.2f}M params), data {run.data}, device {run.device} x {run.world}, "
        f"batch {cfg.batch} = {run.world} ranks x {cfg.accum} rounds x {run.micro}, bf16 {fast_path(cfg.bf16, run.device)}, compile {fast_path(cfg.compile, run.device)}")
    t_start = time.time() - run.elapsed  # so that time.time() - t_start is the training time summed over resumes
    t_log, step_log, losses, ckpt_losses, due = time.time(), run.step, [], [], False
    saved = run.step if (run.out / "ckpt.pt").exists() else None  # the step of the checkpoint on disk
    bar = progress_bar(total=cfg.iters, initial=run.step, desc=f"train {cfg.task}", unit="step", enabled=run.rank == 0)
    t_bar, step_bar = time.time(), run.step
    try:
        while not finished():
            loss = train_step(run, order)
            elapsed = time.time() - t_start
            if run.world > 1:  # rank 0's clock decides the budget for every rank
                clock = torch.tensor(elapsed if run.rank == 0 else 0.0, device=run.device)
                dist.all_reduce(clock)
                elapsed = float(clock)
            run.elapsed = elapsed
            losses.append(loss)
            ckpt_losses.append(loss)
            now = time.time()
            ips = (run.step - step_bar) * cfg.batch / max(now - t_bar, 1e-9)  # since the bar started: smooth
            eta = min((cfg.iters - run.step) * cfg.batch / max(ips, 1e-9), budget - run.elapsed)
            bar.set_postfix_str(f"loss {loss:.4f} | {ips:.1f} img/s | ETA {_fmt_time(max(eta, 0))}", refresh=False)
            bar.update(1)
            if run.step % cfg.log_every == 0 or finished():
                ips = (run.step - step_log) * cfg.batch / max(now - t_log, 1e-9)
                eta = min((cfg.iters - run.step) * cfg.batch / max(ips, 1e-9), budget - run.elapsed)
                with bar.external_write_mode():
                    log(f"step {run.step}/{cfg.iters} | loss {np.mean(losses):.4f} | {ips:.1f} img/s | kimg {run.step * cfg.batch / 1000:.1f} "
                        f"| lr {learning_rate(cfg, (run.step - 1) * cfg.batch):.2e} | elapsed {_fmt_time(run.elapsed)} | ETA {_fmt_time(max(eta, 0))}")
                t_log, step_log, losses = now, run.step, []
            if finished() and run.bad_steps:
                # Choice: a run whose last steps had no finite loss is a failure, not a result to save and sample.
                raise Diverged(f"the run ended at step {run.step} with a non-finite loss for its last {run.bad_steps} "
                               f"steps (is --lr={cfg.lr:g} too high?). {_last_good(run)}")
            # Choice: a checkpoint that falls due while the loss is not finite waits for the next finite step, so a run
            # that goes on to diverge keeps the checkpoint from before its trouble began (the end of a run always saves).
            due = due or run.step % cfg.ckpt_every == 0
            if (due and run.bad_steps == 0) or finished():
                due = False
                t0 = time.time()
                good = [v for v in ckpt_losses if math.isfinite(v)]
                record = {"step": run.step, "kimg": run.step * cfg.batch / 1000, "loss": finite(np.mean(good)) if good else None,
                          "nonfinite_steps": len(ckpt_losses) - len(good), "lr": learning_rate(cfg, (run.step - 1) * cfg.batch),
                          "elapsed_s": round(run.elapsed, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                save_state(run, record)
                saved = run.step
                with bar.external_write_mode():
                    log(f"checkpoint {run.out / 'ckpt.pt'} at step {run.step}" + (f", grid {record['grid']}" if "grid" in record else "")
                        + f" ({time.time() - t0:.1f}s)")
                ckpt_losses = []
    except KeyboardInterrupt:
        kept = (f"its checkpoint {run.out / 'ckpt.pt'} holds step {saved}: the same command resumes from there"
                if saved is not None else "no checkpoint was written yet: the same command starts it again")
        raise KeyboardInterrupt(f"interrupted at step {run.step}; {kept}") from None
    finally:
        bar.close()
    log(f"done: step {run.step}, {run.step * cfg.batch / 1000:.1f} kimg, {_fmt_time(run.elapsed)} trained; {run.out / 'ckpt.pt'}")

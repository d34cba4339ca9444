"""What every entry point shares: the process group, seeds and per-image noise, atomic files, checkpoints.

Small helpers with no model and no training loop in them, so that the tasks, `sample`, `fid` and
`imagenet` can import them while only `train` imports the tasks (dependencies run one way). Written once
here: one process-group set-up, one per-image noise helper, one atomic writer whose temporary files no
reader mistakes for results, and checkpoint loading that names the file when it is missing, corrupt or
someone else's. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------
# Processes


def init_process(log=None):
    """(rank, world size, device, log) of this process, for train, sample and prepare alike.

    Reads torchrun's environment ((0, 1) without it), joins the process group when there are several
    ranks (NCCL on CUDA, gloo on the CPU) on the device `select_device` picks. `log` becomes a no-op on
    ranks > 0 (only rank 0 talks) and `print` when None.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = select_device()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        log = lambda *a: None  # noqa: E731
    elif log is None:
        log = lambda *a: print(*a, flush=True)  # noqa: E731
    return rank, world, device, log


def select_device(name=""):
    """The device an entry point computes on: `name` when given ("cpu", "cuda:1"), else this rank's GPU
    (cuda:LOCAL_RANK) when CUDA is available, else the CPU. The one place that turns on TF32 on CUDA.

    # Choice: TF32 matmuls/convs on CUDA (DESIGN.md Sec. 6 speed settings); FID's network turns it off while
    # it runs (fid._full_float32), because FID is defined in float32.
    """
    device = torch.device(name or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------
# Seeds and per-image noise (the one helper: diffusion.py's samplers and augmentation, adm.py's sampling loops and
# the tasks' initial noise all draw through `draw`)


def derive_seed(*words):
    """Independent 63-bit seeds from tuples of ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def image_generators(seeds):
    """One CPU generator per image, seeded with seeds[i] (EDM's per-image seeds): a seed gives the same
    numbers on any device, batch size or rank. Samplers take the list and draw image i's noise from entry i."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(sample, shape, generator=None, device=None, dtype=torch.float32):
    """`sample` (torch.randn or torch.rand) of `shape` from the global RNG (generator None), one torch.Generator,
    or a list of one generator per image (shape[0] of them).

    Each generator draws on its own device (a CPU generator may drive CUDA tensors), then the numbers move to
    `device`. With a list, image i's numbers come from generator i alone, so an image is the same whatever
    batch it is drawn in (EDM samples every image from its own seed).
    """
    if generator is None:
        return sample(shape, device=device, dtype=dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: need one per image")
        return torch.stack([sample(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)
    return sample(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randn(shape, generator=None, device=None, dtype=torch.float32):
    """N(0, I) noise of `shape`; `generator`: None, one torch.Generator, or a list of one per image (`draw`)."""
    return draw(torch.randn, shape, generator, device, dtype)


def rand(shape, generator=None, device=None, dtype=torch.float32):
    """U[0, 1) numbers of `shape`, drawn like `randn`."""
    return draw(torch.rand, shape, generator, device, dtype)


def seeded_noise(seeds, shape, device="cpu", generators=None):
    """(N, *shape) initial noise, image i from its own generator (`image_generators(seeds)` when not given)."""
    generators = image_generators(seeds) if generators is None else generators
    return randn((len(generators), *shape), generators, device)


# ----------------------------------------------------------------------------
# Parameters


def num_parameters(model):
    """Trainable parameters of a module, a tensor that two modules share counted once (the count papers report:
    DiT-XL/2's and DiffiT's 561M exclude the fixed position embedding, a Parameter with requires_grad=False)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------
# Files: written whole or not at all


def temporary_path(path):
    """Where `atomic_write` stages `path`: hidden, ending in .tmp, so no reader (fid's image lister, the
    latent shard reader, a resumed sampler) ever takes it for a result."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path, write):
    """Call `write(binary file)` on a temporary file, then rename it onto `path` (atomic on POSIX): a kill or
    a full disk leaves the previous file (or none), never half of one, and no temporary behind."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # say how much was needed: at least what was written before the disk filled
            written = tmp.stat().st_size if tmp.exists() else 0
            free = shutil.disk_usage(path.parent).free
            raise OSError(e.errno, f"no space left on the device: {written / 1e6:.1f} MB written before it filled, "
                                   f"more needed, {free / 1e6:.1f} MB free", str(path)) from None
        if e.errno is not None and e.filename is None:  # torch's and numpy's writers do not say which file failed
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path, obj):
    # allow_nan=False: a NaN must never reach a JSON file as the bare token NaN (not JSON); pass finite() values
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, allow_nan=False).encode()))


def finite(x):
    """A float for JSON: None when not finite."""
    x = float(x)
    return x if math.isfinite(x) else None


LOCK = ".lock"  # hidden: image listers and the shard reader skip it


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def run_lock(folder):
    """Hold `folder`/.lock (our pid and host) while the body runs, so a second run on the same folder is refused,
    naming the live run's pid. A lock whose process is dead (killed, crashed: nothing removed it) is taken over.

    Created with O_EXCL, so of two runs starting at once exactly one wins. Another host's lock cannot be checked
    (shared disks), so it is refused with the advice to delete it if that run is gone.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # a stale lock removed by us and recreated by a third run in between: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):  # half-written by a run killed as it started: stale
                pid, host = None, me["host"]
            if host != me["host"]:
                raise ValueError(f"{folder} is in use by a run on host {host} (pid {pid}); wait for it to end, or, if "
                                   f"it is gone, delete {path}") from None
            # Our own pid: a run in this process that ended without releasing (an interrupted notebook cell).
            if pid is not None and pid != me["pid"] and _pid_alive(pid):
                raise ValueError(f"{folder} is in use by another run (pid {pid}); wait for it to end or stop it, "
                                   f"or pass --out=<another directory>") from None
            path.unlink(missing_ok=True)  # stale: its owner is dead
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise ValueError(f"could not take the lock {path}: other runs keep creating it")
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
            if created:  # a run refused before any work leaves no empty folder behind
                folder.rmdir()
        except (OSError, ValueError):  # not empty: the run wrote into it
            pass


# ----------------------------------------------------------------------------
# Progress bars: on a terminal only


class _NoBar:
    """What `progress_bar` returns when nobody watches: every call does nothing."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass

    def external_write_mode(self):
        return contextlib.nullcontext()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress_bar(total=None, desc=None, unit="it", initial=0, enabled=True):
    """A tqdm bar on stderr when stderr is a terminal and `enabled` (rank 0), else a bar that does nothing.

    # Choice: never under pytest, nbval, CI or a redirected log (stderr not a tty): there the log lines, one per
    # interval, are the whole output, as before. Write log lines inside `bar.external_write_mode()`.
    """
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, what="checkpoint"):
    """A minidiffit checkpoint, or a one-line error naming the file: missing, empty, truncated, corrupt, foreign."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a {what} file (a run directory holds its checkpoint as the file ckpt.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}; train one with `python -m minidiffit train --out=<dir>` (it writes <dir>/ckpt.pt)")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes); delete it (a run resumes from its last good checkpoint only if one exists)")
    try:
        # weights_only=False: our own files hold numpy/python RNG states and a config dict, not just tensors.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, a text file: torch raises many types
        raise ValueError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
                         f"delete it, or restore it from a copy") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a minidiffit training checkpoint (it holds {keys}); pass a ckpt.pt written by "
                         f"`python -m minidiffit train` (released weights: sample.py --weights=FILE)")
    return ckpt


def load_weights(model, state, path, what="checkpoint"):
    """model.load_state_dict(state), or a one-line error naming the file whose weights do not fit the model
    (every path from a checkpoint to a model goes through here: resume, sample, export, the autoencoder)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} {path} does not fit the model its settings build (has the model code changed?): "
                         f"{str(e).splitlines()[0][:200]}") from None
    return model


def dataclass_from_dict(cls, d):
    """A config dataclass back from a checkpoint's dict: lists become tuples again, keys it lacks are dropped."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_resumable(saved, cfg, path):
    """Refuse a checkpoint that was made with different run-defining settings (all but cfg.RESUMABLE)."""
    ours = dataclasses.asdict(cfg)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    # A setting newer than the checkpoint is missing from it: that run was made with the setting's default.
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    diff = [k for k in ours if k not in cfg.RESUMABLE and saved.get(k, defaults[k]) != ours[k]]
    if diff:
        what = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {ours[k]!r}" for k in diff)
        raise ValueError(f"checkpoint {path} belongs to a different run ({what}). Pass the same settings to resume it, "
                         f"or --out=<a new directory> to start a new run.")


# ----------------------------------------------------------------------------
# Data fingerprints: a run (and its checkpoint) is bound to the data it trained on


def fingerprint(count, classes, content):
    """{count, classes, digest}: `content` is bytes (or a list of strings) that change when the data does."""
    h = hashlib.sha256()
    for part in content if isinstance(content, list) else [content]:
        h.update(part.encode() if isinstance(part, str) else bytes(part))
    return {"count": int(count), "classes": list(classes), "digest": h.hexdigest()[:16]}


def check_same_data(saved, now, path):
    """Refuse a resume on other data, naming the difference (count, classes or content)."""
    if saved is None or saved == now:
        return
    if saved["count"] != now["count"]:
        what = f"{saved['count']} items then, {now['count']} now"
    elif saved["classes"] != now["classes"]:
        what = f"classes {saved['classes'][:5]}... then, {now['classes'][:5]}... now"
    else:
        what = f"the same count and classes but other contents (digest {saved['digest']} then, {now['digest']} now)"
    raise ValueError(f"checkpoint {path} was trained on other data ({what}); point --data_dir at the data it was "
                     f"trained on, or pass --out=<a new directory> to start a new run on this data")

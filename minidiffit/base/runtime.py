"""What every entry point shares: the process group, seeds and per-image noise, atomic files, checkpoints.

Small helpers with no model and no training loop in them, so that the tasks, `sample`, `fid` and
`imagenet` can import them while only `train` imports the tasks (dependencies run one way). Written once
here: one process-group set-up, one per-image noise helper, one atomic writer whose temporary files no
reader mistakes for results, and checkpoint loading that names the file when it is missing, corrupt or
someone else's. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------
# Processes


def init_process(log=None):
    """(rank, world size, device, log) of this process, for train, sample and prepare alike.

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
